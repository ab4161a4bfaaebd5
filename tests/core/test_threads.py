"""Thread and worker defaults: from the cores this process may use, never more than them."""

from __future__ import annotations

import os

import pytest

from wds_reinforce.core import threads
from wds_reinforce.core.threads import available_cores, cores_per_process, default_threads, default_workers


@pytest.mark.parametrize("cores, workers, main", [(1, 0, 1), (2, 1, 1), (3, 1, 2), (4, 2, 2), (16, 8, 8), (64, 8, 56)])
def test_workers_and_threads_share_the_cores(monkeypatch, cores, workers, main):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert default_workers(cores) == workers
    assert default_threads(workers, cores) == main
    assert workers + main <= max(cores, 1 + workers)


def test_omp_num_threads_wins(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert default_threads(1, 2) == 3
    monkeypatch.setenv("OMP_NUM_THREADS", "junk")
    assert default_threads(1, 2) == 1


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity"), reason="needs sched_getaffinity")
def test_cores_come_from_the_affinity_and_the_quota(monkeypatch):
    monkeypatch.setattr(threads, "_cgroup_quota", lambda: None)
    assert available_cores() == len(os.sched_getaffinity(0))
    monkeypatch.setattr(threads.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3, 4, 5, 6, 7})
    assert available_cores() == 8
    monkeypatch.setattr(threads, "_cgroup_quota", lambda: 2.5)  # docker --cpus 2.5
    assert available_cores() == 3
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # torchrun: two processes on this machine
    assert cores_per_process() == 1
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert cores_per_process() == 1
