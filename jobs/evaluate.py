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
from loupe.schemas.records import JobRecord
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
    unmatched: int  # label rows whose key the job has no scored row for
    key: str = "image_id"  # the CSV column the labels are keyed by
    categories: list[CategoryReport] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def evaluate(output: str, labels_csv: str, endpoint_url: str | None = None) -> Evaluation:
    """Join OUTPUT's scored rows with a CSV of labels: a key column (image_id, source_uri or
    file_name), then one 0/1 column per category; no match at all is a UserError with a hint."""
    storage = open_storage(output, endpoint_url)
    job = read_job(storage, output)
    taxonomy = job.settings.get("taxonomy")
    if not taxonomy:
        raise UserError(f"the job at {output} did not run the moderate task")
    thresholds = {c["key"]: c["threshold"] for c in taxonomy}
    key_column, labels = _read_labels(labels_csv, thresholds)
    scores = _read_scores(storage, output, job, key_column, labels.keys())

    matched = [image_id for image_id in labels if image_id in scores]
    if not matched:
        example = next(iter(labels), "")
        raise UserError(
            f"none of the {len(labels)} labelled images is in the job at {output} (first {key_column}: {example!r}); "
            f"key the labels by image_id, source_uri or file name as `loupe search --json` shows them"
        )
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
    return Evaluation(matched=len(matched), unmatched=len(labels) - len(matched), key=key_column, categories=reports)


# The columns a label file may key its rows by: one of them, exactly.
KEY_COLUMNS = ("image_id", "source_uri", "file_name")


def _read_labels(path: str, thresholds: dict[str, float]) -> tuple[str, dict[str, dict[str, int | None]]]:
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            text = handle.read()
    except OSError as exc:
        raise UserError(f"cannot read labels file {path}: {exc.strerror or exc}") from None
    reader = csv.DictReader(io.StringIO(text))
    columns = reader.fieldnames or []
    keys = [c for c in columns if c in KEY_COLUMNS]
    if len(keys) != 1:
        found = f"it has {' and '.join(keys)}" if keys else f"columns: {', '.join(columns) or 'none'}"
        raise UserError(f"{path} needs exactly one key column of {', '.join(KEY_COLUMNS)} ({found})")
    key = keys[0]
    unknown = [c for c in columns if c != key and c not in thresholds]
    if unknown:
        raise UserError(f"{path}: unknown category column '{unknown[0]}' (the job's categories: {', '.join(thresholds)})")
    labels: dict[str, dict[str, int | None]] = {}
    for line, row in enumerate(reader, start=2):
        values: dict[str, int | None] = {}
        for category in (c for c in columns if c != key):
            raw = (row.get(category) or "").strip()
            if raw not in ("", "0", "1"):
                raise UserError(f"{path}, line {line}: {category} must be 0, 1 or empty, not {raw!r}")
            values[category] = int(raw) if raw else None
        labels[(row.get(key) or "").strip()] = values
    return key, labels


def _read_scores(
    storage: Storage, output: str, job: JobRecord, key: str, wanted: Any
) -> dict[str, dict[str, float]]:
    """Scores per label key (image_id, source_uri or file name); a labelled file name two images share is refused."""
    manifest = find_manifest(storage, output)
    if manifest is None or not manifest.complete:
        from loupe.jobs.status import partial_job

        raise UserError(partial_job(storage, output, job))
    scores: dict[str, dict[str, float]] = {}
    owners: dict[str, str] = {}  # file name -> the source that has it, to find a second one
    for part in manifest.parts:
        with storage.open_seekable(join_uri(output, part["path"])) as handle:
            table = pq.read_table(handle, columns=["image_id", "source_uri", "moderation"])
        rows = zip(table["image_id"].to_pylist(), table["source_uri"].to_pylist(), table["moderation"].to_pylist())
        for image_id, source, moderation in rows:
            if moderation is None:
                continue
            if key == "image_id":
                scores[image_id] = moderation
            elif key == "source_uri":
                scores[source] = moderation
            else:
                name = source.rstrip("/").rsplit("/", 1)[-1]
                if name in owners and name in wanted:
                    raise UserError(
                        f"file name {name!r} is ambiguous: {owners[name]} and {source} both have it; "
                        "key the labels by source_uri or image_id"
                    )
                owners[name] = source
                scores[name] = moderation
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
