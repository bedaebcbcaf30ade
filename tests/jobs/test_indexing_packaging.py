"""Index packaging: one FAISS build per install, a clear line without one, threads that fit the CPUs given."""

from __future__ import annotations

import os
import subprocess
import sys
import types
from pathlib import Path

import faiss
import pytest
import tomllib

from loupe.workers.index import threads

ROOT = Path(__file__).resolve().parents[2]


def test_faiss_comes_from_exactly_one_extra():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    def names(requirements: list[str]) -> set[str]:
        return {r.split(">")[0].split("=")[0].split("[")[0].strip() for r in requirements}

    assert not {n for n in names(project["dependencies"]) if n.startswith("faiss")}
    extras = project["optional-dependencies"]
    assert names(extras["cpu"]) == {"faiss-cpu"}
    assert names(extras["gpu"]) == {"faiss-gpu-cu12"}
    # dev and offline pull in no FAISS of their own: `.[gpu,dev]` must not bring faiss-cpu back.
    for extra in ("dev", "offline"):
        assert not {n for n in names(extras[extra]) if n.startswith("faiss")}
    makefile = (ROOT / "Makefile").read_text()
    assert 'pip install -q -e ".[$(FAISS),offline]"' in makefile and "FAISS ?= cpu" in makefile


def test_without_faiss_the_import_says_what_to_install():
    # sys.modules["faiss"] = None makes `import faiss` fail as if no FAISS build were installed.
    code = (
        "import sys; sys.modules['faiss'] = None\n"
        "from loupe.schemas.errors import UserError\n"
        "try:\n"
        "    import loupe.jobs.indexing\n"
        "except UserError as exc:\n"
        "    assert isinstance(exc, ImportError)\n"
        "    print(exc)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out == "faiss is not installed: pip install 'loupe[cpu]' (or 'loupe[gpu]' on CUDA 12)\n"


def test_importing_the_index_modules_leaves_faiss_threads_alone():
    code = (
        "import faiss; faiss.omp_set_num_threads(37)\n"
        "import loupe.jobs.indexing, loupe.jobs.search, loupe.jobs.bench.index\n"
        "print(faiss.omp_get_max_threads())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out == "37\n"


@pytest.mark.parametrize("args", [["index", "OUT"], ["search", "OUT", "a red bicycle"]])
def test_without_faiss_the_commands_say_it_in_one_line(args, tmp_path):
    code = (
        "import sys; sys.modules['faiss'] = None\n"
        "from loupe.jobs.cli import app\n"
        f"app({[a.replace('OUT', str(tmp_path)) for a in args]!r})\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 2
    assert done.stderr == "loupe: error: faiss is not installed: pip install 'loupe[cpu]' (or 'loupe[gpu]' on CUDA 12)\n"


def test_threads_follow_the_affinity_mask_and_the_cgroup_quota(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3, 4, 5}, raising=False)
    monkeypatch.setattr(threads, "ray_cpus", lambda: None)
    monkeypatch.setattr(threads, "cgroup_cpus", lambda: None)
    assert threads.cpu_share() == 6
    monkeypatch.setattr(threads, "cgroup_cpus", lambda: 2.5)  # docker --cpus=2.5
    assert threads.cpu_share() == 2
    monkeypatch.setattr(threads, "cgroup_cpus", lambda: 0.5)
    assert threads.cpu_share() == 1


def test_threads_follow_a_ray_share_when_ray_runs_this_process(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    monkeypatch.setattr(threads, "cgroup_cpus", lambda: None)
    context = types.SimpleNamespace(get_assigned_resources=lambda: {"CPU": 3.0, "memory": 1e9})
    fake_ray = types.SimpleNamespace(is_initialized=lambda: True, get_runtime_context=lambda: context)
    monkeypatch.setitem(sys.modules, "ray", fake_ray)
    assert threads.cpu_share() == 3
    # The driver holds no resources: its affinity mask decides.
    context.get_assigned_resources = dict
    assert threads.cpu_share() == 16


def test_an_explicit_omp_num_threads_is_left_alone(monkeypatch):
    count = faiss.omp_get_max_threads()
    try:
        faiss.omp_set_num_threads(1)
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        monkeypatch.setattr(threads, "cpu_share", lambda: 7)
        assert threads.use_cpu_share() == 1
        monkeypatch.delenv("OMP_NUM_THREADS")
        assert threads.use_cpu_share() == 7
    finally:
        faiss.omp_set_num_threads(count)


@pytest.mark.timeout(120)
def test_inside_a_ray_actor_faiss_uses_the_actors_cpus(ray_cluster):
    import ray

    @ray.remote(num_cpus=1)
    class Probe:
        def threads(self) -> tuple[int, int]:
            from loupe.workers.index.library import faiss
            from loupe.workers.index.threads import cpu_share, use_cpu_share

            use_cpu_share()  # as load_index and build_output_index do before any FAISS work
            return cpu_share(), faiss.omp_get_max_threads()

    probe = Probe.remote()
    try:
        assert ray.get(probe.threads.remote()) == (1, 1)
    finally:
        ray.kill(probe)
