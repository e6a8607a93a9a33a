"""Topology configuration: what the YAML file may say, loading it, and the embedded default."""
