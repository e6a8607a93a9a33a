"""Engines: the inference software inside a point (llama.cpp, MiniLM embeddings, fakes)."""
