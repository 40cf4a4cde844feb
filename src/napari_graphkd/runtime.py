"""CPU policy of the process: how many threads the networks use, and worker threads that sleep when idle.

* Threads follow the CPUs this process may run on (``os.sched_getaffinity``: a container's or a
  ``taskset``'s CPUs, not the machine's) that are idle when threads are configured (Linux: busy
  share below one half over 50 ms, from ``/proc/stat``), at least one: the network keeps its idle
  speed-up from a second core, and does not split its work onto a core another program keeps busy.
* OpenMP threads wait passively: the package sets ``OMP_WAIT_POLICY=PASSIVE`` in its ``__init__``
  (before torch starts its thread pool; a value the user set wins). With the default spinning
  wait, a team whose other core is busy (the viewer, another program) burns its time slices
  spinning at every layer's barrier: the student ran 10x slower with one busy core of two.
  Importing torch before napari_graphkd loses this setting; set the variable in the shell then.
* numpy/scipy's BLAS pool is limited to one thread (``threadpoolctl``): the decoder's numpy work
  is not BLAS-bound, and idle BLAS threads would only spin on the network's cores.
"""
from __future__ import annotations

import os
import time

WAIT_POLICY = ("OMP_WAIT_POLICY", "PASSIVE")  # set by the package __init__ before torch is imported


def usable_cpus() -> int:
    """Number of CPUs this process may run on (its affinity mask; all CPUs where that is unknown)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # macOS, Windows
        return max(1, os.cpu_count() or 1)


def cpu_ticks(cpus: set[int]) -> dict[int, tuple[int, int]] | None:
    """(busy, total) clock ticks so far of each CPU in ``cpus``, from /proc/stat; None where unavailable."""
    try:
        with open("/proc/stat") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    ticks = {}
    for line in lines:
        name, *values = line.split()
        if name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cpus:
            numbers = [int(v) for v in values[:8]]  # user nice system idle iowait irq softirq steal
            ticks[int(name[3:])] = (sum(numbers) - numbers[3] - numbers[4], sum(numbers))
    return ticks or None


def count_idle(before: dict[int, tuple[int, int]], after: dict[int, tuple[int, int]], busy_share: float = 0.5) -> int:
    """CPUs busy less than ``busy_share`` of the time between two :func:`cpu_ticks` readings."""
    idle = 0
    for cpu, (busy1, total1) in after.items():
        busy0, total0 = before.get(cpu, (busy1, total1))
        elapsed = total1 - total0
        idle += elapsed <= 0 or (busy1 - busy0) / elapsed < busy_share
    return idle


def idle_cpus(window: float = 0.05) -> int | None:
    """Usable CPUs that other programs leave idle right now (Linux); None where that cannot be measured."""
    try:
        cpus = set(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return None
    before = cpu_ticks(cpus)
    if before is None:
        return None
    time.sleep(window)
    after = cpu_ticks(cpus)
    return None if after is None else count_idle(before, after)


def default_threads() -> int:
    """One thread per usable CPU that is idle now (all usable CPUs where idleness is unknown), at least one."""
    idle = idle_cpus()
    return usable_cpus() if idle is None else max(1, min(usable_cpus(), idle))


def resolve_threads(threads: int | None) -> int:
    """The thread count to use: ``threads`` itself, or :func:`default_threads` for None/0; ValueError below 0."""
    if threads is None or threads == 0:
        return default_threads()
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 0:
        raise ValueError(f"threads must be a whole number >= 0 (0 = one per usable CPU), got {threads!r}")
    return threads


def configure_threads(threads: int | None = None) -> int:
    """Set torch's thread count (None/0: one per idle usable CPU) and a one-thread BLAS pool; return the count."""
    import torch
    from threadpoolctl import threadpool_limits

    n = resolve_threads(threads)
    torch.set_num_threads(n)
    threadpool_limits(limits=1, user_api="blas")
    return n
