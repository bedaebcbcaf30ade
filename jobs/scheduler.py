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


class ShardError(Exception):
    """A shard's call raised: its cause in one line, and whether the replica's process died under it."""

    def __init__(self, cause: str, replica_died: bool = False) -> None:
        super().__init__(cause)
        self.cause = cause
        self.replica_died = replica_died


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
    ) -> None:
        self.replicas = replicas
        self.max_shard_retries = max_shard_retries
        self.probe_interval_s = probe_interval_s
        self.wait_s = wait_s
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
        and is dropped if its restarts are used up. RuntimeError once every replica is gone.
        """
        self.todo = iter(todo)
        while True:
            self._dispatch()
            self._send_due_probes()
            if not self.running and not self.probing and not self.probe_later:
                if self.planned_all and not self.retries:
                    return
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

    def _timeout(self) -> float:
        if not self.probe_later:
            return self.wait_s
        return min(self.wait_s, max(0.0, min(due for due, _ in self.probe_later) - time.monotonic()))

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
        try:
            stats = self.replicas.shard_result(handle)
        except ShardError as exc:
            if exc.replica_died and work.replica in self.healthy:
                self.healthy.discard(work.replica)
                self.probing[self.replicas.probe(work.replica)] = work.replica
            if work.attempt <= self.max_shard_retries:
                self.retries.append(replace(work, attempt=work.attempt + 1))
            else:
                failed(work.shard, work.attempt, exc.cause)
            return
        done(stats)
