"""Exports of gqa-prune checkpoints to serving formats: GGUF for llama.cpp (``gguf``), run by ``llama_cpp``."""
