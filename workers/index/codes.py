"""Training an IVF's lists, rotation and codes (or a PQ's without lists) from one sample: parametric OPQ, residuals a batch at a time."""

from __future__ import annotations

from typing import Any

import numpy as np

from loupe.workers.index.library import faiss

OPQ_TRAIN_POINTS = 65_536  # residuals whose covariance the OPQ rotation is computed from
# Residuals are made a batch at a time, each batch's temporaries (rotated rows, their centroids,
# float64 copies for the covariance) ~12 MB at 768 dimensions: 16,384 rows made the OPQ
# covariance alone hold 200 MB more than the sample at 1M x 768 within 1/16 of flat's bytes.
RESIDUAL_BATCH = 4096


def trainable(index: faiss.Index) -> tuple[Any, Any] | None:
    """(the rotation or None, the coded index) when `index` is an IVF coding residuals with PQ or SQ,
    or a PQ without lists, alone or behind one OPQ or random rotation: what train_codes trains.
    Else None (`index.train` does)."""
    index = faiss.downcast_index(index)
    rotation, coded = None, index
    if isinstance(index, faiss.IndexPreTransform):
        if index.chain.size() != 1:
            return None
        rotation = faiss.downcast_VectorTransform(index.chain.at(0))
        if not isinstance(rotation, (faiss.OPQMatrix, faiss.RandomRotationMatrix)):
            return None
        coded = faiss.downcast_index(index.index)
    if isinstance(coded, faiss.IndexPQ):
        return rotation, coded
    if not isinstance(coded, (faiss.IndexIVFPQ, faiss.IndexIVFScalarQuantizer)) or not coded.by_residual:
        return None
    return rotation, coded


def train_codes(index: faiss.Index, sample: np.ndarray, clustering_index: Any = None, *, overwrite: bool = False) -> None:
    """Train an IVF or a PQ (behind a rotation or not) holding the sample and little more, unlike `index.train`.

    `index.train` copies the sample rotated, then copies it again (or the rows it samples) as
    residuals. Here an IVF's lists come first, by k-means on the sample as IVF training runs it (on a
    flat index, or `clustering_index`; a rotation changes no distance), and the coarse quantizer
    receives the centroids, rotated. An OPQ rotation is then the parametric OPQ of what the PQ
    encodes: the IVF residuals, which balances them rather than the vectors, whose spread is
    mostly between lists; or, without lists, the vectors themselves. A random rotation is faiss's
    own. The codes train last, on residuals (or rotated vectors) made a batch at a time from as
    many rows as faiss would sample for them: the build holds the sample and one array of
    residuals no larger than the code's training set. With `overwrite` (a sample that is scratch
    to the caller) the residuals take the sample's own memory instead.
    """
    rotation, coded = trainable(index)
    ivf = None if isinstance(coded, faiss.IndexPQ) else coded
    dim = sample.shape[1]
    centroids, assign = None, None
    if ivf is not None:
        kmeans = faiss.Clustering(dim, ivf.nlist, ivf.cp)
        assign = faiss.IndexFlat(dim, ivf.metric_type)
        kmeans.train(sample, clustering_index if clustering_index is not None else assign)
        centroids = faiss.vector_to_array(kmeans.centroids).reshape(ivf.nlist, dim)
        assign.reset()
        assign.add(centroids)
    if isinstance(rotation, faiss.OPQMatrix):
        covariance = residual_covariance(sample[:OPQ_TRAIN_POINTS], centroids, assign)
        faiss.copy_array_to_vector(balanced_rotation(covariance, coded.pq.M, rotation.d_out).ravel(), rotation.A)
        rotation.is_trained = True
    elif rotation is not None:
        rotation.train(sample[:1])  # a random rotation ignores the data

    def rotate(vectors: np.ndarray) -> np.ndarray:
        return vectors if rotation is None else np.ascontiguousarray(rotation.apply(vectors), dtype=np.float32)

    if ivf is not None:
        rotated = rotate(centroids)
        ivf.quantizer.reset()
        ivf.quantizer.add(rotated)
        # On at most as many rows as faiss would sample for the codes (PQ: 256 per centroid; SQ: 100,000).
        wanted = ivf.train_encoder_num_vectors()
    else:
        wanted = coded.pq.cp.max_points_per_centroid * coded.pq.ksub
    rows = sample[: wanted if wanted > 0 else len(sample)]
    if ivf is None and rotation is None:
        coded.train(rows)  # the vectors as they are: nothing to rotate or subtract
        index.is_trained = True
        return
    if overwrite and sample.flags.c_contiguous and coded.d <= dim:
        # Residual i (coded.d <= dim floats) lands at or before sample row i, so a batch only
        # overwrites rows already read: the sample's memory holds the residuals, packed.
        residuals = sample.reshape(-1)[: len(rows) * coded.d].reshape(len(rows), coded.d)
    else:
        residuals = np.empty((len(rows), coded.d), dtype=np.float32)
    if ivf is None:  # a PQ without lists: the rotated vectors
        for start in range(0, len(rows), RESIDUAL_BATCH):
            vectors = rotate(rows[start : start + RESIDUAL_BATCH])
            residuals[start : start + len(vectors)] = vectors
        coded.train(residuals)
        index.is_trained = True
        return
    lists = np.empty(len(rows), dtype=np.int64)
    for start in range(0, len(rows), RESIDUAL_BATCH):
        vectors = rotate(rows[start : start + RESIDUAL_BATCH])
        batch_lists = lists[start : start + len(vectors)]
        batch_lists[:] = ivf.quantizer.assign(vectors, 1).ravel()
        np.subtract(vectors, rotated[batch_lists], out=residuals[start : start + len(vectors)])
    ivf.train_encoder(len(rows), faiss.swig_ptr(residuals), faiss.swig_ptr(lists))
    ivf.is_trained = True
    index.is_trained = True


def residual_covariance(sample: np.ndarray, centroids: np.ndarray | None, assign: faiss.Index | None) -> np.ndarray:
    """The covariance of the sample's residuals to their nearest centroids (about the origin
    when there are none: what a PQ without lists encodes), a batch at a time."""
    covariance = np.zeros((sample.shape[1],) * 2)
    for start in range(0, len(sample), RESIDUAL_BATCH):
        batch = sample[start : start + RESIDUAL_BATCH]
        if centroids is None:
            residuals = batch.astype(np.float64)
        else:
            residuals = np.subtract(batch, centroids[assign.assign(batch, 1).ravel()], dtype=np.float64)
        covariance += residuals.T @ residuals
    return covariance / max(len(sample), 1)


def balanced_rotation(covariance: np.ndarray, m: int, d_out: int) -> np.ndarray:
    """The (d_out, d) rotation that gives each of a PQ's m sub-vectors an equal share of the variance.

    Parametric OPQ (Ge et al., "Optimized Product Quantization", 2013): project the residuals
    (whose `covariance` is given) on their principal axes (keeping the d_out of most variance) and deal the axes out to the m
    sub-vectors so that the product of each sub-vector's variances is as even as can be: in
    rounds of m, the axis of most variance goes to the sub-vector whose product is smallest.
    For Gaussian data this is the rotation of least PQ distortion, found in one eigendecomposition
    where faiss's OPQ iterates the whole PQ training ~50 times from a random rotation.
    """
    dsub = d_out // m
    if dsub * m != d_out:
        raise ValueError(f"{d_out} dimensions do not split into {m} sub-vectors")
    variances, axes = np.linalg.eigh(covariance)
    order = np.argsort(-variances)
    log_product = np.zeros(m)
    groups: list[list[int]] = [[] for _ in range(m)]
    for round_ in range(min(dsub, -(-len(order) // m))):
        for axis, group in zip(order[round_ * m : (round_ + 1) * m], np.argsort(log_product, kind="stable")):
            groups[group].append(axis)
            log_product[group] += np.log(max(variances[axis], 1e-30))
    # Rows past the data's dimension (d_out > d pads with zero rows, as faiss's OPQ does) stay zero.
    rotation = np.zeros((dsub * m, covariance.shape[0]), dtype=np.float32)
    for group, axes_of_group in enumerate(groups):
        for slot, axis in enumerate(axes_of_group):
            rotation[group * dsub + slot] = axes[:, axis]
    return rotation
