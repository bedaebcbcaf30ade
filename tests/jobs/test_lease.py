"""The OUTPUT lease on a local folder and on S3: one holder at a time, kept alive by renewal, taken over when dead."""

from __future__ import annotations

import os
import socket
import threading
import time

import pytest

from loupe.jobs.lease import Lease, LeaseHeld, LeaseLost, LeaseRecord
from loupe.schemas.layout import LEASE_FILE
from loupe.workers.s3 import S3Storage
from loupe.workers.storage import LocalStorage, join_uri
from loupe.jobs.bench.faulty_s3 import DROP_REPLY, RESET_GET, SLOWDOWN, Fault, FaultyS3


@pytest.fixture(params=["local", "s3"])
def output(request, tmp_path):
    """(storage, OUTPUT URI) on each backend."""
    if request.param == "local":
        return LocalStorage(), str(tmp_path / "out")
    bucket = request.getfixturevalue("s3_bucket")
    return S3Storage(endpoint_url=request.getfixturevalue("s3_endpoint")), f"s3://{bucket}/out"


def _record(storage, out: str) -> LeaseRecord:
    return LeaseRecord.from_json(storage.read_bytes(join_uri(out, LEASE_FILE)))


def _stale(storage, out: str, age_s: float, expiry_s: float = 10.0) -> None:
    """The lease a dead driver on another host left behind, last renewed `age_s` ago."""
    then = time.time() - age_s
    record = LeaseRecord("dead-holder", "gone-host", 4242, then - 100, then, expiry_s)
    assert storage.create_exclusive(join_uri(out, LEASE_FILE), record.to_json())


def test_two_acquirers_started_together_one_is_refused(output):
    storage, out = output
    barrier = threading.Barrier(2)
    outcomes: list = [None, None]

    def acquire(i: int) -> None:
        barrier.wait()
        try:
            outcomes[i] = Lease.acquire(storage, out, expiry_s=30)
        except LeaseHeld as exc:
            outcomes[i] = exc

    threads = [threading.Thread(target=acquire, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    leases = [o for o in outcomes if isinstance(o, Lease)]
    refusals = [str(o) for o in outcomes if isinstance(o, LeaseHeld)]
    assert len(leases) == len(refusals) == 1
    (refusal,) = refusals
    assert "\n" not in refusal and out in refusal
    assert f"{socket.gethostname()} pid {os.getpid()}, last renewed " in refusal and " ago at " in refusal
    with leases[0] as lease:
        assert _record(storage, out).holder == lease.record.holder and lease.taken_from is None
    assert not storage.exists(join_uri(out, LEASE_FILE))  # released
    Lease.acquire(storage, out).release()  # free again


def test_a_lease_not_renewed_past_its_expiry_is_taken_over(output):
    storage, out = output
    _stale(storage, out, age_s=60, expiry_s=10)
    with Lease.acquire(storage, out, expiry_s=30) as lease:
        record = _record(storage, out)
        assert record.holder == lease.record.holder != "dead-holder"
        assert (record.host, record.pid) == (socket.gethostname(), os.getpid())
        assert lease.taken_from.holder == "dead-holder"


def test_a_lease_within_its_expiry_is_not_taken_over(output):
    storage, out = output
    _stale(storage, out, age_s=5, expiry_s=60)
    with pytest.raises(LeaseHeld, match=r"in use by another loupe run \(gone-host pid 4242, last renewed \d+s ago at "):
        Lease.acquire(storage, out)
    assert _record(storage, out).holder == "dead-holder"


@pytest.mark.parametrize("command", [["index"], ["match", "LIST"], ["dedup"], ["moderation", "propagate"]])
def test_a_command_that_writes_under_output_is_refused_while_a_run_holds_it(output, command, tmp_path):
    from typer.testing import CliRunner

    from loupe.jobs.cli import app

    storage, out = output
    _stale(storage, out, age_s=5, expiry_s=60)  # a run on another host, renewed 5 s ago
    endpoint = ["--endpoint-url", storage.endpoint_url] if out.startswith("s3://") else []
    known = tmp_path / "known.csv"
    known.write_text("f" * 64 + ",known\n")
    args = [*command[:-1], out, str(known)] if command[-1] == "LIST" else [*command, out]
    result = CliRunner().invoke(app, [*args, *endpoint])
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1, result.output
    assert "in use by another loupe run (gone-host pid 4242" in lines[0]
    assert _record(storage, out).holder == "dead-holder"  # the run's lease is left as it was


def test_renewal_keeps_the_lease_alive(output):
    storage, out = output
    with Lease.acquire(storage, out, expiry_s=1.0, renew_every_s=0.2) as lease:
        first = _record(storage, out)
        time.sleep(2.5)  # well past the expiry: only renewal keeps it
        with pytest.raises(LeaseHeld):
            Lease.acquire(storage, out, expiry_s=1.0, renew_every_s=0.2)
        renewed = _record(storage, out)
        assert renewed.holder == first.holder and renewed.heartbeat >= first.heartbeat + 1.5
        lease.check()
    with Lease.acquire(storage, out, expiry_s=1.0, renew_every_s=0.2):
        pass


def test_a_holder_whose_lease_was_taken_over_notices(output):
    storage, out = output
    lease = Lease.acquire(storage, out, expiry_s=1.0, renew_every_s=0.2)
    taker = LeaseRecord("taker", "other-host", 7, time.time(), time.time(), 60)
    storage.write_bytes(join_uri(out, LEASE_FILE), taker.to_json())  # as a takeover would
    deadline = time.monotonic() + 10
    with pytest.raises(LeaseLost, match="lost the lease on .* to other-host pid 7"):
        while time.monotonic() < deadline:
            lease.check()
            time.sleep(0.05)
    lease.release()
    assert _record(storage, out).holder == "taker"  # releasing never deletes another's lease


def test_renew_interval_is_bounded_by_the_expiry(tmp_path):
    with pytest.raises(ValueError, match="renew_every_s"):
        Lease.acquire(LocalStorage(), str(tmp_path), expiry_s=10, renew_every_s=6)


def test_the_lease_holds_through_a_misbehaving_s3(s3_endpoint, s3_bucket):
    out = f"s3://{s3_bucket}/out"
    lease_path = f"/{s3_bucket}/out/{LEASE_FILE}"
    with FaultyS3(s3_endpoint, seed=9, rates={SLOWDOWN: 0.05, DROP_REPLY: 0.05, RESET_GET: 0.05}) as faulty:
        storage = S3Storage(endpoint_url=faulty.url, backoff_s=0.01)
        # The create's reply is lost, then two renewals' replies; reads of the record are cut.
        faulty.script(*[Fault(DROP_REPLY, f"PUT {lease_path}")] * 3, *[Fault(RESET_GET, f"GET {lease_path}")] * 2)
        with Lease.acquire(storage, out, expiry_s=4.0, renew_every_s=0.25) as lease:
            time.sleep(3)
            lease.check()
            with pytest.raises(LeaseHeld):
                Lease.acquire(storage, out)
    print(f"\nfaults met by the lease: {dict(sorted(faulty.counts.items()))}")
    assert faulty.counts[DROP_REPLY] >= 3 and faulty.counts[RESET_GET] >= 2
    assert not S3Storage(endpoint_url=s3_endpoint).exists(join_uri(out, LEASE_FILE))


def test_a_lease_whose_holder_died_on_this_host_is_taken_over_at_once(tmp_path):
    import subprocess
    import sys

    storage, out = LocalStorage(), str(tmp_path / "out")
    # A driver that took the lease and was killed: its record stays, renewed a moment ago.
    code = (
        "import os, sys; from loupe.jobs.lease import Lease; from loupe.workers.storage import LocalStorage;"
        " Lease.acquire(LocalStorage(), sys.argv[1]); os._exit(0)"
    )
    subprocess.run([sys.executable, "-c", code, out], check=True, timeout=60)
    with Lease.acquire(storage, out, expiry_s=600) as lease:
        assert lease.taken_from is not None and lease.taken_from.pid != lease.record.pid
