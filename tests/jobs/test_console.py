"""What a person sees: per-batch progress, the interrupt line, summaries that report only what ran, 80 columns."""

import json
import shutil
import time
from io import StringIO
from typing import ClassVar

import pytest
from rich.console import Console
from typer.testing import CliRunner

from loupe.jobs import cli
from loupe.jobs.cli import app
from loupe.jobs.console import ProgressBar, print_hits
from loupe.jobs.search import Hit
from loupe.schemas.config import JobConfig
from loupe.schemas.layout import MANIFEST_FILE, stats_path
from loupe.schemas.plan import Shard, ShardKind
from loupe.schemas.records import ShardStats
from loupe.workers.models.stages import Captioning
from loupe.workers.pipeline import ShardProcessor

runner = CliRunner()


def _invoke(*args, env=None):
    result = runner.invoke(app, [str(a) for a in args], env=env)
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result


def _one_line(result):
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    return lines[0]


# -- progress ------------------------------------------------------------------------------


class _Stub(Captioning):
    model_id = "stub"

    def prepare(self, images):
        return [im.size for im in images]

    def generate(self, sizes):
        return [f"{w}x{h}" for w, h in sizes]


def test_the_pipeline_reports_each_batch(sample_images, tmp_path):
    config = JobConfig(input=str(sample_images), output=str(tmp_path), model="stub", batch_size=2, tasks="caption")
    names = sorted(p.name for p in sample_images.iterdir() if p.name.startswith("scene"))[:7]
    reported = []
    ShardProcessor(config, captioner=_Stub()).process(
        Shard(0, ShardKind.FILES, tuple(str(sample_images / n) for n in names)), progress=reported.append
    )
    assert sum(reported) == 7 and max(reported) <= 2 and len(reported) >= 4  # batches of at most 2


def _stats(shard_id, rows):
    return ShardStats(shard_id, "p", "s", 1, rows, rows, 0, {}, 1.0, 0.0, 1.0, "", 1)


def test_the_bar_moves_inside_a_shard_and_the_interrupt_says_what_is_kept():
    bar = ProgressBar()
    assert "before any shard started" in bar.interrupted()
    bar.started(shards_total=4, shards_done=1, replicas=1)
    for shard_id in (1, 2):
        bar.shard_queued(Shard(shard_id, ShardKind.FILES, tuple(f"x/{i}.jpg" for i in range(10))))
    bar.images_done(1, 4)
    bar.images_done(2, 5)
    task = bar._progress.tasks[0]
    assert task.completed == pytest.approx(1 + 0.4 + 0.5) and task.fields["images"] == 9
    bar.shard_done(_stats(1, 10))
    bar.images_done(1, 3)  # a late report of a finished shard changes nothing
    assert bar._progress.tasks[0].fields["images"] == 15 and bar.images_running == 5
    assert bar.interrupted() == (
        "interrupted: 2 of 4 shards are saved (10 images by this run); 1 unfinished shard "
        "(5 images captioned so far) will be redone; rerun the same command to resume"
    )


def test_ctrl_c_is_one_line_saying_what_is_kept(sample_images, tiny_llava, tmp_path, monkeypatch):
    def interrupted_run(config, observer):
        observer.started(3, 0, 1)
        observer.shard_queued(Shard(0, ShardKind.FILES, ("a.jpg", "b.jpg")))
        observer.images_done(0, 1)
        raise KeyboardInterrupt

    monkeypatch.setattr("loupe.jobs.runner.run_job", interrupted_run)
    result = _invoke("run", sample_images, tmp_path / "out", "--model", tiny_llava)
    assert result.exit_code == 130
    assert _one_line(result) == (
        "loupe: interrupted: 0 of 3 shards are saved (0 images by this run); 1 unfinished shard "
        "(1 images captioned so far) will be redone; rerun the same command to resume"
    )


# -- one real job, shared ------------------------------------------------------------------


class _Recording(ProgressBar):
    seen: ClassVar[list] = []

    def images_done(self, shard_id, images):
        type(self).seen.append((shard_id, images))
        super().images_done(shard_id, images)


@pytest.fixture(scope="module")
def job(ray_cluster, sample_images, tiny_llava, tiny_clip, tmp_path_factory):
    """One CLI run with every task and a custom category no image reaches, its progress recorded."""
    root = tmp_path_factory.mktemp("console")
    taxonomy = root / "policy.toml"
    taxonomy.write_text('[[category]]\nkey = "spacecraft"\ndefinition = "a spacecraft"\nthreshold = 1.0\n')
    out = root / "out"
    patch = pytest.MonkeyPatch()
    patch.setattr(cli, "ProgressBar", _Recording)
    began = time.monotonic()
    result = _invoke("run", sample_images, out, "--model", tiny_llava, "--image-embedding-model", tiny_clip,
                     "--max-new-tokens", "3", "--shard-size", "7", "--batch-size", "2", "--taxonomy", taxonomy)
    wall = time.monotonic() - began
    patch.undo()
    assert result.exit_code == 0, result.output
    return {"out": out, "result": result, "wall": wall, "seen": list(_Recording.seen), "root": root}


def test_the_observer_sees_per_batch_image_counts(job):
    seen = job["seen"]
    assert seen and {shard for shard, _ in seen} <= {0, 1}
    # At most every image the models ran on (the two broken files never do): a replica's last
    # report may reach the counter after the driver's last look, and the shard's stats count instead.
    assert 0 < sum(n for _, n in seen) <= 12


def test_the_summary_lists_every_category_and_says_its_wall_time(job):
    out = job["result"].stdout
    assert "0 spacecraft" in out  # extends the default taxonomy; flagged nothing
    seconds = float(out.split("images in ")[1].split(" s wall time")[0])
    assert 0 < seconds <= job["wall"]
    status = json.loads(_invoke("status", job["out"], "--json").stdout)
    assert status["flagged"]["spacecraft"] == 0
    assert "0 spacecraft" in _invoke("status", job["out"]).stdout


def test_search_results_take_two_lines_at_80_columns(job):
    result = _invoke("search", job["out"], "a red square", "-k", "5", env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert len(lines) == 10 and max(len(line) for line in lines) <= 80
    assert lines[0].lstrip().startswith("1. ") and ".png" in lines[0] or ".jpg" in lines[0]


def test_exclude_flagged_that_leaves_nothing_says_so(job):
    result = _invoke("search", job["out"], "a red square", "--flagged", "spacecraft")
    assert result.exit_code == 0 and result.stdout.strip() == "no results: no image is flagged for spacecraft"


def test_partial_output_says_how_far_and_how_to_finish(job, sample_images, tiny_llava):
    partial = job["root"] / "partial"
    shutil.copytree(job["out"], partial)
    (partial / MANIFEST_FILE).unlink()
    (partial / stats_path(1)).unlink()
    line = _one_line(_invoke("search", partial, "a red square"))
    assert "holds a partial job (1 of 2 shards done)" in line
    assert f"finish it with: loupe run {sample_images} {partial} --model {tiny_llava}" in line
    status = _invoke("status", partial).stdout
    assert "no: partial, 1 of 2 shards to go; finish with:" in status and "--shard-size 7" in status


def test_overwrite_leaves_nothing_of_the_old_job(job, sample_images, tiny_llava):
    out = job["root"] / "replaced"
    shutil.copytree(job["out"], out)
    assert (out / "index" / "image").is_dir()
    result = _invoke("run", sample_images, out, "--model", tiny_llava, "--max-new-tokens", "3", "--shard-size", "7",
                     "--tasks", "caption", "--overwrite")
    assert result.exit_code == 0, result.output
    # Only what a fresh caption-only job writes (on local disk the emptied folders stay, holding nothing).
    files = {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()}
    assert files == {"_job.json", "_plan.parquet", "_manifest.json", "_stats/shard-00000.json",
                     "_stats/shard-00001.json", "parts/part-00000.parquet", "parts/part-00001.parquet"}
    assert "flagged" not in result.stdout  # moderation did not run: nothing said about it
    assert "flagged" not in _invoke("status", out).stdout
    line = _one_line(_invoke("search", out, "a red square"))
    assert "did not run the embed task" in line


# -- 80 columns, without a job ---------------------------------------------------------------


def test_hits_fit_80_columns_in_two_lines_each():
    long_name = "s3://bucket/" + "very-long-folder-name/" * 5 + "an-image-with-a-long-name-0001.jpg"
    flags = ["sexual_explicit", "nudity_suggestive", "violence_gore", "drugs_alcohol_tobacco"]
    hits = [Hit(i, 0.5, "0" * 32, long_name, "a caption " * 20, flags if i % 2 else []) for i in range(1, 4)]
    buffer = StringIO()
    print_hits(hits, Console(file=buffer, width=80))
    lines = buffer.getvalue().splitlines()
    assert len(lines) == 6 and max(len(line) for line in lines) <= 80
    assert lines[0].endswith("flagged: sexual_explicit +3") and "0001.jpg" in lines[0]
    assert lines[1].startswith("      a caption a caption")


# -- help and everyday noise ---------------------------------------------------------------


def test_help_shows_defaults_and_no_bool_labels():
    run_help = _invoke("run", "--help", env={"COLUMNS": "200"}).stdout
    assert "<bool>" not in run_help and "(default: 1000)" in run_help and "(default: llava-hf/llava-1.5-7b-hf)" in run_help
    search_help = _invoke("search", "--help", env={"COLUMNS": "200"}).stdout
    assert "<bool>" not in search_help and " -k " in search_help and "--k " not in search_help
    assert "<bool>" not in _invoke("moderation", "evaluate", "--help", env={"COLUMNS": "200"}).stdout
    version = _invoke("--version")
    assert version.exit_code == 0 and version.stdout.startswith("loupe ")


def test_random_clip_says_its_vectors_are_noise_without_a_shard_bar(tmp_path):
    result = _invoke("random-model", tmp_path / "clip", "--family", "clip")
    assert result.exit_code == 0
    assert "its vectors are noise" in result.stdout and "captions" not in result.stdout
    assert "Writing model shards" not in result.output


# -- mistakes, one line each ------------------------------------------------------------------


def test_output_that_is_a_file_is_refused_at_once(sample_images, tiny_llava, tmp_path):
    afile = tmp_path / "out.txt"
    afile.write_text("x")
    result = _invoke("run", sample_images, afile, "--model", tiny_llava)
    assert result.exit_code == 2 and "is a file" in _one_line(result)


@pytest.mark.parametrize(
    ("flag", "value", "names"),
    [
        ("--model", "./models/lava", "set it with --model, or leave caption out of --tasks"),
        ("--image-embedding-model", "/no/such/clip", "set it with --image-embedding-model, or leave embed out of --tasks"),
    ],
)
def test_a_missing_model_path_fails_at_once_naming_its_flag(sample_images, tiny_llava, tmp_path, flag, value, names):
    args = ["run", sample_images, tmp_path / "out", "--model", tiny_llava, flag, value]
    began = time.monotonic()
    result = _invoke(*args)
    assert result.exit_code == 2
    line = _one_line(result)
    assert "no such local folder" in line and names in line
    assert time.monotonic() - began < 30  # no hub retries (mostly import time on a loaded machine)


def test_an_unreachable_hub_is_probed_once_quickly(sample_images, tiny_llava, tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    began = time.monotonic()
    result = _invoke("run", sample_images, tmp_path / "out", "--model", "someone/no-such-model")
    assert result.exit_code == 2
    line = _one_line(result)
    assert "the hub cannot be reached" in line and "--model" in line
    assert time.monotonic() - began < 30


def test_the_bench_report_reads_in_order_and_fits_80_columns():
    from loupe.jobs.bench.report import STAGES, format_table

    rates = {"images_per_second": 9.44, "tokens_per_second": 604.3, "images": 96, "seconds": 10.17}
    result = {
        "date": "2026-12-02T12:00:00+00:00", "command": "loupe bench --size small --repeats 3",
        "machine": {"cpus": 2, "memory_gb": 23.5, "gpu": None, "torch": "2.14", "transformers": "5.24"},
        "model": {"family": "llava", "size": "small", "parameters": 9.9e7, "dtype": "float32", "device": "cpu",
                  "torch_threads": 2},
        "workload": {"images": 96, "image_sizes": {"640x480": 96}, "mean_jpeg_kb": 40.2, "prompt_tokens_mean": 80.0,
                     "new_tokens": 64, "batch_size": 8, "shards": 2, "shard_size": 48},
        "arguments": {"tasks": ["caption"]},
        "end_to_end": rates | {"job_seconds": 14.2}, "model_alone": rates, "naive": rates,
        "efficiency": 1.236, "speedup_over_naive": 6.17,
        "repeats": [{"efficiency": e} for e in (1.19, 1.236, 1.31)],
        "seconds_per_image": {stage: 0.01 for stage in STAGES}, "stage_notes": dict(STAGES),
        "gpu_memory_peak_bytes": None, "targets": {},
    }
    table = format_table(result, width=80)
    lines = table.splitlines()
    assert max(len(line) for line in lines) <= 80
    numbered = [line.split(".")[0] for line in lines if line[:2] in ("1.", "2.", "3.", "4.", "5.")]
    assert numbered == ["1", "2", "3", "4", "5"]
    assert "noise" in table and "run_job" not in table and "started_at" not in table
    for line in lines:  # wrapped between words: every word of a line is whole
        assert not line.endswith("-") or line.endswith(" -")


def test_the_run_summary_says_when_an_index_falls_short_of_its_target(capsys):
    from loupe.jobs.console import print_summary
    from loupe.jobs.runner import JobResult
    from loupe.schemas.records import IndexRecord

    note = "recall@10 0.790 falls short of the target 0.95: no finer code fits in 192 MB; the chooser expects a budget of 530 MB to reach it"
    record = IndexRecord(
        kind="ivf_pq", factory="OPQ175_700,IVF1024_HNSW32,PQ175x8np", params={}, vectors=1_000_000, dim=768,
        recall_at_10=0.79, target_recall=0.95, build_seconds=1.0, target_note=note, budget_for_target=530_000_000,
    )
    result = JobResult(
        output="out", shards_total=1, shards_done=1, shards_skipped=0, rows_ok=1, rows_error=0, seconds=1.0,
        images_this_run=1, indexes={"image": record},
    )
    print_summary(result, JobConfig(input="in", output="out"), 1.0)
    shown = " ".join(capsys.readouterr().out.split())
    assert "image index 1000000 vectors, OPQ175_700,IVF1024_HNSW32,PQ175x8np, recall@10 0.790" in shown
    assert " ".join(note.split()) in " ".join(shown.replace("│", " ").split())
