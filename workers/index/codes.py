"""Lloyd-Max codes: per-dimension codebooks of least squared error for IVF residuals behind a random rotation."""

from __future__ import annotations

from statistics import NormalDist
from typing import Any

import numpy as np

from loupe.workers.index.library import faiss

LLOYD_TRAIN_POINTS = 65_536  # residuals the per-dimension codebooks train on: 512 per level at 7 bits
LLOYD_ITERATIONS = 40
RESIDUAL_BATCH = 16_384  # residuals computed a batch at a time: one copy of the sample, not two


def lloyd_ivf(index: faiss.Index) -> Any:
    """The IVF-PQ inside `index` when its PQ has one-dimensional sub-vectors, else None."""
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is None:
        return None
    ivf = faiss.downcast_index(ivf)
    return ivf if isinstance(ivf, faiss.IndexIVFPQ) and ivf.pq.dsub == 1 else None


def train_lloyd_max(index: faiss.Index, ivf: Any, sample: np.ndarray) -> None:
    """Set each dimension's codebook to the Lloyd-Max quantizer of the sample's IVF residuals."""
    centroids = ivf.quantizer.reconstruct_n(0, ivf.nlist)
    residuals = np.empty((len(sample), ivf.d), dtype=np.float32)
    for start in range(0, len(sample), RESIDUAL_BATCH):
        vectors = _pre_transform(index, sample[start : start + RESIDUAL_BATCH])
        assigned = ivf.quantizer.assign(vectors, 1).ravel()
        residuals[start : start + len(vectors)] = vectors - centroids[assigned]
    levels = ivf.pq.ksub
    codebooks = np.stack([lloyd_max(residuals[:, j], levels) for j in range(residuals.shape[1])])
    faiss.copy_array_to_vector(codebooks.astype(np.float32).ravel(), ivf.pq.centroids)
    ready_to_add(index)


def lloyd_max(values: np.ndarray, levels: int, iterations: int = LLOYD_ITERATIONS) -> np.ndarray:
    """The `levels` reconstruction points of least squared error for `values` (1-d k-means).

    Starts from the points that are optimal at high rate for a Gaussian of the sample's mean and
    spread (their density follows p^(1/3): quantiles of a Gaussian three times as wide), which
    rotated residuals nearly are, then runs Lloyd's iterations on the sorted sample.
    """
    data = np.sort(np.asarray(values, dtype=np.float64))
    if len(data) == 0:
        return np.zeros(levels)
    sums = np.concatenate([[0.0], np.cumsum(data)])
    spread = data.std() or 1.0
    quantiles = [NormalDist().inv_cdf((i + 0.5) / levels) for i in range(levels)]
    points = data.mean() + np.sqrt(3) * spread * np.array(quantiles)
    points = np.clip(points, data[0], data[-1])
    for _ in range(iterations):
        edges = np.concatenate([[0], np.searchsorted(data, (points[1:] + points[:-1]) / 2), [len(data)]])
        counts = np.diff(edges)
        means = (sums[edges[1:]] - sums[edges[:-1]]) / np.maximum(counts, 1)
        moved = np.sort(np.where(counts > 0, means, points))  # an empty cell keeps its point
        if np.allclose(moved, points, rtol=0, atol=1e-7 * spread):
            points = moved
            break
        points = moved
    return points


def _pre_transform(index: faiss.Index, vectors: np.ndarray) -> np.ndarray:
    """`vectors` as the IVF inside `index` sees them: through its rotation, if it has one."""
    index = faiss.downcast_index(index)
    if isinstance(index, faiss.IndexPreTransform):
        for i in range(index.chain.size()):
            vectors = faiss.downcast_VectorTransform(index.chain.at(i)).apply(vectors)
    return np.ascontiguousarray(vectors, dtype=np.float32)


def ready_to_add(index: faiss.Index) -> None:
    """Build the in-memory helpers that encoding needs for speed (not saved with the index)."""
    lloyd = lloyd_ivf(index)
    if lloyd is not None:
        # Encodes one-dimensional sub-vectors ~10x faster; the codes are the same.
        lloyd.pq.sync_transposed_centroids()

