"""CPU policy of the process: how many threads the networks use, and worker threads that sleep when idle.

* Threads follow the CPUs this process may run on (``os.sched_getaffinity``: a container's or a
  ``taskset``'s CPUs, not the machine's), so the network's idle speed-up from a second core is kept.
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

WAIT_POLICY = ("OMP_WAIT_POLICY", "PASSIVE")  # set by the package __init__ before torch is imported


def usable_cpus() -> int:
    """Number of CPUs this process may run on (its affinity mask; all CPUs where that is unknown)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # macOS, Windows
        return max(1, os.cpu_count() or 1)


def resolve_threads(threads: int | None) -> int:
    """The thread count to use: ``threads`` itself, or one per usable CPU for None/0; ValueError below 0."""
    if threads is None or threads == 0:
        return usable_cpus()
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 0:
        raise ValueError(f"threads must be a whole number >= 0 (0 = one per usable CPU), got {threads!r}")
    return threads


def configure_threads(threads: int | None = None) -> int:
    """Set torch's thread count (None/0: one per usable CPU) and a one-thread BLAS pool; return the count."""
    import torch
    from threadpoolctl import threadpool_limits

    n = resolve_threads(threads)
    torch.set_num_threads(n)
    threadpool_limits(limits=1, user_api="blas")
    return n
