"""Scoring methods on a loaded LM: plain, in-context RALM and REPLUG, kNN-LM (and its store builder), RETRO-fit."""
