"""The shard scheduler driven by fake in-process replicas: dispatch depth, retries, probes, no Ray."""

import itertools
import subprocess
import sys
import time

import pytest
from loupe.jobs.scheduler import (
    SHARD_TIMEOUT_FACTOR,
    SHARD_TIMEOUT_FLOOR_S,
    SHARD_TIMEOUT_INITIAL_S,
    SHARDS_PER_REPLICA,
    WAIT_S,
    JobStopped,
    Probe,
    Scheduler,
    ShardError,
)
from loupe.schemas.plan import Shard, ShardKind
from loupe.schemas.records import ShardStats


def _shards(count):
    return [Shard(i, ShardKind.FILES, (f"in/{i}.jpg",)) for i in range(count)]


class FakeReplicas:
    """Replicas in this process: every call finishes at once and comes back in the order it was made.

    `outcome(replica, shard_id, attempt)` says how a shard ends: "ok", "raise" (the shard's own
    error) or "die" (the replica's process dies, taking its other shards with it). `probes`
    lists, per replica, what successive probes find (UP once the list runs out).
    """

    def __init__(self, count, outcome=lambda replica, shard_id, attempt: "ok", probes=None):
        self.count = count
        self.outcome = outcome
        self.answers = {r: list(a) for r, a in (probes or {}).items()}
        self.calls = {}  # handle -> ("shard", replica, shard, attempt) or ("probe", replica)
        self.handles = itertools.count()
        self.dead = set()
        self.load = [0] * count
        self.deepest = [0] * count
        self.ran = []  # (replica, shard_id, attempt) in the order shards finished
        self.probed = []  # replicas, in the order probed
        self.timeouts = []

    def __len__(self):
        return self.count

    def submit(self, replica, shard, attempt):
        assert replica not in self.dead, "work sent to a replica that died"
        self.load[replica] += 1
        self.deepest[replica] = max(self.deepest[replica], self.load[replica])
        handle = next(self.handles)
        self.calls[handle] = ("shard", replica, shard, attempt)
        return handle

    def probe(self, replica):
        self.probed.append(replica)
        handle = next(self.handles)
        self.calls[handle] = ("probe", replica)
        return handle

    def wait(self, handles, timeout):
        assert handles and 0 <= timeout <= WAIT_S
        self.timeouts.append(timeout)
        return min(handles)

    def shard_result(self, handle):
        _, replica, shard, attempt = self.calls.pop(handle)
        self.load[replica] -= 1
        if replica in self.dead:
            raise ShardError("the actor died", replica_died=True)
        outcome = self.outcome(replica, shard.shard_id, attempt)
        if outcome == "die":
            self.dead.add(replica)
            raise ShardError("the actor died", replica_died=True)
        if outcome == "raise":
            raise ShardError(f"ValueError: shard {shard.shard_id} is broken")
        self.ran.append((replica, shard.shard_id, attempt))
        return ShardStats(shard.shard_id, "", "", 0, 1, 1, 0, {}, 0.0, 0.0, 0.0, node_id=f"r{replica}", attempt=attempt)

    def probe_result(self, handle):
        _, replica = self.calls.pop(handle)
        answers = self.answers.get(replica) or [Probe.UP]
        answer = answers.pop(0)
        if answer is Probe.UP:
            self.dead.discard(replica)
        return answer


def _run(replicas, shards, max_shard_retries=2):
    done, failed = [], []
    Scheduler(replicas, max_shard_retries, probe_interval_s=0.0).run(
        iter(shards), done.append, lambda shard, attempts, cause: failed.append((shard.shard_id, attempts, cause))
    )
    return done, failed


def test_every_shard_done_once_with_every_replica_kept_full():
    replicas = FakeReplicas(3)
    done, failed = _run(replicas, _shards(20))
    assert sorted(s.shard_id for s in done) == list(range(20)) and not failed
    assert replicas.deepest == [SHARDS_PER_REPLICA] * 3
    assert {r for r, _, _ in replicas.ran} == {0, 1, 2}
    assert not replicas.calls, "nothing left in flight"


def test_failing_shard_retried_on_another_replica_then_recorded_failed():
    def outcome(replica, shard_id, attempt):
        return "raise" if shard_id == 3 or (shard_id == 5 and attempt == 1) else "ok"

    replicas = FakeReplicas(2, outcome)
    done, failed = _run(replicas, _shards(8), max_shard_retries=2)
    assert sorted(s.shard_id for s in done) == [0, 1, 2, 4, 5, 6, 7]
    assert failed == [(3, 3, "ValueError: shard 3 is broken")]
    (retried,) = [s for s in done if s.shard_id == 5]
    assert retried.attempt == 2


def test_retry_goes_to_another_replica_while_there_is_one():
    where = {}

    def outcome(replica, shard_id, attempt):
        where.setdefault(shard_id, []).append(replica)
        return "raise" if shard_id == 0 else "ok"

    _, failed = _run(FakeReplicas(2, outcome), _shards(4), max_shard_retries=3)
    assert failed == [(0, 4, "ValueError: shard 0 is broken")]
    assert all(a != b for a, b in zip(where[0], where[0][1:])), where[0]


def test_a_lone_replica_retries_on_itself():
    replicas = FakeReplicas(1, lambda replica, shard_id, attempt: "raise" if attempt == 1 else "ok")
    done, failed = _run(replicas, _shards(3), max_shard_retries=1)
    assert sorted((s.shard_id, s.attempt) for s in done) == [(0, 2), (1, 2), (2, 2)] and not failed


def test_dead_replica_probed_until_restarted_then_given_work_again():
    died = []

    def outcome(replica, shard_id, attempt):
        if replica == 0 and not died:
            died.append(shard_id)
            return "die"
        return "ok"

    replicas = FakeReplicas(2, outcome, probes={0: [Probe.RESTARTING, Probe.RESTARTING, Probe.UP]})
    done, failed = _run(replicas, _shards(40))
    assert sorted(s.shard_id for s in done) == list(range(40)) and not failed
    assert replicas.probed == [0, 0, 0], "one probe per death, then again while it restarts"
    assert any(s.attempt == 2 for s in done), "the shards in flight on the dead replica were retried"
    assert any(r == 0 for r, _, _ in replicas.ran), "the restarted replica took work again"


def test_replica_that_never_comes_back_is_dropped():
    def outcome(replica, shard_id, attempt):
        return "die" if replica == 0 else "ok"

    replicas = FakeReplicas(2, outcome, probes={0: [Probe.RESTARTING, Probe.GONE]})
    done, failed = _run(replicas, _shards(10), max_shard_retries=1)
    assert sorted(s.shard_id for s in done) == list(range(10)) and not failed
    assert {r for r, _, _ in replicas.ran} == {1}
    assert replicas.probed == [0, 0]


def test_every_replica_dead_is_an_error():
    replicas = FakeReplicas(2, lambda replica, shard_id, attempt: "die", probes={0: [Probe.GONE], 1: [Probe.GONE]})
    with pytest.raises(RuntimeError, match="every model replica died; rerun the same command to resume"):
        _run(replicas, _shards(10))


def test_no_ray_inside():
    check = "import sys, loupe.jobs.scheduler; sys.exit('ray' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", check]).returncode == 0


class HangingReplicas(FakeReplicas):
    """Fakes whose `outcome` may be "hang": that call never finishes until its replica is killed."""

    def __init__(self, count, outcome):
        super().__init__(count, outcome)
        self.killed = []

    def kill(self, replica):
        self.killed.append(replica)
        self.dead.add(replica)

    def wait(self, handles, timeout):
        assert 0 <= timeout <= WAIT_S
        for handle in sorted(handles):
            call = self.calls[handle]
            if call[0] == "probe" or self.outcome(call[1], call[2].shard_id, call[3]) != "hang":
                return handle
        time.sleep(timeout)  # only hung calls: nothing comes back before the deadline
        return None


def test_a_hung_replica_is_killed_and_its_shards_run_elsewhere():
    def outcome(replica, shard_id, attempt):
        return "hang" if shard_id == 2 and attempt == 1 else "ok"

    replicas = HangingReplicas(2, outcome)
    done, failed = [], []
    started = time.monotonic()
    scheduler = Scheduler(replicas, 2, probe_interval_s=0.0, shard_timeout_s=0.3)
    scheduler.run(iter(_shards(6)), done.append, lambda shard, attempts, cause: failed.append(cause))
    assert time.monotonic() - started < 5
    assert sorted(s.shard_id for s in done) == list(range(6)) and not failed
    assert len(replicas.killed) == 1 and scheduler.hung == 1
    (retried,) = [s for s in done if s.shard_id == 2]
    assert retried.attempt == 2 and retried.node_id != f"r{replicas.killed[0]}"
    assert "--shard-timeout" in scheduler.describe_timeout()


def test_the_automatic_shard_timeout_follows_the_slowest_shard_with_a_floor():
    scheduler = Scheduler(FakeReplicas(1), 0)
    assert scheduler.shard_timeout_s == SHARD_TIMEOUT_INITIAL_S
    scheduler.run(iter(_shards(1)), lambda stats: None, lambda *a: None)
    assert scheduler.shard_timeout_s == SHARD_TIMEOUT_FLOOR_S  # fake shards take 0 s
    scheduler.seconds_per_image, scheduler.largest_shard = 30.0, 10
    assert scheduler.shard_timeout_s == SHARD_TIMEOUT_FACTOR * 300 and "auto" in scheduler.describe_timeout()


def test_a_fatal_shard_failure_stops_the_job_at_once():
    class Full(FakeReplicas):
        def shard_result(self, handle):
            _, _, shard, _ = self.calls[handle]
            if shard.shard_id == 1:
                self.calls.pop(handle)
                raise ShardError("OUTPUT is full: [Errno 28] No space left on device", fatal=True)
            return super().shard_result(handle)

    replicas = Full(1)
    done, failed = [], []
    with pytest.raises(JobStopped, match="OUTPUT is full") as stopped:
        Scheduler(replicas, 3).run(iter(_shards(10)), done.append, lambda s, a, c: failed.append(s.shard_id))
    assert failed == [1] and len(done) <= 1, "no shard after the fatal one was tried"
    assert stopped.value.hung == 0


def test_the_job_ends_while_a_lost_replica_is_still_restarting():
    replicas = FakeReplicas(2, lambda replica, shard_id, attempt: "die" if (replica, attempt) == (1, 1) else "ok",
                            probes={1: [Probe.RESTARTING] * 1000})
    done, failed = _run(replicas, _shards(5))
    assert sorted(s.shard_id for s in done) == list(range(5)) and not failed
