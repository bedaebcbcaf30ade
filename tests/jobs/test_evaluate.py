"""`loupe moderation evaluate`: per-category precision, recall, F1 and the best threshold."""

import json

import pytest
from typer.testing import CliRunner

from loupe.jobs.cli import app
from loupe.jobs.evaluate import evaluate
from loupe.schemas.config import JobConfig
from loupe.schemas.errors import UserError
from loupe.schemas.layout import JOB_FILE, MANIFEST_FILE
from loupe.schemas.records import JobRecord, Manifest
from loupe.schemas.rows import output_schema
from loupe.schemas.taxonomy import Category, Taxonomy
from loupe.workers.storage import LocalStorage
from loupe.workers.writer import write_part

TAXONOMY = Taxonomy((Category("violence_gore", "blood", 0.5), Category("self_harm", "self-harm", 0.3)))
# image -> (violence score, self-harm score); labels below.
SCORES = {"a": (0.9, 0.1), "b": (0.7, 0.4), "c": (0.52, 0.2), "d": (0.2, 0.35), "e": (0.1, 0.0), "f": (0.55, 0.9)}


@pytest.fixture
def scored_output(tmp_path):
    """An OUTPUT as a moderation job leaves it, with known scores (and one error row)."""
    out = tmp_path / "out"
    config = JobConfig(input="in", output=str(out), model="m", taxonomy=TAXONOMY)
    storage = LocalStorage()
    rows = [
        {"image_id": image_id, "source_uri": f"in/{image_id}.jpg", "shard_id": 0, "status": "ok",
         "model": "m", "prompt": "p", "moderation": {"violence_gore": v, "self_harm": s}}
        for image_id, (v, s) in SCORES.items()
    ] + [{"image_id": "z", "source_uri": "in/z.jpg", "shard_id": 0, "status": "error", "model": "m", "prompt": "p"}]
    part = write_part(storage, str(out), 0, rows, output_schema(TAXONOMY))
    job = JobRecord(settings=config.plan_settings(), listing_sha256="x", objects=7, shards=1, created_at="now")
    storage.write_bytes(str(out / JOB_FILE), job.to_json())
    manifest = Manifest(True, 1, 6, 1, [{"path": part.path, "shard_id": 0, "rows": 7, "sha256": part.sha256,
                                         "bytes": part.bytes}], [], "x", "now")
    storage.write_bytes(str(out / MANIFEST_FILE), manifest.to_json())
    return out


def _labels(tmp_path, text):
    path = tmp_path / "labels.csv"
    path.write_text(text)
    return str(path)


def test_metrics_at_threshold_and_best_threshold(scored_output, tmp_path):
    labels = _labels(tmp_path, "image_id,violence_gore,self_harm\na,1,0\nb,1,1\nc,0,\nd,0,1\ne,0,0\nf,1,1\nz,1,1\nnope,1,0\n")
    report = evaluate(str(scored_output), labels)
    assert (report.matched, report.unmatched) == (6, 2)  # z is an error row, nope is unknown
    violence, self_harm = report.categories
    # violence at 0.5 flags a, b, c, f: TP a, b, f -> precision 3/4, recall 3/3.
    assert (violence.labelled, violence.support, violence.precision, violence.recall) == (6, 3, 0.75, 1.0)
    assert violence.f1 == round(2 * 0.75 / 1.75, 4)
    # Raising the threshold to 0.55 drops only c (a false positive): F1 = 1.
    assert (violence.best_threshold, violence.best_f1) == (0.55, 1.0)
    # self_harm: c unlabelled. At 0.3 flags b, d, f (all positive), e and a negative -> perfect.
    assert (self_harm.labelled, self_harm.support, self_harm.f1) == (5, 3, 1.0)
    assert self_harm.best_threshold == 0.35


def test_missing_category_columns_are_allowed(scored_output, tmp_path):
    report = evaluate(str(scored_output), _labels(tmp_path, "image_id,self_harm\na,0\nb,1\n"))
    assert [c.category for c in report.categories] == ["self_harm"]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("id,violence_gore\na,1\n", "needs exactly one key column of image_id, source_uri, file_name"),
        ("image_id,source_uri,violence_gore\na,in/a.jpg,1\n", "it has image_id and source_uri"),
        ("image_id,violence_gore\nnope,1\n", "none of the 1 labelled images is in the job"),
        ("image_id,violence\na,1\n", "unknown category column 'violence'"),
        ("image_id,violence_gore\na,yes\n", "line 2: violence_gore must be 0, 1 or empty"),
    ],
)
def test_bad_label_files(scored_output, tmp_path, text, message):
    with pytest.raises(UserError, match=message):
        evaluate(str(scored_output), _labels(tmp_path, text))


def test_cli_json_and_errors(scored_output, tmp_path):
    runner = CliRunner()
    labels = _labels(tmp_path, "image_id,violence_gore\na,1\nb,0\ne,0\n")
    result = runner.invoke(app, ["moderation", "evaluate", str(scored_output), labels, "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["matched"] == 3 and data["categories"][0]["category"] == "violence_gore"
    table = runner.invoke(app, ["moderation", "evaluate", str(scored_output), labels])
    assert table.exit_code == 0 and "violence_gore" in table.stdout
    missing = runner.invoke(app, ["moderation", "evaluate", str(tmp_path / "none"), labels])
    assert missing.exit_code == 2 and "no loupe job" in missing.stderr
    gone = runner.invoke(app, ["moderation", "evaluate", str(scored_output), str(tmp_path / "x.csv")])
    assert gone.exit_code == 2 and "cannot read labels" in gone.stderr


def test_taxonomy_command_round_trips(tmp_path):
    from loupe.schemas.taxonomy import DEFAULT_TAXONOMY, load_taxonomy

    result = CliRunner().invoke(app, ["moderation", "taxonomy"])
    assert result.exit_code == 0
    path = tmp_path / "policy.toml"
    path.write_text(result.stdout)
    assert load_taxonomy(path) == DEFAULT_TAXONOMY


@pytest.mark.parametrize(("key", "value"), [("source_uri", "in/{}.jpg"), ("file_name", "{}.jpg")])
def test_labels_keyed_by_source_uri_or_file_name(scored_output, tmp_path, key, value):
    rows = "".join(f"{value.format(i)},{label}\n" for i, label in [("a", 1), ("b", 1), ("c", 0), ("e", 0)])
    report = evaluate(str(scored_output), _labels(tmp_path, f"{key},violence_gore\n{rows}"))
    assert (report.matched, report.key) == (4, key)
    assert report.categories[0].support == 2


def test_an_ambiguous_file_name_is_refused(tmp_path):
    out = tmp_path / "out"
    config = JobConfig(input="in", output=str(out), model="m", taxonomy=TAXONOMY)
    storage = LocalStorage()
    rows = [
        {"image_id": f"id{n}", "source_uri": f"in/{folder}/cat.jpg", "shard_id": 0, "status": "ok", "model": "m",
         "prompt": "p", "moderation": {"violence_gore": 0.5, "self_harm": 0.1}}
        for n, folder in enumerate(["x", "y"])
    ]
    part = write_part(storage, str(out), 0, rows, output_schema(TAXONOMY))
    job = JobRecord(settings=config.plan_settings(), listing_sha256="x", objects=2, shards=1, created_at="now")
    storage.write_bytes(str(out / JOB_FILE), job.to_json())
    manifest = Manifest(True, 1, 2, 0, [{"path": part.path, "shard_id": 0, "rows": 2, "sha256": part.sha256,
                                         "bytes": part.bytes}], [], "x", "now")
    storage.write_bytes(str(out / MANIFEST_FILE), manifest.to_json())
    with pytest.raises(UserError, match="'cat.jpg' is ambiguous: in/x/cat.jpg and in/y/cat.jpg"):
        evaluate(str(out), _labels(tmp_path, "file_name,violence_gore\ncat.jpg,1\n"))
    # Keyed by source, the same images are told apart.
    report = evaluate(str(out), _labels(tmp_path, "source_uri,violence_gore\nin/x/cat.jpg,1\nin/y/cat.jpg,0\n"))
    assert report.matched == 2


def test_zero_matches_exit_2_with_a_hint(scored_output, tmp_path):
    labels = _labels(tmp_path, "file_name,violence_gore\nother.png,1\n")
    result = CliRunner().invoke(app, ["moderation", "evaluate", str(scored_output), labels])
    assert result.exit_code == 2 and result.exception is None or isinstance(result.exception, SystemExit)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "none of the 1 labelled images" in lines[0] and "loupe search --json" in lines[0]


def test_the_table_fits_80_columns(scored_output, tmp_path):
    from io import StringIO

    from rich.console import Console

    from loupe.jobs.console import print_evaluation

    labels = _labels(tmp_path, "image_id,violence_gore,self_harm\na,1,0\nb,1,1\nd,0,1\n")
    buffer = StringIO()
    print_evaluation(evaluate(str(scored_output), labels), Console(file=buffer, width=80))
    lines = buffer.getvalue().splitlines()
    assert max(len(line) for line in lines) <= 80
    assert lines[0].startswith("3 labelled images matched by image_id")
    header = lines[1].split()
    assert header[:3] == ["category", "pos/n", "thr"] and "…" not in buffer.getvalue()
    assert len(lines) == 6  # title, header, two categories, the note on abbreviations (two lines)
