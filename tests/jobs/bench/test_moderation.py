"""The moderation cost benchmark runs and reports consistent figures (its speed targets are not tested here)."""

import json

from loupe.jobs.bench import moderation as bench_moderation


def test_benchmark_runs_on_a_tiny_model(capsys):
    assert bench_moderation.main(
        ["--family", "llava-next", "--size", "tiny", "--images", "3", "--batch-size", "2",
         "--max-new-tokens", "2", "--repeats", "2", "--threads", "1", "--json"]
    ) == 0
    result = json.loads(capsys.readouterr().out)
    seconds = result["seconds_per_image"][result["clock"]]
    assert set(bench_moderation.STAGES) <= seconds.keys()
    assert all(seconds[stage] > 0 for stage in bench_moderation.STAGES)
    # the ratio of the unrounded medians; the printed seconds are rounded to 10 µs
    assert abs(result["moderation_over_prefill"] - seconds["moderation_added"] / seconds["prefill"]) < 0.02
    assert result["tokens"]["instruction"] > 0 and result["tokens"]["suffixes_per_image"] > 0
    assert len(result["seconds_per_image_all_repeats"]["wall"]["caption"]) == 2
    assert set(result["targets_met"]) == {"moderation adds <= 1 prefill", "naive >= 5x what moderation adds"}


def test_table_output(capsys):
    bench_moderation.main(["--size", "tiny", "--images", "2", "--batch-size", "2", "--max-new-tokens", "1", "--repeats", "1"])
    out = capsys.readouterr().out
    assert "what moderation adds" in out and "targets, on" in out
