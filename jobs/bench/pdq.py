"""Benchmark: PDQ's cost per decoded image on the CPU, and matching hashes with FAISS against NumPy's brute force."""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np
from PIL import Image

from loupe.workers.hashing import pdq
from loupe.workers.index.hamming import CODE_BITS, MAX_DISTANCE, METHODS, HammingIndex, brute_force_pairs
from loupe.workers.index.threads import use_cpu_share

BRUTE_FORCE = "numpy"
# List entries that are edited copies of a catalog hash; the rest are unrelated hashes.
_COPIES_FRACTION = 0.5
# Edited copies are this many bits from their original at most: some within 31, some beyond.
_MAX_FLIPS = 48


def time_pdq(images: Sequence[Image.Image], repeats: int = 3) -> dict:
    """PDQ alone, one image at a time on one thread: milliseconds per image (each image's best of
    `repeats`, so that other work on the machine does not count), wall and process CPU time, at
    the images' decoded sizes."""
    if not images:
        raise ValueError("time_pdq needs at least one image")
    best, best_cpu = [], []
    for image in images:
        times, cpu_times = [], []
        for _ in range(repeats):
            started, cpu = time.perf_counter(), time.process_time()
            pdq(image)
            times.append(time.perf_counter() - started)
            cpu_times.append(time.process_time() - cpu)
        best.append(1000 * min(times))
        best_cpu.append(1000 * min(cpu_times))
    ms = np.array(best)
    pixels = np.array([image.width * image.height for image in images]) / 1e6
    return {
        "images": len(images),
        "megapixels_median": round(float(np.median(pixels)), 3),
        "megapixels_max": round(float(pixels.max()), 3),
        "ms_mean": round(float(ms.mean()), 3),
        "ms_median": round(float(np.median(ms)), 3),
        "ms_max": round(float(ms.max()), 3),
        "cpu_ms_median": round(float(np.median(best_cpu)), 3),
        "cpu_ms_mean": round(float(np.mean(best_cpu)), 3),
    }


def pdq_like_codes(count: int, rng: np.random.Generator) -> np.ndarray:
    """Random 256-bit codes with exactly 128 bits set, as PDQ's split at the median makes them."""
    bits = np.zeros((count, CODE_BITS), np.uint8)
    ones = np.argsort(rng.random((count, CODE_BITS)), axis=1)[:, : CODE_BITS // 2]
    np.put_along_axis(bits, ones, 1, axis=1)
    return np.packbits(bits, axis=1)


def match_inputs(catalog_size: int, list_size: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A catalog of PDQ-like codes and a list: half copies of catalog codes, 0 to 48 bits flipped; half unrelated."""
    rng = np.random.default_rng(seed)
    catalog = pdq_like_codes(catalog_size, rng)
    copies = min(catalog_size, int(list_size * _COPIES_FRACTION))
    bits = np.unpackbits(catalog[rng.choice(catalog_size, copies, replace=False)], axis=1)
    for row in bits:
        row[rng.choice(CODE_BITS, rng.integers(0, _MAX_FLIPS + 1), replace=False)] ^= 1
    known = np.concatenate([np.packbits(bits, axis=1), pdq_like_codes(list_size - copies, rng)])
    return catalog, known


def time_match(
    catalog_size: int,
    list_size: int,
    max_distance: int = MAX_DISTANCE,
    *,
    methods: Sequence[str] = (*METHODS, BRUTE_FORCE),
    seed: int = 0,
    brute_force_list: int | None = None,
) -> dict:
    """Seconds to find every (list, catalog) pair within `max_distance`, for each method: the FAISS
    indexes (building over the catalog, then searching it with the list) and NumPy's brute force.
    A method that finds other pairs than the first one measured is a ValueError, not a timing.

    `brute_force_list`: the brute force searches only that many list hashes (the first ones, whose
    pairs must equal the other methods' pairs for them) and its time is scaled up linearly to the
    whole list, reported as such ("extrapolated_from")."""
    threads = use_cpu_share()
    catalog, known = match_inputs(catalog_size, list_size, seed)
    timings: dict[str, dict] = {}
    reference = None
    for method in methods:
        started, cpu = time.perf_counter(), time.process_time()
        queries = known
        if method == BRUTE_FORCE and brute_force_list is not None and brute_force_list < list_size:
            queries = known[:brute_force_list]
        if method == BRUTE_FORCE:
            built = started
            pairs = brute_force_pairs(catalog, queries, max_distance)
        else:
            index = HammingIndex(catalog, method)  # type: ignore[arg-type]
            built = time.perf_counter()
            pairs = index.search(known, max_distance)
            del index
        finished, cpu_seconds = time.perf_counter(), time.process_time() - cpu
        found = np.stack([pairs.query, pairs.base, pairs.distance])
        if reference is None:
            reference = found
        else:
            expected = reference[:, reference[0] < len(queries)]
            if not np.array_equal(found, expected):
                raise ValueError(f"{method} found {found.shape[1]} pairs, {methods[0]} {expected.shape[1]}")
        scale = list_size / len(queries)  # 1 unless the brute force ran on a part of the list
        timings[method] = {
            "build_seconds": round(built - started, 3),
            "search_seconds": round(scale * (finished - built), 3),
            "seconds": round(scale * (finished - started), 3),
            # every thread's CPU time: the work done, whatever else shares the machine
            "cpu_seconds": round(scale * cpu_seconds, 3),
            "pairs": len(pairs),
        }
        if scale != 1:
            timings[method] |= {"extrapolated_from": len(queries), "measured_seconds": round(finished - started, 3)}
    return {
        "catalog": catalog_size,
        "list": list_size,
        "max_distance": max_distance,
        "threads": threads,  # FAISS's; the NumPy brute force runs on one
        "methods": timings,
    }


def format_table(pdq_result: dict | None, match_result: dict | None) -> str:
    """Either result (or both) as the lines a person reads."""
    lines = []
    if pdq_result:
        r = pdq_result
        lines.append(
            f"PDQ: {r['ms_median']} ms median ({r['cpu_ms_median']} ms CPU), {r['ms_mean']} ms mean, {r['ms_max']} ms max per image over "
            f"{r['images']} images ({r['megapixels_median']} MP median, {r['megapixels_max']} MP largest)"
        )
    if match_result:
        r = match_result
        lines.append(
            f"match: {r['catalog']:,} catalog hashes x {r['list']:,} list hashes within {r['max_distance']} bits, "
            f"{r['threads']} FAISS threads"
        )
        lines += [
            f"  {method:<10} build {t['build_seconds']:>8.3f} s  search {t['search_seconds']:>8.3f} s  "
            f"total {t['seconds']:>8.3f} s  CPU {t['cpu_seconds']:>8.3f} s  {t['pairs']:,} pairs"
            + (
                f"  (measured on the first {t['extrapolated_from']:,} list hashes: {t['measured_seconds']:.3f} s, "
                "scaled linearly)"
                if "extrapolated_from" in t
                else ""
            )
            for method, t in r["methods"].items()
        ]
    return "\n".join(lines)
