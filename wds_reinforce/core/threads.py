"""CPU thread and worker defaults that do not oversubscribe small machines.

PyTorch starts one compute thread per core in every process, and each DataLoader worker is a
process: on 2 cores, the main process's 2 threads plus 2 workers ran a CPU training epoch 4.7x
slower than 1 thread plus 1 worker. The defaults here split the cores this process may run on
(its CPU affinity, and a cgroup CPU quota when one is set) between the workers and the main
process's threads. Importing this module is cheap (no torch).
"""

from __future__ import annotations

import math
import os

__all__ = ["available_cores", "cores_per_process", "default_workers", "default_threads", "describe_defaults"]


def _cgroup_quota() -> float | None:
    """CPUs allowed by a cgroup v2 (``cpu.max``) or v1 (``cpu.cfs_quota_us``) quota, if any."""
    try:
        with open("/sys/fs/cgroup/cpu.max") as f:
            quota, period = f.read().split()[:2]
        if quota != "max":
            return int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        with open("/sys/fs/cgroup/cpu/cpu.cfs_quota_us") as f:
            quota_us = int(f.read())
        with open("/sys/fs/cgroup/cpu/cpu.cfs_period_us") as f:
            period_us = int(f.read())
        if quota_us > 0 and period_us > 0:
            return quota_us / period_us
    except (OSError, ValueError):
        pass
    return None


def available_cores() -> int:
    """The cores this process may use: its CPU affinity, capped by a cgroup quota; at least 1."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        cores = os.cpu_count() or 1
    quota = _cgroup_quota()
    if quota is not None:
        cores = min(cores, max(1, math.ceil(quota)))
    return max(1, cores)


def cores_per_process() -> int:
    """``available_cores`` shared among the processes torchrun started on this machine (``LOCAL_WORLD_SIZE``)."""
    try:
        local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        local = 1
    return max(1, available_cores() // local)


def default_workers(cores: int | None = None, cap: int = 8) -> int:
    """Loader workers: half the cores (at most ``cap``), none on a single core."""
    cores = cores_per_process() if cores is None else cores
    return 0 if cores < 2 else min(cap, cores // 2)


def default_threads(workers: int, cores: int | None = None) -> int:
    """torch threads of the main process: ``OMP_NUM_THREADS`` when set, else the cores the workers leave.

    Each worker runs one thread (PyTorch sets that in DataLoader workers; the producer's
    workers do too), so workers + threads stays within the cores. At least 1.
    """
    try:
        env = int(os.environ.get("OMP_NUM_THREADS", ""))
    except ValueError:
        env = 0
    if env >= 1:
        return env
    cores = cores_per_process() if cores is None else cores
    return max(1, cores - workers)


def describe_defaults(cap: int = 8) -> str:
    """The ``--help`` sentence saying what the automatic choice is on this machine."""
    cores = cores_per_process()
    workers = default_workers(cores, cap)
    env = " (OMP_NUM_THREADS is set: it gives the threads)" if os.environ.get("OMP_NUM_THREADS") else ""
    return f"here: {cores} cores available -> {workers} workers, {default_threads(workers, cores)} threads{env}"
