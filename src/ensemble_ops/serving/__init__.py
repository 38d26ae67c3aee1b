"""Serving: engines over llama.cpp, GGUF checks, members, routing, cache and model files."""
