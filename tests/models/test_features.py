import numpy as np
import torch

from models import networks
from models.features import FeatureExtractor, MemoryFeatureCache, cached_features
from models.preprocess import preprocess

ARCH = {"name": "efficientnet_lite0", "image_size": 128, "pooling": "avgmax", "num_classes": 2}


def _extractor(**kw):
    prep = networks.default_preprocessing("efficientnet_lite0", 128)
    return FeatureExtractor(ARCH, prep, torch.device("cpu"), **kw)


def test_extract_shapes_order_and_batching(small_catvnoncat):
    ex = _extractor(batch_size=4)
    loads = [s.load for s in small_catvnoncat[:10]]
    f = ex.extract(loads)
    assert f.shape == (10, 2560) and f.dtype == np.float32 and np.isfinite(f).all()
    assert (f[:, 1280:] >= f[:, :1280] - 1e-3).all()  # max pooling >= average pooling
    ex_big = _extractor(batch_size=32)
    np.testing.assert_allclose(ex_big.extract(loads[::-1])[::-1], f, rtol=1e-4, atol=1e-4)  # batch-independent
    assert ex.extractor_id == ex_big.extractor_id and "128px" in ex.extractor_id


def test_decoding_on_a_pool_gives_the_same_features_in_order(small_catvnoncat):
    """The GPU worker's path (next batch decoded on a thread pool) = the CPU worker's inline path."""
    loads = [s.load for s in small_catvnoncat[:11]]
    inline = _extractor(batch_size=4, decode_workers=0).extract(loads)
    seen = []
    pooled = _extractor(batch_size=4, decode_workers=3).extract(loads, progress=lambda d, t: seen.append(d))
    np.testing.assert_array_equal(pooled, inline)
    assert seen == [4, 8, 11]


def test_the_torch_backend_normalises_uint8_pixels_itself_to_the_same_features(small_catvnoncat):
    """On a GPU the decode threads stop at uint8 pixels and the device normalises them: the features
    are bit for bit those of float32 pixels from preprocess (same extractor id, so cached ones stay valid)."""
    loads = [s.load for s in small_catvnoncat[:9]]
    ex = _extractor(batch_size=4, backend="torch", decode_workers=2)
    floats = ex._run_torch(np.stack([preprocess(load(), ex.prep) for load in loads]))
    np.testing.assert_array_equal(ex.extract(loads), floats)
    assert _extractor(batch_size=4, backend="torch").extractor_id == ex.extractor_id


def test_a_stop_while_images_are_decoded_ahead_drops_them(small_catvnoncat):
    """Decoding runs batches ahead of the network; a stop raises at once and leaves no decode running."""
    import threading

    loads = [s.load for s in small_catvnoncat[:40]]
    calls = []

    def stop():
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("stopped")

    before = threading.active_count()
    try:
        _extractor(batch_size=4, decode_workers=2).extract(loads, should_stop=stop)
    except RuntimeError as e:
        assert str(e) == "stopped"
    else:
        raise AssertionError("the stop did not raise")
    assert threading.active_count() == before


def test_cache_is_used_and_duplicates_computed_once(small_catvnoncat):
    ex, cache = _extractor(), MemoryFeatureCache()
    samples = small_catvnoncat[:6]
    calls = []
    loads = [lambda s=s: calls.append(s.sha256) or s.load() for s in samples]
    shas = [s.sha256 for s in samples]
    f1, n1 = cached_features(ex, shas + shas[:2], loads + loads[:2], cache)
    assert n1 == 6 and len(calls) == 6 and f1.shape == (8, 2560)
    np.testing.assert_array_equal(f1[6:], f1[:2])
    progress = []
    f2, n2 = cached_features(ex, shas, loads, cache, progress=lambda d, t: progress.append((d, t)))
    assert n2 == 0 and len(calls) == 6 and progress[-1] == (6, 6)
    np.testing.assert_array_equal(f2, f1[:6])


def test_backends_agree(small_catvnoncat):
    """ONNX Runtime (CPU default) = torch float32 to 1e-4; torch bf16 is close (cosine > 0.99)."""
    ort_ex, torch_ex = _extractor(), _extractor(backend="torch")
    assert ort_ex.backend == "onnx" and "ort-fp32" in ort_ex.extractor_id and ort_ex.extractor_id != torch_ex.extractor_id
    x = np.stack([preprocess(s.load(), ort_ex.prep) for s in small_catvnoncat[:4]])
    f_ort = ort_ex._run(x)
    torch_ex.bf16 = False
    f32 = torch_ex._run(x)
    np.testing.assert_allclose(f_ort, f32, atol=1e-4, rtol=1e-4)
    torch_ex.bf16 = True
    f16 = torch_ex._run(x)
    cos = (f32 * f16).sum(1) / np.linalg.norm(f32, axis=1) / np.linalg.norm(f16, axis=1)
    assert cos.min() > 0.99


def test_a_worker_keeps_its_extractor_warm_between_trainings():
    import torch

    from models.features import warm_extractor
    from models.networks import default_preprocessing

    prep = default_preprocessing("efficientnet_lite0", 64)
    arch = {"name": "efficientnet_lite0", "image_size": 64, "pooling": "avgmax", "num_classes": 2}
    first = warm_extractor(arch, prep, torch.device("cpu"))
    assert warm_extractor({**arch, "num_classes": 5}, prep, torch.device("cpu")) is first  # same backbone
    other = warm_extractor({**arch, "image_size": 96}, default_preprocessing("efficientnet_lite0", 96), torch.device("cpu"))
    assert other is not first
