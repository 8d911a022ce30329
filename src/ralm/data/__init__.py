"""Corpus readers and named real data sets."""
