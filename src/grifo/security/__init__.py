"""Stage 2: who is calling. API keys → tenant principal."""
