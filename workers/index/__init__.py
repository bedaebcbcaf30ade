"""The FAISS library: choosing, building, encoding and tuning an index; it knows nothing of OUTPUT."""
