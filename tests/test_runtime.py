"""Thread policy: threads follow the usable CPUs, OpenMP waits passively, BLAS keeps one thread."""
import os
import subprocess
import sys

import pytest
import torch
from threadpoolctl import threadpool_info

from napari_graphkd import runtime
from napari_graphkd.runtime import configure_threads, count_idle, resolve_threads, usable_cpus


@pytest.fixture()
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def run_python(code: str, env: dict | None = None) -> str:
    """stdout of ``code`` in a fresh interpreter (the policy acts at import time)."""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    return out.stdout.strip()


@pytest.mark.parametrize("idle, expected", [(None, "all"), (0, 1), (1, 1), (10**6, "all")])
def test_default_threads_follow_the_idle_usable_cpus(restore_threads, monkeypatch, idle, expected):
    monkeypatch.setattr(runtime, "idle_cpus", lambda: idle)
    expected = usable_cpus() if expected == "all" else expected
    assert configure_threads(0) == expected == torch.get_num_threads()
    assert configure_threads(None) == expected
    assert configure_threads(1) == 1 == torch.get_num_threads()


def test_cpus_busy_less_than_half_the_time_count_as_idle():
    before = {0: (100, 1000), 1: (100, 1000), 2: (5, 50)}
    after = {0: (110, 1100), 1: (190, 1100), 2: (5, 50)}  # cpu 0: 10 % busy, cpu 1: 90 %, cpu 2: no ticks
    assert count_idle(before, after) == 2


@pytest.mark.skipif(runtime.idle_cpus() is None, reason="needs /proc/stat (Linux)")
def test_idle_cpus_are_measured_among_the_usable_ones():
    assert 0 <= runtime.idle_cpus() <= usable_cpus()


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="needs CPU affinity (Linux)")
def test_a_process_pinned_to_one_cpu_uses_one_thread():
    code = ("import os; os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]}); "
            "from napari_graphkd.runtime import configure_threads; print(configure_threads())")
    assert run_python(code) == "1"


@pytest.mark.parametrize("bad", [-1, 1.5, "2", True])
def test_bad_thread_counts_are_refused(bad):
    with pytest.raises(ValueError, match="threads must be"):
        resolve_threads(bad)


def test_openmp_waits_passively_unless_the_user_chose_otherwise():
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    code = "import napari_graphkd, os, torch; print(os.environ['OMP_WAIT_POLICY'])"
    assert run_python(code, env) == "PASSIVE"
    assert run_python(code, dict(env, OMP_WAIT_POLICY="ACTIVE")) == "ACTIVE"


def test_blas_pools_keep_one_thread(restore_threads):
    configure_threads()
    blas = [pool for pool in threadpool_info() if pool["user_api"] == "blas"]
    assert blas and all(pool["num_threads"] == 1 for pool in blas)
