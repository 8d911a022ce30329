"""Language models and their tokenizers: presets, hub ids, local folders and GGUF files."""
