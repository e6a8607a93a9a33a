"""Helpers shared by the test suite (generated fixtures, tiny models)."""
