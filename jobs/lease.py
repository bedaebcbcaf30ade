"""One driver per OUTPUT: a lease record created exclusively, renewed by a heartbeat thread, released at the end."""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass, replace
from datetime import datetime, timezone

from loupe.schemas.errors import UserError, one_line
from loupe.schemas.layout import LEASE_FILE
from loupe.schemas.records import Record
from loupe.workers.storage import LocalStorage, Storage, join_uri

_ACQUIRE_ROUNDS = 5  # create, read, take over: each lost race costs a round


class LeaseHeld(UserError):
    """Another run holds the lease on this OUTPUT and renewed it within its expiry."""


class LeaseLost(UserError):
    """This run's lease was taken over (it went unrenewed past its expiry), so another driver may
    be writing OUTPUT now."""


@dataclass
class LeaseRecord(Record):
    """OUTPUT/_lease.json: who drives the job on OUTPUT, and when it last said it still does.

    Times are seconds since the epoch on the holder's clock; a taker compares them with its own,
    so hosts' clocks must agree to well within `expiry_s` (NTP does).
    """

    holder: str  # a fresh id per acquisition
    host: str
    pid: int
    started: float
    heartbeat: float
    expiry_s: float


def _died_here(record: LeaseRecord) -> bool:
    """Whether the lease's holder ran on this host and its process is gone (a killed driver's rerun
    need not wait out the expiry)."""
    if record.host != socket.gethostname() or record.pid == os.getpid():
        return False
    try:
        os.kill(record.pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False  # alive, another user's
    return False


def _local_folder(storage: Storage, output: str) -> str | None:
    """OUTPUT's local folder, or None on object storage (where no folder is ever made)."""
    return os.path.abspath(output.removeprefix("file://")) if isinstance(storage, LocalStorage) else None


def _when(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _describe(record: LeaseRecord) -> str:
    age = max(0.0, time.time() - record.heartbeat)
    return f"{record.host} pid {record.pid}, last renewed {age:.0f}s ago at {_when(record.heartbeat)}"


class Lease:
    """This process's hold on one OUTPUT, renewed in the background until `release()`; a context manager.

    `taken_from` is the expired lease this one replaced, if any (a driver that died holding it).
    """

    def __init__(self, storage: Storage, output: str, record: LeaseRecord, renew_every_s: float):
        self.storage, self.output, self.record = storage, output, record
        self.uri = join_uri(output, LEASE_FILE)
        self.taken_from: LeaseRecord | None = None
        self._version = ""
        self._renew_every_s = renew_every_s
        self._renewed = time.monotonic()
        self._lost: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._heartbeat, name="loupe-lease", daemon=True)
        self._made_folder: str | None = None  # a local OUTPUT folder the lease created, removed if left empty

    @classmethod
    def acquire(
        cls, storage: Storage, output: str, *, expiry_s: float = 60.0, renew_every_s: float | None = None
    ) -> Lease:
        """The lease on OUTPUT; LeaseHeld (one line naming the holder) while another run keeps it.

        A lease not renewed for longer than its own expiry is taken over, and at once when its
        holder ran on this host and its process is gone. Renewal comes every
        `renew_every_s` (by default a quarter of `expiry_s`, at most half of it), so a holder
        survives a few failed renewals before anyone may take over.
        """
        renew_every_s = expiry_s / 4 if renew_every_s is None else renew_every_s
        if not 0 < renew_every_s <= expiry_s / 2:
            raise ValueError(f"renew_every_s must be in (0, expiry_s / 2], got {renew_every_s} for {expiry_s}")
        uri = join_uri(output, LEASE_FILE)
        folder = _local_folder(storage, output)
        made_folder = folder is not None and not os.path.exists(folder)
        now = time.time()
        mine = LeaseRecord(uuid.uuid4().hex, socket.gethostname(), os.getpid(), now, now, expiry_s)
        taken_from = None
        for _ in range(_ACQUIRE_ROUNDS):
            if storage.create_exclusive(uri, mine.to_json()):
                break
            try:
                data, version = storage.read_with_version(uri)
            except FileNotFoundError:  # released since: create it again
                continue
            current = LeaseRecord.from_json(data, source=uri)
            if time.time() - current.heartbeat <= current.expiry_s and not _died_here(current):
                raise LeaseHeld(
                    f"{output} is in use by another loupe run ({_describe(current)}); it may be taken"
                    f" over once it goes {current.expiry_s:.0f}s without renewal"
                )
            mine = replace(mine, heartbeat=time.time())
            if storage.replace_if(uri, mine.to_json(), version):
                taken_from = current
                break
        else:
            raise LeaseHeld(f"{output}: could not acquire its lease, other runs keep changing it")
        lease = cls(storage, output, mine, renew_every_s)
        lease.taken_from = taken_from
        lease._made_folder = folder if made_folder else None
        lease._confirm(mine)
        lease._thread.start()
        return lease

    def _confirm(self, record: LeaseRecord) -> None:
        """Learn the version of the record just written; LeaseLost if it is not ours any more."""
        data, version = self.storage.read_with_version(self.uri)
        if data != record.to_json():
            current = LeaseRecord.from_json(data, source=self.uri)
            raise LeaseLost(f"lost the lease on {self.output} to {_describe(current)}")
        self.record, self._version, self._renewed = record, version, time.monotonic()

    def _heartbeat(self) -> None:
        while not self._stop.wait(self._renew_every_s):
            try:
                self._renew()
            except LeaseLost as exc:
                self._lost = str(exc)
                return
            except Exception as exc:  # a passing storage fault: the next beat tries again
                if time.monotonic() - self._renewed > self.record.expiry_s:
                    self._lost = (
                        f"could not renew the lease on {self.output} for {self.record.expiry_s:.0f}s"
                        f" ({one_line(exc, 200)}); another run may have taken it over"
                    )
                    return

    def _renew(self) -> None:
        record = replace(self.record, heartbeat=time.time())
        if not self.storage.replace_if(self.uri, record.to_json(), self._version):
            try:
                current = _describe(LeaseRecord.from_json(self.storage.read_bytes(self.uri), source=self.uri))
            except FileNotFoundError:
                current = "nobody: the lease was deleted"
            raise LeaseLost(f"lost the lease on {self.output} to {current}")
        self._confirm(record)

    def check(self) -> None:
        """LeaseLost if the lease is no longer ours; a driver calls it before each step that writes."""
        if self._lost is not None:
            raise LeaseLost(self._lost)

    def release(self) -> None:
        """Stop renewing and delete the lease if it is still ours (idempotent)."""
        self._stop.set()
        if self._thread.is_alive():
            # A renewal in flight ends within its storage call's retries; past the expiry the
            # lease would be another driver's to take anyway.
            self._thread.join(timeout=self.record.expiry_s)
        if self._lost is not None:
            return
        try:
            data, _ = self.storage.read_with_version(self.uri)
        except FileNotFoundError:
            return
        if LeaseRecord.from_json(data, source=self.uri).holder == self.record.holder:
            self.storage.delete(self.uri)
            if self._made_folder is not None:
                # A run that wrote nothing (a user mistake found after the lease) leaves no OUTPUT behind.
                with contextlib.suppress(OSError):
                    os.rmdir(self._made_folder)
        self._lost = f"the lease on {self.output} was released"

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc) -> None:
        self.release()
