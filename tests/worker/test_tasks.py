"""worker.tasks: what each worker process sets up before its first task."""

from __future__ import annotations

import os


def test_a_worker_process_under_a_cpu_quota_runs_torch_on_the_quota(felis_env, monkeypatch):
    """A 2-CPU pod on a 64-core node, FELIS_TORCH_THREADS unset: torch (the backbone, the head's
    passes) gets 2 threads, not one per node core."""
    import torch

    from service import limits
    from worker import tasks

    before = torch.get_num_threads()
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)))
    monkeypatch.setattr(limits, "cgroup_cpu_limit", lambda *a, **k: 2.0)
    try:
        tasks._init_process()
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_the_heads_passes_follow_the_workers_torch_threads(felis_env, monkeypatch):
    """The head's solver sizes its pass threads from the process's torch threads (set from the CPU
    budget by the worker), not from the node's cores."""
    import numpy as np
    import torch

    from models import linear
    from service import limits
    from worker import tasks

    asked: list[int] = []

    class Spy(linear._Passes):
        def __init__(self, X, y, num_classes, rows, workers, should_stop):
            asked.append(workers)
            super().__init__(X, y, num_classes, rows, workers, should_stop)

    before = torch.get_num_threads()
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)))
    monkeypatch.setattr(limits, "cgroup_cpu_limit", lambda *a, **k: 2.0)
    monkeypatch.setattr(linear, "_Passes", Spy)
    try:
        tasks._init_process()
        rng = np.random.default_rng(0)
        X, y = rng.standard_normal((64, 8)).astype(np.float32), np.arange(64) % 2
        linear.fit_joint(X, y, 2, [linear.Spec(None, 1e-2, None)], max_iter=5)
        assert asked == [2]
    finally:
        torch.set_num_threads(before)
