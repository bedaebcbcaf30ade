"""The shard scheduler: keeps replicas fed, retries failed shards elsewhere, re-admits restarted replicas; no Ray inside."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Hashable, Iterable, Iterator
from dataclasses import dataclass, replace
from enum import Enum
from typing import Protocol

from loupe.schemas.plan import Shard
from loupe.schemas.records import ShardStats

# Shards queued on each replica: one running, one whose images are fetched and decoded
# meanwhile (a replica runs two shards at once and serializes only the model).
SHARDS_PER_REPLICA = 2
# How long a replica that is still restarting is left alone before it is probed again.
PROBE_INTERVAL_S = 0.5
# The longest the scheduler waits for any result before it looks again (no wait is unbounded).
WAIT_S = 5.0
# A replica with work that gives no result for its shard timeout is taken for hung: its actor is
# killed (Ray restarts it) and its shards go elsewhere. The automatic timeout is this many times
# the slowest observed shard (seconds per image times the largest shard's images), never under
# the floor; until a shard has finished, the initial timeout applies.
SHARD_TIMEOUT_FACTOR = 10.0
SHARD_TIMEOUT_FLOOR_S = 600.0
SHARD_TIMEOUT_INITIAL_S = 3600.0


class ShardError(Exception):
    """A shard's call raised: its cause in one line, whether the replica's process died under it, and
    whether every other shard would fail the same way (OUTPUT full or read-only): `fatal`."""

    def __init__(self, cause: str, replica_died: bool = False, fatal: bool = False) -> None:
        super().__init__(cause)
        self.cause = cause
        self.replica_died = replica_died
        self.fatal = fatal


class JobStopped(RuntimeError):
    """A shard failed in a way every other shard would too (see ShardError.fatal): the job stops.

    `hung` says how many replicas the run had restarted for hanging before it stopped.
    """

    def __init__(self, cause: str, hung: int = 0) -> None:
        super().__init__(cause)
        self.hung = hung


class Probe(str, Enum):
    """What a probe of a replica that died found."""

    UP = "up"  # restarted: it takes work again
    RESTARTING = "restarting"  # not back yet: probe again later
    GONE = "gone"  # no restarts left: it stays out


class Replicas(Protocol):
    """The replicas the scheduler drives, by index: Ray actors in a job, fakes in tests."""

    def __len__(self) -> int: ...

    def submit(self, replica: int, shard: Shard, attempt: int) -> Hashable:
        """Start a shard on a replica; a handle to wait on."""

    def probe(self, replica: int) -> Hashable:
        """Ask a replica that died whether it is back; a handle to wait on."""

    def wait(self, handles: list[Hashable], timeout: float) -> Hashable | None:
        """One finished handle of `handles`, or None if none finished within `timeout` seconds."""

    def shard_result(self, handle: Hashable) -> ShardStats:
        """A finished shard's stats; ShardError if it raised."""

    def probe_result(self, handle: Hashable) -> Probe:
        """A finished probe's answer."""

    def kill(self, replica: int) -> None:
        """Kill a hung replica's process (it is restarted if it has restarts left); its calls fail."""


@dataclass(frozen=True)
class _Work:
    shard: Shard
    attempt: int
    replica: int  # where it runs; in the retry queue, where it last failed


class Scheduler:
    """One pass of a plan's remaining shards over a set of replicas (see `run`)."""

    def __init__(
        self,
        replicas: Replicas,
        max_shard_retries: int,
        *,
        probe_interval_s: float = PROBE_INTERVAL_S,
        wait_s: float = WAIT_S,
        shard_timeout_s: float | None = None,
    ) -> None:
        self.replicas = replicas
        self.max_shard_retries = max_shard_retries
        self.probe_interval_s = probe_interval_s
        self.wait_s = wait_s
        self.fixed_timeout_s = shard_timeout_s  # None: derived from the shards seen (see shard_timeout_s)
        self.seconds_per_image = 0.0  # the slowest finished shard's
        self.largest_shard = 0  # images in the largest finished shard
        self.hung = 0  # replicas killed for giving no result within the shard timeout
        self.progress = [time.monotonic()] * len(replicas)  # when each replica last started from idle or finished
        self.healthy = set(range(len(replicas)))  # replicas that take work
        self.load = [0] * len(replicas)  # shards running on each replica
        self.running: dict[Hashable, _Work] = {}
        self.retries: deque[_Work] = deque()
        self.probing: dict[Hashable, int] = {}  # a probe in flight -> the replica it asks
        self.probe_later: list[tuple[float, int]] = []  # (monotonic time due, replica) still restarting
        self.todo: Iterator[Shard] = iter(())
        self.planned_all = False  # `todo` has given its last shard

    def run(
        self,
        todo: Iterable[Shard],
        done: Callable[[ShardStats], None],
        failed: Callable[[Shard, int, str], None],
    ) -> None:
        """Keep every healthy replica SHARDS_PER_REPLICA shards deep until `todo` is done.

        `done(stats)` is called for each shard that finishes; a shard that raises is retried on
        another replica, up to max_shard_retries, then `failed(shard, attempts, cause)` is
        called. A replica whose process died gets no work until a probe finds it restarted,
        and is dropped if its restarts are used up. RuntimeError once every replica is gone;
        JobStopped after a fatal shard failure. A replica with work and no result for
        `shard_timeout_s` is killed and its shards retried elsewhere.
        """
        self.todo = iter(todo)
        while True:
            self._dispatch()
            self._send_due_probes()
            self._kill_hung(failed)
            if not self.running and self.planned_all and not self.retries:
                return  # probes of replicas still restarting (or lost with their node) are moot
            if not self.running and not self.probing and not self.probe_later:
                if not self.healthy:
                    raise RuntimeError("every model replica died; rerun the same command to resume")
                continue
            handles = [*self.running, *self.probing]
            if not handles:
                time.sleep(self._timeout())  # only probes of restarting replicas are left
                continue
            handle = self.replicas.wait(handles, self._timeout())
            if handle in self.probing:
                self._probed(handle)
            elif handle is not None:
                self._finished(handle, done, failed)

    def _dispatch(self) -> None:
        for replica in sorted(self.healthy, key=lambda r: self.load[r]):
            while self.load[replica] < SHARDS_PER_REPLICA and (work := self._next_for(replica)) is not None:
                self.running[self.replicas.submit(replica, work.shard, work.attempt)] = work
                if self.load[replica] == 0:
                    self.progress[replica] = time.monotonic()
                self.load[replica] += 1

    def _next_for(self, replica: int) -> _Work | None:
        """A retry that failed elsewhere (anywhere, when this is the only replica left), else a new shard."""
        for position, work in enumerate(self.retries):
            if work.replica != replica or len(self.healthy) == 1:
                del self.retries[position]
                return replace(work, replica=replica)
        shard = None if self.planned_all else next(self.todo, None)
        self.planned_all = shard is None
        return _Work(shard, 1, replica) if shard is not None else None

    def _send_due_probes(self) -> None:
        now = time.monotonic()
        for due, replica in [p for p in self.probe_later if p[0] <= now]:
            self.probe_later.remove((due, replica))
            self.probing[self.replicas.probe(replica)] = replica

    @property
    def shard_timeout_s(self) -> float:
        """The --shard-timeout given, else SHARD_TIMEOUT_FACTOR times the slowest shard seen (floored)."""
        if self.fixed_timeout_s is not None:
            return self.fixed_timeout_s
        if not self.largest_shard:
            return SHARD_TIMEOUT_INITIAL_S
        return max(SHARD_TIMEOUT_FLOOR_S, SHARD_TIMEOUT_FACTOR * self.seconds_per_image * self.largest_shard)

    def describe_timeout(self) -> str:
        """The shard timeout in force, and where it came from, in a few words for the summary."""
        if self.fixed_timeout_s is not None:
            return f"{self.fixed_timeout_s:.0f} s (--shard-timeout)"
        if not self.largest_shard:
            return f"{SHARD_TIMEOUT_INITIAL_S:.0f} s (initial: no shard finished yet)"
        return (
            f"{self.shard_timeout_s:.0f} s (auto: {SHARD_TIMEOUT_FACTOR:.0f} x {self.seconds_per_image:.2f} s/image"
            f" x {self.largest_shard} images, at least {SHARD_TIMEOUT_FLOOR_S:.0f} s)"
        )

    def _timeout(self) -> float:
        now = time.monotonic()
        due = [when for when, _ in self.probe_later]
        due += [self.progress[r] + self.shard_timeout_s for r in range(len(self.load)) if self.load[r]]
        return min(self.wait_s, max(0.0, min(due, default=now + self.wait_s) - now))

    def _kill_hung(self, failed: Callable[[Shard, int, str], None]) -> None:
        now, limit = time.monotonic(), self.shard_timeout_s
        for replica in [r for r in range(len(self.load)) if self.load[r] and now - self.progress[r] > limit]:
            self.hung += 1
            self.replicas.kill(replica)
            self.healthy.discard(replica)
            self.probing[self.replicas.probe(replica)] = replica
            cause = f"no result from its replica within the shard timeout ({limit:.0f}s); the replica was restarted"
            for handle, work in [(h, w) for h, w in self.running.items() if w.replica == replica]:
                del self.running[handle]
                self.load[replica] -= 1
                self._retry_or_fail(work, cause, failed)

    def _probed(self, handle: Hashable) -> None:
        replica = self.probing.pop(handle)
        answer = self.replicas.probe_result(handle)
        if answer is Probe.UP:
            self.healthy.add(replica)
        elif answer is Probe.RESTARTING:
            self.probe_later.append((time.monotonic() + self.probe_interval_s, replica))

    def _finished(
        self, handle: Hashable, done: Callable[[ShardStats], None], failed: Callable[[Shard, int, str], None]
    ) -> None:
        work = self.running.pop(handle)
        self.load[work.replica] -= 1
        self.progress[work.replica] = time.monotonic()
        try:
            stats = self.replicas.shard_result(handle)
        except ShardError as exc:
            if exc.fatal:
                failed(work.shard, work.attempt, exc.cause)
                raise JobStopped(exc.cause, hung=self.hung) from None
            if exc.replica_died and work.replica in self.healthy:
                self.healthy.discard(work.replica)
                self.probing[self.replicas.probe(work.replica)] = work.replica
            self._retry_or_fail(work, exc.cause, failed)
            return
        if stats.rows:
            self.seconds_per_image = max(self.seconds_per_image, stats.seconds / stats.rows)
            self.largest_shard = max(self.largest_shard, stats.rows)
        done(stats)

    def _retry_or_fail(self, work: _Work, cause: str, failed: Callable[[Shard, int, str], None]) -> None:
        if work.attempt <= self.max_shard_retries:
            self.retries.append(replace(work, attempt=work.attempt + 1))
        else:
            failed(work.shard, work.attempt, cause)
