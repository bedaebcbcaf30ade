"""The `loupe bench` command group: routing to each benchmark, a light import that changes nothing."""

import json
import os
import subprocess
import sys

from loupe.jobs.cli import app
from typer.testing import CliRunner

runner = CliRunner()


def test_importing_the_cli_and_the_benchmarks_loads_no_framework_and_sets_nothing():
    code = """
import json, os, sys
before = dict(os.environ)
import loupe.jobs.cli
light = sorted(m for m in ("torch", "transformers", "ray", "faiss") if m in sys.modules)
import loupe.jobs.bench.job, loupe.jobs.bench.moderation
print(json.dumps({"light": light, "changed": sorted(set(os.environ.items()) ^ set(before.items()))}))
"""
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "TOKENIZERS_PARALLELISM")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert json.loads(out) == {"light": [], "changed": []}


def test_job_flags_before_another_benchmark_are_refused_in_one_line():
    result = runner.invoke(app, ["bench", "--size", "tiny", "moderation", "--help"])  # --help: nothing runs if not refused
    assert result.exit_code == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "loupe bench job" in lines[0], result.stderr


def test_index_benchmark_runs_with_its_flags():
    args = ["--vectors", "2000", "--dim", "16", "--queries", "20", "--budget-fraction", "2", "--seed", "1", "--json"]
    result = runner.invoke(app, ["bench", "index", *args])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert (data["vectors"], data["dim"], data["memory_budget"]) == (2000, 16, 2 * 4 * 2000 * 16)
    assert data["index"]["recall_at_10"] >= 0.95 and data["flat"]["latency_queries"] > 0
