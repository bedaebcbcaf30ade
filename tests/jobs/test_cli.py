"""The CLI: one clear line and a non-zero exit for user mistakes, JSON status for scripts."""

import json

import pytest
from typer.testing import CliRunner

from loupe.jobs.cli import app

runner = CliRunner()


def _invoke(*args):
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result


def _error_line(result):
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.output
    return lines[0]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["run", "/nonexistent/in", "{out}", "--model", "{model}"], "no such file or folder"),
        (["run", "{images}", "{out}", "--model", "/nonexistent/model"], "not found"),
        (["run", "{images}", "{out}", "--model", "{model}", "--batch-size", "0"], "batch_size"),
        (["run", "{images}", "{out}", "--model", "{model}", "--config", "/nonexistent.toml"], "does not exist"),
        (["run", "{images}", "{out}", "--model", "{model}", "--endpoint-url", "nope"], "endpoint_url"),
        (["status", "{out}"], "no loupe job"),
        (["random-model", "{tmp}/m", "--family", "gpt"], "family"),
    ],
)
def test_user_mistakes_are_one_line_and_exit_2(args, message, sample_images, tiny_llava, tmp_path):
    fill = {"images": sample_images, "out": tmp_path / "out", "model": tiny_llava, "tmp": tmp_path}
    result = _invoke(*[a.format(**{k: str(v) for k, v in fill.items()}) for a in args])
    assert result.exit_code == 2
    assert message in _error_line(result)
    assert not (tmp_path / "out").exists()


def test_missing_bucket_and_unreachable_endpoint(s3_endpoint, tiny_llava, tmp_path):
    result = _invoke("run", "s3://no-such-bucket-loupe/x/", tmp_path / "out", "--model", tiny_llava,
                     "--endpoint-url", s3_endpoint)
    assert result.exit_code == 2 and "no-such-bucket-loupe" in _error_line(result)
    result = _invoke("run", "s3://b/x/", tmp_path / "out", "--model", tiny_llava,
                     "--endpoint-url", "http://127.0.0.1:9")
    assert result.exit_code == 2 and "127.0.0.1:9" in _error_line(result)


@pytest.mark.usefixtures("ray_cluster")
def test_run_then_status_json_and_refusal(sample_images, tiny_llava, tmp_path):
    out = tmp_path / "out"
    common = ["run", sample_images, out, "--model", tiny_llava, "--max-new-tokens", "3", "--shard-size", "7",
              "--tasks", "caption,moderate"]
    result = _invoke(*common)
    assert result.exit_code == 0, result.output
    assert "12 ok, 2 error" in result.stdout

    status = json.loads(_invoke("status", out, "--json").stdout)
    assert {k: status[k] for k in ("shards_total", "shards_done", "rows_ok", "rows_error", "complete")} == {
        "shards_total": 2, "shards_done": 2, "rows_ok": 12, "rows_error": 2, "complete": True,
    }
    assert "2/2 done" in _invoke("status", out).stdout

    refused = _invoke(*common, "--prompt", "Name the colours.")
    assert refused.exit_code == 2 and "--overwrite" in _error_line(refused)
    replaced = _invoke(*common, "--prompt", "Name the colours.", "--overwrite")
    assert replaced.exit_code == 0, replaced.output


def test_config_file_is_used(sample_images, tiny_llava, tmp_path):
    job = tmp_path / "job.toml"
    job.write_text(f'model = "{tiny_llava}"\nshard-size = 0\n')
    result = _invoke("run", sample_images, tmp_path / "out", "--config", job)
    assert result.exit_code == 2 and "shard_size" in _error_line(result) and "job.toml" in result.stderr
