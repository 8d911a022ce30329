"""Language models and their tokenizers: presets, hub ids, local folders and GGUF files."""

from ralm.lm.models import LoadedLM, load

__all__ = ["LoadedLM", "load"]
