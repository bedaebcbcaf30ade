"""`loupe moderation evaluate`: moderation scores of a job against human labels, per category."""

from __future__ import annotations

import csv
import io
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from loupe.jobs.output import find_manifest, read_job
from loupe.schemas.errors import UserError
from loupe.schemas.layout import MANIFEST_FILE
from loupe.workers.storage import Storage, join_uri, open_storage


@dataclass
class CategoryReport:
    """Precision, recall and F1 of one category at its threshold, and the threshold that maximizes F1."""

    category: str
    labelled: int  # images with a 0/1 label for this category that the job scored
    support: int  # of those, labelled 1
    threshold: float
    precision: float
    recall: float
    f1: float
    best_threshold: float
    best_f1: float


@dataclass
class Evaluation:
    """The per-category reports and how the label file matched the job's rows."""

    matched: int
    unmatched: int  # label rows whose image_id the job has no scored row for
    categories: list[CategoryReport] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def evaluate(output: str, labels_csv: str, endpoint_url: str | None = None) -> Evaluation:
    """Join OUTPUT's scored rows with a CSV of labels (image_id, then one 0/1 column per category)."""
    storage = open_storage(output, endpoint_url)
    job = read_job(storage, output)
    taxonomy = job.settings.get("taxonomy")
    if not taxonomy:
        raise UserError(f"the job at {output} did not run the moderate task")
    thresholds = {c["key"]: c["threshold"] for c in taxonomy}
    labels = _read_labels(labels_csv, thresholds)
    scores = _read_scores(storage, output)

    matched = [image_id for image_id in labels if image_id in scores]
    reports = []
    for key, threshold in thresholds.items():
        pairs = [(scores[i][key], labels[i][key]) for i in matched if labels[i].get(key) is not None]
        if not pairs:
            continue
        score = np.array([p[0] for p in pairs], dtype=np.float64)
        truth = np.array([p[1] for p in pairs], dtype=bool)
        precision, recall, f1 = _prf(score >= threshold, truth)
        best_threshold, best_f1 = _best_threshold(score, truth)
        reports.append(
            CategoryReport(key, len(pairs), int(truth.sum()), threshold, precision, recall, f1, best_threshold, best_f1)
        )
    return Evaluation(matched=len(matched), unmatched=len(labels) - len(matched), categories=reports)


def _read_labels(path: str, thresholds: dict[str, float]) -> dict[str, dict[str, int | None]]:
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            text = handle.read()
    except OSError as exc:
        raise UserError(f"cannot read labels file {path}: {exc.strerror or exc}") from None
    reader = csv.DictReader(io.StringIO(text))
    columns = reader.fieldnames or []
    if "image_id" not in columns:
        raise UserError(f"{path} has no image_id column (columns: {', '.join(columns) or 'none'})")
    unknown = [c for c in columns if c != "image_id" and c not in thresholds]
    if unknown:
        raise UserError(f"{path}: unknown category column '{unknown[0]}' (the job's categories: {', '.join(thresholds)})")
    labels: dict[str, dict[str, int | None]] = {}
    for line, row in enumerate(reader, start=2):
        values: dict[str, int | None] = {}
        for key in (c for c in columns if c != "image_id"):
            raw = (row.get(key) or "").strip()
            if raw not in ("", "0", "1"):
                raise UserError(f"{path}, line {line}: {key} must be 0, 1 or empty, not {raw!r}")
            values[key] = int(raw) if raw else None
        labels[row["image_id"]] = values
    return labels


def _read_scores(storage: Storage, output: str) -> dict[str, dict[str, float]]:
    manifest = find_manifest(storage, output)
    if manifest is None:
        raise UserError(f"the job at {output} has no {MANIFEST_FILE} yet; let it finish (or rerun it) first")
    scores: dict[str, dict[str, float]] = {}
    for part in manifest.parts:
        with storage.open_seekable(join_uri(output, part["path"])) as handle:
            table = pq.read_table(handle, columns=["image_id", "moderation"])
        for image_id, moderation in zip(table["image_id"].to_pylist(), table["moderation"].to_pylist()):
            if moderation is not None:
                scores[image_id] = moderation
    return scores


def _prf(predicted: np.ndarray, truth: np.ndarray) -> tuple[float, float, float]:
    tp = float(np.sum(predicted & truth))
    precision = tp / predicted.sum() if predicted.sum() else 0.0
    recall = tp / truth.sum() if truth.sum() else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return round(precision, 4), round(recall, 4), round(f1, 4)


def _best_threshold(score: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    """The observed score that, as threshold, gives the highest F1 (the highest such on ties)."""
    order = np.argsort(-score, kind="stable")
    ranked, hits = score[order], truth[order]
    true_positives = np.cumsum(hits)
    predicted = np.arange(1, len(ranked) + 1)
    # Every image scoring at or above a threshold is flagged: evaluate at the end of each run
    # of equal scores, going down from the highest.
    ends = np.append(np.nonzero(ranked[1:] != ranked[:-1])[0], len(ranked) - 1)
    precision = true_positives[ends] / predicted[ends]
    recall = true_positives[ends] / max(int(hits.sum()), 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = np.nan_to_num(2 * precision * recall / (precision + recall))
    best = int(np.argmax(f1))
    return round(float(ranked[ends[best]]), 6), round(float(f1[best]), 4)
