"""The moderation cost benchmark runs and reports consistent figures (its speed targets are not tested here)."""

import json

from loupe.jobs.bench.moderation import STAGES
from loupe.jobs.cli import app
from typer.testing import CliRunner

runner = CliRunner()


def _invoke(*args):
    result = runner.invoke(app, ["bench", "moderation", *args])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result


def test_benchmark_runs_on_a_tiny_model():
    result = _invoke(
        "--family", "llava-next", "--size", "tiny", "--images", "3", "--batch-size", "2",
        "--max-new-tokens", "2", "--repeats", "2", "--threads", "1", "--json",
    )
    assert result.exit_code == 0, result.output
    result = json.loads(result.stdout)
    seconds = result["seconds_per_image"][result["clock"]]
    assert set(STAGES) <= seconds.keys()
    assert all(seconds[stage] > 0 for stage in STAGES)
    # the ratio of the unrounded medians; the printed seconds are rounded to 10 µs
    assert abs(result["moderation_over_prefill"] - seconds["moderation_added"] / seconds["prefill"]) < 0.02
    assert result["tokens"]["instruction"] > 0 and result["tokens"]["suffixes_per_image"] > 0
    assert len(result["seconds_per_image_all_repeats"]["wall"]["caption"]) == 2
    assert set(result["targets_met"]) == {"moderation adds <= 1 prefill", "naive >= 5x what moderation adds"}


def test_table_output():
    result = _invoke("--size", "tiny", "--images", "2", "--batch-size", "2", "--max-new-tokens", "1", "--repeats", "1")
    assert result.exit_code == 0, result.output
    assert "what moderation adds" in result.stdout and "targets, on" in result.stdout


def test_bad_flags_are_one_line_and_exit_2():
    for args, message in ((["--family", "gpt"], "--family"), (["--repeats", "0"], "--repeats")):
        result = _invoke(*args)
        assert result.exit_code == 2, result.output
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and message in lines[0] and "Traceback" not in result.output, result.stderr
