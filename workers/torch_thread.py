"""One OS thread for a process's model work: loading, running and (on a CPU) preparing inputs.

PyTorch's CPU kernels run on OpenMP (libgomp), which gives every thread that enters a parallel
region a team of its own. Once a process has more OpenMP threads than CPUs, libgomp stops
letting idle team members spin between regions and puts them to sleep instead, so each of
the thousands of small operators in a decoding step pays a wake-up. A replica whose two shard
threads (and loader) take turns calling the model measured 15-25 % slower on a 2-core machine
than the same calls from one thread (docs/benchmarks.md). Everything that enters torch goes
through `on_torch_thread`, so the process keeps a single team.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")

_lock = threading.Lock()
_executor: ThreadPoolExecutor | None = None
_thread: threading.Thread | None = None


def _started() -> ThreadPoolExecutor:
    global _executor
    with _lock:
        if _executor is None:
            _executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="loupe-torch", initializer=_remember)
        return _executor


def _remember() -> None:
    global _thread
    _thread = threading.current_thread()


def on_torch_thread(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """fn(*args, **kwargs) on the process's torch thread, in submission order; exceptions propagate.

    Called from the torch thread itself (a nested call), fn runs at once.
    """
    if threading.current_thread() is _thread:
        return fn(*args, **kwargs)
    return _started().submit(fn, *args, **kwargs).result()
