"""A `loupe run` killed with SIGKILL mid-job resumes to exactly the rows of a clean run."""

import os
import signal
import subprocess
import sys
import time

import pyarrow.parquet as pq

from loupe.jobs.runner import run_job
from loupe.schemas.config import JobConfig
from loupe.schemas.layout import MANIFEST_FILE, STATS_DIR
from loupe.schemas.records import Manifest


def _rows(output):
    manifest = Manifest.from_json((output / MANIFEST_FILE).read_bytes())
    rows = [r for p in manifest.parts for r in pq.read_table(output / p["path"]).to_pylist()]
    return sorted(rows, key=lambda r: r["image_id"])


def test_sigkill_then_rerun_equals_clean_run(ray_cluster, sample_images, tiny_llava, tmp_path):
    killed, clean = tmp_path / "killed", tmp_path / "clean"
    args = ["--model", tiny_llava, "--shard-size", "1", "--max-new-tokens", "8", "--replicas", "1",
            "--tasks", "caption,moderate"]
    command = [sys.executable, "-m", "loupe.jobs.cli", "run", str(sample_images), str(killed), *args,
               "--ray-address", ray_cluster.address]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 180
    while time.time() < deadline and process.poll() is None:
        if (killed / STATS_DIR).exists() and len(list((killed / STATS_DIR).iterdir())) >= 3:
            break
        time.sleep(0.05)
    assert process.poll() is None, process.stderr.read().decode()
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    done_when_killed = len(list((killed / STATS_DIR).iterdir()))
    assert 3 <= done_when_killed < 14
    assert not (killed / MANIFEST_FILE).exists()

    rerun = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert "already done" in rerun.stderr

    config = JobConfig(
        input=str(sample_images), output=str(clean), model=tiny_llava, shard_size=1, max_new_tokens=8,
        tasks="caption,moderate",
    )
    run_job(config)
    assert _rows(killed) == _rows(clean)
    assert len(list((killed / "parts").iterdir())) == 14
