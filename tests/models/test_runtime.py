import pytest
import torch

from models.runtime import cpu_count, resolve_device, tune_process


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
