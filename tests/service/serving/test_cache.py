"""service.serving.cache: how a loaded version is sized for the cores this process may really use."""

from __future__ import annotations

import os

from tests.utils.checkpoints import simple_cnn_checkpoint


def test_a_version_loaded_under_a_cpu_quota_runs_as_many_batches_as_the_quota_allows(felis_env, store, settings, monkeypatch):
    """A 1-CPU pod on a 64-core node, FELIS_TORCH_THREADS unset (0): the model's runners follow the
    cgroup quota as the decode pool does, not the node's cores (64 batches in flight, each session
    on 64 threads, under a quota of one core is throttling, not serving)."""
    from models.checkpoint import load_checkpoint
    from models.export import export_onnx
    from service import limits
    from service.serving.cache import ModelCache

    onnx = export_onnx(load_checkpoint(simple_cnn_checkpoint()))
    store.put("versions/q/1.onnx", onnx)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)))
    monkeypatch.setattr(limits, "cgroup_cpu_limit", lambda *a, **k: 1.0)
    assert settings.torch_threads == 0 and limits.cpu_budget() == 1
    cache = ModelCache(store, settings)
    try:
        model = cache.acquire("versions/q/1.ckpt", 1, "versions/q/1.onnx")
        assert model.predictor.concurrent_runs == 1 and model.batcher.parallel == 1
        cache.release(model)
    finally:
        cache.close()
