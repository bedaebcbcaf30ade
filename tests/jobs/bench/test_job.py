"""`loupe bench [job]` end to end on a tiny model (local and S3), its JSON fields, and flags refused in one line."""

import json
import math
import os
from dataclasses import fields

import pytest
from loupe.jobs.bench.measure import Phase, job_batches, model_alone
from loupe.jobs.bench.options import BenchOptions
from loupe.jobs.bench.photos import make_photos
from loupe.jobs.bench.report import STAGES, format_table
from loupe.jobs.cli import app
from typer.testing import CliRunner

runner = CliRunner()
TINY = ["--size", "tiny", "--images", "8", "--batch-size", "4", "--max-new-tokens", "4", "--naive-images", "2"]


def _invoke(*args):
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """Shared by the runs of this module, so the tiny checkpoint and the images are made once."""
    return tmp_path_factory.mktemp("bench")


def _check(result, *, images, tasks):
    assert result["arguments"]["tasks"] == tasks
    assert result["workload"]["images"] == images and result["workload"]["shards"] == 2
    assert result["machine"]["cpus"] == os.cpu_count() and result["machine"]["torch"]
    for phase in ("end_to_end", "model_alone", "naive"):
        assert result[phase]["images_per_second"] > 0 and result[phase]["tokens_per_second"] > 0
    assert result["end_to_end"]["images"] == result["model_alone"]["images"] == images
    e2e, alone, naive = (result[p]["images_per_second"] for p in ("end_to_end", "model_alone", "naive"))
    assert math.isclose(result["efficiency"], e2e / alone, rel_tol=1e-3, abs_tol=1e-4)  # rates rounded to 4 places
    assert math.isclose(result["speedup_over_naive"], e2e / naive, rel_tol=1e-3, abs_tol=1e-4)
    assert result["end_to_end"]["job_seconds"] > result["end_to_end"]["seconds"]  # start-up not counted
    per_image = result["seconds_per_image"]
    assert list(per_image) == list(STAGES)
    for stage in ("fetch", "decode", "preprocess", "vision_tower", "prefill", "decode_steps", "write"):
        assert per_image[stage] > 0, stage
    for stage in ("moderate", "embed"):
        assert (per_image[stage] is not None and per_image[stage] > 0) == (stage in tasks), stage
    assert result["gpu_memory_peak_bytes"] is None and result["model"]["device"] == "cpu"


@pytest.mark.usefixtures("ray_cluster")
def test_bench_local_json(workdir):
    result = _invoke("bench", *TINY, "--workdir", workdir, "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    _check(data, images=8, tasks=["caption"])
    assert data["command"] == f"loupe bench {' '.join(TINY)} --workdir {workdir}"
    assert data["targets"] == {}  # the targets are for small on a CPU and 7b on a GPU
    assert data["model"]["torch_threads"] >= 1 and data["workload"]["new_tokens"] == 4
    assert not list((workdir / "runs").iterdir()), "the job's output is removed after reading its stats"

    table = format_table(data)
    for text in ("1. end to end", "2. model alone", "3. pipeline efficiency", "4. naive", "vision_tower", "decode_steps"):
        assert text in table


@pytest.mark.usefixtures("ray_cluster")
def test_bench_s3_all_tasks(workdir, s3_endpoint, s3_client):
    from loupe.jobs.bench.job import run_bench

    options = BenchOptions(
        size="tiny", images=8, batch_size=4, max_new_tokens=4, naive_images=2, tasks="embed,moderate,caption",
        source="s3", endpoint_url=s3_endpoint, workdir=str(workdir),
    )
    buckets = {b["Name"] for b in s3_client.list_buckets()["Buckets"]}
    result = run_bench(options)
    _check(result, images=8, tasks=["caption", "moderate", "embed"])
    assert result["arguments"]["source"] == "s3"
    assert {b["Name"] for b in s3_client.list_buckets()["Buckets"]} == buckets, "the bench's bucket is removed"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--family", "gpt"], "--family"),
        (["--size", "huge"], "--size"),
        (["--images", "0"], "--images"),
        (["--batch-size", "0"], "--batch-size"),
        (["--tasks", "caption,translate"], "--tasks"),
        (["--tasks", "moderate"], "caption"),
        (["--source", "ftp"], "--source"),
        (["--device", "tpu"], "--device"),
        (["--endpoint-url", "http://127.0.0.1:9"], "--source s3"),
        (["--size", "7b", "--device", "cpu"], "GPU"),
    ],
)
@pytest.mark.parametrize("command", [["bench"], ["bench", "job"]])
def test_bad_flags_are_one_line_and_exit_2(command, args, message, tmp_path):
    result = _invoke(*command, *args, "--workdir", tmp_path / "work")
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in result.output, result.stderr
    assert not (tmp_path / "work").exists(), "nothing is built before the flags are known to be good"


def test_cuda_without_a_gpu_is_refused(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    result = _invoke("bench", "--device", "cuda", "--workdir", tmp_path / "work")
    assert result.exit_code == 2 and "no CUDA GPU" in result.stderr
    assert len([line for line in result.stderr.splitlines() if line.strip()]) == 1


def test_cli_defaults_are_the_library_defaults():
    import inspect

    from loupe.jobs.bench.commands import job

    params = inspect.signature(job).parameters
    for field in fields(BenchOptions):
        if field.name in params:
            assert params[field.name].default == field.default, field.name


def test_photos_are_varied_realistic_jpegs_and_reproducible(tmp_path):
    from PIL import Image

    paths = make_photos(tmp_path / "a", 12, seed=3)
    sizes = set()
    for path in paths:
        with Image.open(path) as image:
            assert image.format == "JPEG"
            sizes.add(image.size)
            bits_per_pixel = path.stat().st_size * 8 / (image.width * image.height)
            assert 1.0 < bits_per_pixel < 4.0  # camera JPEGs, not flat synthetic shapes (< 0.3)
    assert len(sizes) >= 5 and len({w / h for w, h in sizes}) >= 3
    again = make_photos(tmp_path / "b", 12, seed=3)
    assert [p.read_bytes() for p in paths] == [p.read_bytes() for p in again]


class _Image:
    def __init__(self, width):
        self.size = (width, 10)


class _Counter:
    """Prompt length = image width, as anyres makes it depend on the size."""

    def image_tokens(self, sizes):
        return [w for w, _ in sizes]


def test_batches_follow_shards_and_buckets_like_the_job():
    images = [_Image(w) for w in (5, 1, 4, 2, 3, 9, 8, 7, 6, 0)]
    widths = lambda batches: [[image.size[0] for image in batch] for batch in batches]  # noqa: E731
    assert widths(job_batches(images, 3, 5)) == [[5, 1, 4], [2, 3], [9, 8, 7], [6, 0]]
    # shards of 5 (windows of BUCKET_BATCHES * 3 hold a whole shard), sorted within each
    assert widths(job_batches(images, 3, 5, _Counter())) == [[1, 2, 3], [4, 5], [0, 6, 7], [8, 9]]


def test_model_alone_halves_join_into_one_turn():
    from collections import Counter

    first = Phase(images=4, seconds=2.0, tokens=16, stages=Counter(generate=1.5, moderate=0.0), prompt_tokens=10)
    second = Phase(images=12, seconds=4.0, tokens=48, stages=Counter(generate=3.5), memory=7, prompt_tokens=20)
    turn = first.joined(second)
    assert (turn.images, turn.seconds, turn.tokens, turn.memory) == (16, 6.0, 64, 7)
    assert dict(turn.stages) == {"generate": 5.0, "moderate": 0.0}  # a stage that took no time is still reported
    assert turn.prompt_tokens == pytest.approx((4 * 10 + 12 * 20) / 16)  # weighted by images
    # a one-batch run has nothing to run before the job: that half is empty and adds nothing
    empty = model_alone(None, [], None)
    assert empty.joined(second).rates() == second.rates()
