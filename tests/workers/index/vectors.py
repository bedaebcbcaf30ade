"""Synthetic embeddings for the index tests: unit vectors in clusters, spread unevenly across directions."""

from __future__ import annotations

import numpy as np


def clustered(n: int, dim: int = 32, seed: int = 0, clusters: int = 40) -> np.ndarray:
    """Unit vectors in clusters whose spread falls off across directions, as in real embeddings."""
    rng = np.random.default_rng(seed)
    scale = np.arange(1, dim + 1, dtype=np.float32) ** -0.5
    centres = np.random.default_rng(1000).standard_normal((clusters, dim)).astype(np.float32) * scale
    x = centres[rng.integers(0, clusters, n)] + 0.6 * rng.standard_normal((n, dim)).astype(np.float32) * scale
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
