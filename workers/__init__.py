"""What runs inside Ray actors: storage access, decoding, model replicas, the shard pipeline."""
