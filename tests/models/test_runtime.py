import pytest
import torch

from models.runtime import cpu_count, resolve_device, tune_process, use_bf16


def test_tune_process_sets_threads_and_reports_malloc_tuning():
    before = torch.get_num_threads()
    try:
        applied = tune_process(1)
        assert torch.get_num_threads() == 1
        assert isinstance(applied, bool)
    finally:
        torch.set_num_threads(before)


def test_tune_process_zero_means_one_thread_per_core():
    before = torch.get_num_threads()
    try:
        tune_process(0)
        assert torch.get_num_threads() == cpu_count()
    finally:
        torch.set_num_threads(before)


def test_resolve_device():
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA is not available"):
            resolve_device("cuda:0")
    else:
        with pytest.raises(RuntimeError):
            resolve_device(f"cuda:{torch.cuda.device_count()}")


@pytest.mark.parametrize("capability, native", [((6, 1), False), ((7, 5), False), ((8, 0), True), ((8, 9), True), ((9, 0), True)])
def test_use_bf16_on_cuda_needs_native_bf16_on_that_device(monkeypatch, capability, native):
    asked = []
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: asked.append(device) or capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)  # says yes for emulated bf16 too
    assert use_bf16(torch.device("cuda:1")) is native
    assert asked == [torch.device("cuda:1")]


def test_use_bf16_on_cpu_is_a_bool():
    assert isinstance(use_bf16(torch.device("cpu")), bool)
