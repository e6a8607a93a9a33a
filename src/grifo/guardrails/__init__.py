"""Guardrails on what a request carries: personal data found and redacted."""
