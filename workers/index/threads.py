"""FAISS's thread pool sized to the CPUs this process may use: called where FAISS work starts, never at import."""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path

from loupe.workers.index.library import faiss


def cpu_share() -> int:
    """The CPUs this process may keep busy: its affinity mask, capped by a cgroup CPU quota
    (a container's --cpus, a Kubernetes limit) and, inside a Ray task or actor, by its num_cpus."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        cpus = os.cpu_count() or 1
    for limit in (cgroup_cpus(), ray_cpus()):
        if limit is not None:
            # Threads beyond a fractional share are throttled, not run: round down.
            cpus = min(cpus, max(1, math.floor(limit)))
    return max(1, cpus)


def cgroup_cpus() -> float | None:
    """The CPU quota of this process's cgroup in CPUs (2.5 for docker --cpus=2.5), or None without one."""
    try:  # cgroup v2: "max 100000" or "200000 100000"
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:  # cgroup v1: a quota of -1 means none
        quota = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").read_text())
        period = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read_text())
        return quota / period if quota > 0 and period > 0 else None
    except (OSError, ValueError):
        return None


def ray_cpus() -> float | None:
    """The CPUs Ray assigned to the task or actor this process runs, or None outside one."""
    ray = sys.modules.get("ray")  # never imported here: only a process Ray runs in has a share
    try:
        if ray is None or not ray.is_initialized():
            return None
        # {} in the driver; {"CPU": 2.0, ...} inside a task or an actor that reserved CPUs.
        return ray.get_runtime_context().get_assigned_resources().get("CPU")
    except Exception:  # noqa: BLE001 - an older or partly started Ray: fall back to the affinity mask
        return None


def use_cpu_share() -> int:
    """Size FAISS's OpenMP pool to cpu_share(), unless OMP_NUM_THREADS says otherwise; the count."""
    # OpenMP starts one thread per core of the machine where it cannot see the quota; with more
    # threads than CPUs, its spinning workers wait on each other and searches slow down manyfold.
    if not os.environ.get("OMP_NUM_THREADS"):
        faiss.omp_set_num_threads(cpu_share())
    return faiss.omp_get_max_threads()
