"""grifo: an OpenAI-compatible inference fabric over jurisdiction-tagged inference points."""

__version__ = "0.1.0"
