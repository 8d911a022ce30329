"""Chunking, encoders, FAISS/BM25 indexes and the on-disk datastore."""
