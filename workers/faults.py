"""Fault points for tests and chaos runs: a plan chosen by the LOUPE_FAULTS environment setting, inert when unset.

The plan is JSON, a list of rules such as
    [{"point": "model", "action": "hang", "match": "scene-03", "seconds": 600, "token": "/tmp/t/hang"}]
Each rule fires at its `point` ("read": one image fetched; "model": one batch about to run;
"write": a part about to be written; "upload_part": one part of an S3 multipart upload sent, the
upload still open) when `match` is a substring of one of the point's URIs and
the batch has at least `min_batch` images. `token` makes a rule fire at most `times` times over
every process of a job (each firing creates `token.N` exclusively); without one it fires every
time. Actions: "hang" (sleep `seconds`), "oom" (torch.cuda.OutOfMemoryError), "raise"
(RuntimeError), "read_failed" (a TransientError), "enospc" / "erofs" (OSError with that errno).
"""

from __future__ import annotations

import errno
import json
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache

from loupe.schemas.errors import UserError
from loupe.workers.storage import TransientError

ENV = "LOUPE_FAULTS"
POINTS = ("read", "model", "write", "upload_part")
ACTIONS = ("hang", "oom", "raise", "read_failed", "enospc", "erofs")


@dataclass(frozen=True)
class FaultRule:
    """One fault to inject: where, what, on which URIs, how often."""

    point: str
    action: str
    match: str = ""
    min_batch: int = 1
    seconds: float = 3600.0
    token: str = ""
    times: int = 1

    def fits(self, point: str, uris: list[str]) -> bool:
        if point != self.point or len(uris) < self.min_batch:
            return False
        return not self.match or any(self.match in uri for uri in uris)

    def claim(self) -> bool:
        """Whether this firing is allowed (one of `times` tokens taken), across processes."""
        if not self.token:
            return True
        os.makedirs(os.path.dirname(self.token) or ".", exist_ok=True)
        for n in range(self.times):
            try:
                os.close(os.open(f"{self.token}.{n}", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
                return True
            except FileExistsError:
                continue
        return False


def parse_plan(text: str) -> tuple[FaultRule, ...]:
    """The rules of a LOUPE_FAULTS value; UserError naming what is wrong."""
    try:
        raw = json.loads(text)
        rules = tuple(FaultRule(**rule) for rule in raw)
    except (ValueError, TypeError) as exc:
        raise UserError(f"{ENV} is not a list of fault rules: {exc}") from None
    for rule in rules:
        if rule.point not in POINTS or rule.action not in ACTIONS:
            raise UserError(f"{ENV}: unknown point {rule.point!r} or action {rule.action!r}")
    return rules


@lru_cache(maxsize=4)
def _plan(text: str) -> tuple[FaultRule, ...]:
    return parse_plan(text)


def planned(point: str) -> bool:
    """Whether the plan in force has a rule for `point` (code whose fault point costs more than an
    environment lookup, such as a storage client hook, is set up only then)."""
    text = os.environ.get(ENV)
    return bool(text) and any(rule.point == point for rule in _plan(text))


def fault_point(point: str, uris: Iterable[str]) -> None:
    """Do the fault the plan holds for this point and these URIs, if any (nothing when LOUPE_FAULTS is unset)."""
    text = os.environ.get(ENV)
    if not text:
        return
    uris = list(uris)
    for rule in _plan(text):
        if rule.fits(point, uris) and rule.claim():
            _act(rule, uris)


def _act(rule: FaultRule, uris: list[str]) -> None:
    what = f"injected {rule.action} at {rule.point} ({uris[0] if uris else ''})"
    if rule.action == "hang":
        time.sleep(rule.seconds)
    elif rule.action == "oom":
        import torch

        raise torch.cuda.OutOfMemoryError(f"CUDA out of memory ({what}, {len(uris)} images)")
    elif rule.action == "raise":
        raise RuntimeError(what)
    elif rule.action == "read_failed":
        raise TransientError(what)
    elif rule.action == "enospc":
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), uris[0] if uris else None)
    elif rule.action == "erofs":
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), uris[0] if uris else None)
