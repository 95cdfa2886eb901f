import numpy as np
import pytest

from models.images import InvalidImage
from models.predictor import Predictor


def test_backends_agree_and_answers_are_batch_shaped(trained_fp32, photo_bytes):
    """float32 versions: ONNX Runtime and torch agree to 1e-4 (int8 ones: test_quantize.py)."""
    trained = trained_fp32
    onnx_p = Predictor.from_checkpoint(trained.checkpoint, trained.onnx, threads=2)
    torch_p = Predictor.from_checkpoint(trained.checkpoint, backend="torch")
    assert onnx_p.backend == "onnx" and torch_p.backend == "torch"
    assert onnx_p.labels == torch_p.labels == ["cat", "noncat"]
    a, b = onnx_p.predict(photo_bytes), torch_p.predict(photo_bytes)
    assert len(a) == len(photo_bytes) and set(a[0]) == {"cat", "noncat"}
    for x, y in zip(a, b):
        assert sum(x.values()) == pytest.approx(1, abs=1e-5)
        assert abs(x["cat"] - y["cat"]) <= 1e-4
    assert onnx_p.predict([]) == []


def test_preprocess_infer_postprocess_steps(trained, photo_bytes):
    p = Predictor.from_checkpoint(trained.checkpoint, trained.onnx)
    x = np.stack([p.preprocess(d) for d in photo_bytes[:3]])
    assert x.shape == (3, 3, 288, 288) and x.dtype == np.float32
    probs = p.infer(x)
    assert probs.shape == (3, 2)
    assert p.postprocess(probs) == p.predict(photo_bytes[:3])


def test_onnx_backend_exports_when_no_graph_is_given(trained, photo_bytes):
    p = Predictor.from_checkpoint(trained.checkpoint, onnx=None, backend="onnx")
    ref = Predictor.from_checkpoint(trained.checkpoint, trained.onnx)
    assert np.abs(p.infer(ref.preprocess_batch(photo_bytes[:2])) - ref.infer(ref.preprocess_batch(photo_bytes[:2]))).max() < 1e-6


def test_bad_image_raises_invalid_image(trained):
    p = Predictor.from_checkpoint(trained.checkpoint, trained.onnx)
    with pytest.raises(InvalidImage):
        p.predict([b"not an image"])


def test_unknown_backend_and_device(trained):
    with pytest.raises(ValueError):
        Predictor.from_checkpoint(trained.checkpoint, backend="tensorrt")
    with pytest.raises(RuntimeError):
        Predictor.from_checkpoint(trained.checkpoint, device="cuda:99")


def test_from_onnx_needs_the_graph_alone_and_matches_the_checkpoint(trained_fp32, photo_bytes, tmp_path):
    import subprocess
    import sys

    trained = trained_fp32
    expected = Predictor.from_checkpoint(trained.checkpoint, backend="torch").predict(photo_bytes)
    got = Predictor.from_onnx(trained.onnx, threads=2).predict(photo_bytes)
    assert [list(e) for e in expected] == [list(g) for g in got]
    assert max(abs(e[k] - g[k]) for e, g in zip(expected, got) for k in e) <= 1e-4
    (tmp_path / "m.onnx").write_bytes(trained.onnx)
    code = ("import sys; from models.predictor import Predictor;"
            f"p = Predictor.from_onnx(open({str(tmp_path / 'm.onnx')!r}, 'rb').read());"
            "assert p.labels == ['cat', 'noncat'] and 'torch' not in sys.modules, sys.modules.keys()")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_from_onnx_declines_a_graph_without_felis_metadata(trained):
    import onnx

    model = onnx.load_from_string(trained.onnx)
    del model.metadata_props[:]
    assert Predictor.from_onnx(model.SerializeToString()) is None


def test_shared_cores_runs_alone_batches_in_a_second_session_with_the_same_answers(trained, photo_bytes):
    """The API's predictor: batches under load in one-thread runs side by side, a lone one in an
    in-run spinning session of every thread; the same answers either way, also from threads at once."""
    from concurrent.futures import ThreadPoolExecutor

    p = Predictor.from_onnx(trained.onnx, threads=2, shared_cores=True)
    assert p._run_alone is not p._run and p.concurrent_runs == 2
    x = p.preprocess_batch(photo_bytes[:3])
    np.testing.assert_allclose(p.infer(x, alone=True), p.infer(x), atol=1e-6)  # 1 thread against 2
    with ThreadPoolExecutor(2) as pool:  # as the micro-batcher runs them: two batches at once
        together = list(pool.map(p.infer, [x, x[::-1]] * 3))
    for i, got in enumerate(together):
        np.testing.assert_array_equal(got, p.infer(x if i % 2 == 0 else x[::-1]))
    plain = Predictor.from_onnx(trained.onnx, threads=2)
    assert plain._run_alone is plain._run and plain.concurrent_runs == 1
    as_peers_run_it = Predictor.from_onnx(trained.onnx, threads=2, shared_cores=True, batch_threads=2)  # bench/peers
    assert as_peers_run_it.concurrent_runs == 1
    np.testing.assert_allclose(as_peers_run_it.infer(x), p.infer(x), atol=1e-6)
    np.testing.assert_allclose(plain.infer(x, alone=True), p.infer(x), atol=1e-6)


def test_the_gpu_path_takes_uint8_pixels_and_scores_on_the_device_as_the_cpu_path_does(trained_fp32, photo_bytes):
    """Torch on a GPU: preprocess stops at uint8, the runner normalises on the device and computes the
    open-set score there (torch's operations of OodIndex.score); run here on the CPU with the same code."""
    import torch

    from models.predictor import _torch_runner
    from models.preprocess import Preprocessing, preprocess_uint8

    ckpt = trained_fp32.checkpoint
    cpu = Predictor.from_checkpoint(ckpt, backend="torch")
    assert not cpu.uint8_input and cpu.preprocess(photo_bytes[0]).dtype == np.float32
    gpu_style = Predictor(cpu.labels, cpu.preprocessing, _torch_runner(ckpt, torch.device("cpu"), 2, score_on_device=True), "torch")
    gpu_style.uint8_input = True
    pixels = np.stack([gpu_style.preprocess(b) for b in photo_bytes])
    assert pixels.dtype == np.uint8
    np.testing.assert_array_equal(pixels, np.stack([preprocess_uint8(b, Preprocessing.from_dict(ckpt["preprocessing"])) for b in photo_bytes]))
    expected = cpu.infer_scored(cpu.preprocess_batch(photo_bytes))
    got = gpu_style.infer_scored(pixels)
    assert not np.isnan(expected[:, -1]).any()
    np.testing.assert_allclose(got, expected, atol=1e-5)
    np.testing.assert_allclose(gpu_style.infer_scored(cpu.preprocess_batch(photo_bytes)), expected, atol=1e-5)  # float32 still works
