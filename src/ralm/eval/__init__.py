"""Evaluation: perplexity and bits per byte (lm.py); more metrics come with the methods that need them."""
