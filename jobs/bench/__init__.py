"""The benchmarks behind `loupe bench job|moderation|index`."""
