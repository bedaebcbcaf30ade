"""The chaos run, short: every fault at once on a job over two Ray nodes ends in a clean run's output.

`loupe bench chaos` runs the same on 300+ images (docs/reliability.md); here 100 keep it short.
"""

from loupe.jobs.bench.chaos import run_chaos


def test_a_short_chaos_run_ends_in_a_clean_runs_output(ray_cluster, tmp_path):
    report = run_chaos(tmp_path, images=100, seed=1, shard_size=10, shard_timeout_s=10, cluster=ray_cluster)
    print(report.to_dict())
    assert report.rows == 100 and report.rows_lost == 0 and report.duplicates == 0
    assert report.rows_differing == 0, report.notes
    # The hang is injected every time; what ends it depends on the schedule: the shard timeout
    # (hung_replicas), or the node loss or the full-OUTPUT stop reaching that replica first.
    # Either way the output must equal the clean run's (asserted above).
    for fault in ("plan_hang", "node_lost", "second_driver_refused", "output_full_stops", "plan_oom",
                  "plan_model_raise", "orphan_multipart_upload"):
        assert report.injected.get(fault, 0) >= 1, (fault, report.injected)
    assert report.injected["rows_retried"] == report.injected["read_failed_rows"] == 3
    assert sum(v for k, v in report.injected.items() if k.startswith("s3_")) > 0
