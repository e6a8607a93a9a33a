"""Metrics and logs. Every metric name of the gateway lives in `metrics.py`."""
