"""bench/gpu_check.py without a GPU: the CPU dry run goes through every phase; no CUDA means exit 2."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import DATASETS, needs_datasets

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "bench" / "gpu_check.py"


@needs_datasets()
@pytest.mark.timeout(260)
def test_dry_run_goes_through_every_phase_on_cpu(tmp_path: Path):
    out = tmp_path / "check.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--dry-run-cpu", "--datasets", str(DATASETS), "--json", str(out)],
                          capture_output=True, text=True, timeout=200)
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0, text
    for section in ("== environment", "torch:", "cudnn:", "== warm-up", "context + first kernel", "first training",
                    "== photos", "cold:", "warm:", "test (", "== task", "uploads.ingest", "== fine-tune", "lean loop, eager",
                    "train_network as shipped", "torch.compile (aot_eager", "lean loop, compiled", "== scale", "features int8",
                    "features fp32", "uploaded through uploads.ingest", "cold task:", "warm task:", "== predict", "gpu (torch",
                    "onnx_cpu (onnx", "== summary"):
        assert section in text, f"{section!r} missing from:\n{text}"
    assert "FAILED" not in text and "DEADLINE" not in text, text
    report = json.loads(out.read_text())
    assert report["dry_run"] and not report["errors"]
    photos, finetune = report["phases"]["photos"], report["phases"]["finetune"]
    assert photos["cold_features_computed"] == photos["n_train"] == 40 and photos["warm_features_computed"] == 0
    assert 0 <= photos["test_accuracy"] <= 1 and photos["n_test"] == 20
    assert finetune["eager_img_s"] > 0 and finetune["train_network_img_s"] > 0 and finetune["compiled_img_s"] > 0
    assert {g["verdict"] for g in report["goals"]} <= {"info", "n/a (dry run)"}
    scale, predict = report["phases"]["scale"], report["phases"]["predict"]
    assert scale["n_images"] == 300 and scale["cold_features_computed"] == 300 and scale["warm_features_computed"] == 0
    assert scale["precision"] in ("int8", "fp32") and scale["int8_img_s"] > 0 and scale["fp32_img_s"] > 0
    assert predict["gpu"]["requests"] > 0 and predict["onnx_cpu"]["requests"] > 0 and predict["gpu"]["concurrency"] == 8


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_without_cuda_it_prints_the_environment_and_exits_2():
    proc = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "== environment" in proc.stdout and "torch:" in proc.stdout
    assert "no CUDA device: this check needs a GPU" in proc.stderr


@pytest.mark.timeout(120)
def test_phases_runs_only_those_named_and_skipped_goals_do_not_fail(tmp_path: Path):
    """--phases finetune needs no photos (the device check can send the photos in a second call)."""
    out = tmp_path / "check.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--dry-run-cpu", "--phases", "finetune", "--seconds", "0.5",
                           "--datasets", str(tmp_path / "none"), "--json", str(out)], capture_output=True, text=True, timeout=90)
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0, text
    assert "== fine-tune" in text and "== photos" not in text and "== warm-up" not in text
    report = json.loads(out.read_text())
    verdicts = {g["goal"]: g["verdict"] for g in report["goals"]}
    assert verdicts["photos worker task (run_training), cold"] == "skipped" and verdicts["fine-tune Lite0, lean loop, eager"] == "n/a (dry run)"
    assert report["phases"]["finetune"]["eager"]["seconds"] < 2


def test_phases_rejects_an_unknown_name():
    proc = subprocess.run([sys.executable, str(SCRIPT), "--dry-run-cpu", "--phases", "photos,gpu"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "unknown phase(s) ['gpu']" in proc.stderr
