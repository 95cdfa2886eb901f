"""service.store.features: cached features as float16 blobs (local disk and S3 through moto), the
worker's bounded local copies, blobs that do not read as features, the collection of feature
blobs no image uses; and the blob stores' list(prefix) the collection walks."""

from __future__ import annotations

import hashlib
import logging
import os
import time
from pathlib import Path

import numpy as np
import pytest

from service.errors import StorageFull
from service.store.blobs import (
    LocalBlobStore,
    S3BlobStore,
    feature_key,
    image_key,
    parse_feature_key,
)
from service.store.features import (
    FLOAT16_MAX,
    HEADER_BYTES,
    BlobFeatureCache,
    LocalFeatureCache,
    decode,
    encode,
)
from tests.utils.s3 import REGION

EXTRACTOR = "efficientnet_lite0-288px-center_crop0.875-avgmax-ort-int8-0123456789ab-w0123456789ab-v1"


def sha(i: int) -> str:
    return hashlib.sha256(f"image {i}".encode()).hexdigest()


def features(n: int, dim: int = 2560, seed: int = 0) -> np.ndarray:
    """Vectors shaped like the default extractor's: ReLU6 outputs pooled (in [0, 6]), many small."""
    rng = np.random.default_rng(seed)
    return (6 * rng.beta(0.5, 3, (n, dim))).astype(np.float32)


def s3_store(moto_server, bucket: str, **kw) -> S3BlobStore:
    return S3BlobStore(bucket, "felis/", moto_server.endpoint, REGION, **kw)


class Counting:
    """A blob store that is not on local disk (as S3 is not) over a real local one, counting calls."""

    def __init__(self, root: Path):
        self.inner, self.calls = LocalBlobStore(root), {"get": 0, "put": 0, "list": 0}

    def get(self, key):
        self.calls["get"] += 1
        return self.inner.get(key)

    def put(self, key, data):
        self.calls["put"] += 1
        self.inner.put(key, data)

    def exists(self, key):
        return self.inner.exists(key)

    def delete(self, key):
        self.inner.delete(key)

    def list(self, prefix, **kw):
        self.calls["list"] += 1
        return self.inner.list(prefix, **kw)

    def check(self):
        self.inner.check()


# --- keys --------------------------------------------------------------------------------------


def test_a_feature_key_is_addressed_by_extractor_and_image_sha256():
    s = sha(1)
    assert feature_key(EXTRACTOR, s) == f"features/{EXTRACTOR}/{s[:2]}/{s}.f16"
    assert parse_feature_key(feature_key(EXTRACTOR, s)) == (EXTRACTOR, s)
    for other in (image_key(s), f"features/{EXTRACTOR}/00/{s}.f16", f"features/{EXTRACTOR}/{s[:2]}/{s}", "features/x/"):
        assert parse_feature_key(other) is None


@pytest.mark.parametrize("extractor", ["", "..", ".hidden", "a/b", "../x", "a b", "x" * 129, "é", None, 7])
def test_an_extractor_id_must_be_one_safe_path_component(extractor):
    with pytest.raises(ValueError, match="extractor id"):
        feature_key(extractor, sha(1))


@pytest.mark.parametrize("bad", ["", "ab", "A" * 64, "g" * 64, "a" * 63, "a" * 65, "../" + "a" * 61])
def test_an_image_sha256_must_be_64_lowercase_hex_digits(bad):
    with pytest.raises(ValueError, match="sha256"):
        feature_key(EXTRACTOR, bad)


# --- the blob format ------------------------------------------------------------------------------


def test_a_blob_is_a_16_byte_header_and_float16_values():
    v = features(1)[0]
    data = encode(v)
    assert len(data) == HEADER_BYTES + 2 * 2560 and data[:4] == b"FELF"
    np.testing.assert_array_equal(decode(data), v.astype(np.float16))
    assert decode(data).dtype == np.dtype("<f2")


def test_float16_keeps_the_features_within_its_precision():
    """Relative error at most 2**-11 (half a unit in the 11th bit) for normal float16 values; an
    absolute 2**-25 below them (subnormals). The whole [0, 6] range of the features fits."""
    v = features(16).ravel()
    back = decode(encode(v)).astype(np.float32)
    assert (np.abs(back - v) <= np.maximum(np.abs(v) * 2.0 ** -11, 2.0 ** -25)).all()
    assert np.abs(back - v).max() <= 6 * 2.0 ** -11


def test_a_value_float16_cannot_hold_is_never_stored_as_inf():
    assert encode(np.array([1.0, FLOAT16_MAX, -FLOAT16_MAX], np.float32)) is not None
    for bad in ([1.0, 65520.0], [-70000.0, 1.0], [np.inf, 1.0], [np.nan, 1.0]):
        assert encode(np.array(bad, np.float32)) is None


@pytest.mark.parametrize("shape", [(), (0,), (2, 3), ((1 << 16) + 1,)])
def test_what_is_no_vector_is_refused(shape):
    with pytest.raises(ValueError, match="1-D"):
        encode(np.zeros(shape, np.float32))


def test_truncated_foreign_and_corrupted_blobs_read_as_missing():
    good = encode(features(1, 16)[0])
    flipped = bytearray(good)
    flipped[HEADER_BYTES + 3] ^= 0x40
    longer_dim = bytearray(good)
    longer_dim[8] += 1
    for bad in (b"", good[:10], good[:-1], good + b"\0", bytes(flipped), bytes(longer_dim), b"RIFF" + good[4:],
                b"\x89PNG\r\n\x1a\n" + bytes(100), bytes(len(good))):
        assert decode(bad) is None


def test_the_extractor_features_are_bounded_as_float16_needs():
    """EfficientNet-Lite's features are ReLU6 outputs, average- and max-pooled: in [0, 6], far
    inside float16's range, so the real ones always round-trip (within precision)."""
    import torch

    from models import networks
    from models.features import FeatureExtractor
    from tests.conftest import asset_images

    arch = {"name": "efficientnet_lite0", "image_size": 64, "pooling": "avgmax", "num_classes": 2}
    ex = FeatureExtractor(arch, networks.default_preprocessing("efficientnet_lite0", 64), torch.device("cpu"))
    paths = asset_images("train", "cat")[:4] + asset_images("train", "noncat")[:4]
    f = ex.extract([p.read_bytes for p in paths])
    assert f.min() >= 0 and f.max() <= 6 + 1e-3
    for v in f:
        back = decode(encode(v)).astype(np.float32)
        assert np.abs(back - v).max() <= 6 * 2.0 ** -11


# --- the cache on the local blob store -------------------------------------------------------------


def test_round_trip_on_the_local_store_reads_the_blobs_in_place(tmp_path):
    store = LocalBlobStore(tmp_path / "blobs")
    cache = BlobFeatureCache(store, cache_dir=tmp_path / "copies", max_bytes=1 << 20)
    f = features(5)
    shas = [sha(i) for i in range(5)]
    cache.put_many(EXTRACTOR, dict(zip(shas, f)))
    got = cache.get_many(EXTRACTOR, shas + [sha(99)] + shas[:2])  # a missing one and repeats
    assert set(got) == set(shas)
    for s, v in zip(shas, f):
        assert got[s].dtype == np.float16 and got[s].shape == (2560,)
        np.testing.assert_array_equal(got[s], v.astype(np.float16))
    assert store.exists(feature_key(EXTRACTOR, shas[0]))
    assert not (tmp_path / "copies").exists()  # no second copy of blobs that are on local disk already
    matrix, found = cache.get_matrix(EXTRACTOR, [sha(99), shas[3]])
    assert matrix.shape == (2, 2560) and matrix.dtype == np.float16 and found.tolist() == [False, True]
    assert not matrix[0].any()
    assert cache.get_matrix("other-extractor", shas)[0].shape == (5, 0)  # nothing cached: no width


def test_a_bad_blob_is_missing_then_computed_again_and_rewritten(tmp_path):
    store = LocalBlobStore(tmp_path)
    cache = BlobFeatureCache(store, cache_dir=tmp_path / "copies", max_bytes=1 << 20)
    f = features(3, 32)
    shas = [sha(i) for i in range(3)]
    cache.put_many(EXTRACTOR, dict(zip(shas, f)))
    path = store.local_path(feature_key(EXTRACTOR, shas[0]))
    path.write_bytes(path.read_bytes()[:-7])  # truncated
    store.put(feature_key(EXTRACTOR, shas[1]), b"not features at all")  # foreign
    assert set(cache.get_many(EXTRACTOR, shas)) == {shas[2]}
    cache.put_many(EXTRACTOR, {shas[0]: f[0], shas[1]: f[1]})  # what models.features does with what is missing
    assert set(cache.get_many(EXTRACTOR, shas)) == set(shas)


def test_a_vector_of_another_length_than_the_others_reads_as_missing(tmp_path):
    cache = BlobFeatureCache(LocalBlobStore(tmp_path), cache_dir=tmp_path / "c", max_bytes=1)
    cache.put_many(EXTRACTOR, {sha(0): np.ones(8, np.float32), sha(1): np.ones(9, np.float32)})
    assert set(cache.get_many(EXTRACTOR, [sha(0), sha(1)])) == {sha(0)}


def test_vectors_float16_cannot_hold_are_left_uncached_and_said(tmp_path, caplog):
    cache = BlobFeatureCache(LocalBlobStore(tmp_path), cache_dir=tmp_path / "c", max_bytes=1)
    with caplog.at_level(logging.WARNING, logger="felis.features"):
        cache.put_many(EXTRACTOR, {sha(0): np.array([1e6, 1.0]), sha(1): np.array([np.nan, 1.0]),
                                   sha(2): np.array([6.0, 1.0])})
    assert set(cache.get_many(EXTRACTOR, [sha(0), sha(1), sha(2)])) == {sha(2)}
    assert "2 feature vectors" in caplog.text and "float16" in caplog.text


def test_a_full_store_stops_the_writes_without_failing_the_training(tmp_path, caplog):
    """On local disk the blobs go in batches (one filesystem sync each): the store filling up at the
    second batch stops the writes, the first batch stays, and the training is only warned."""
    from service.store import features as module

    class Full(LocalBlobStore):
        batches = 0

        def put_many(self, items):
            Full.batches += 1
            if Full.batches > 1:
                raise StorageFull("no space left in blob storage", code="storage_full")
            super().put_many(items)

    n = 2 * module._LOCAL_BATCH + 10
    cache = BlobFeatureCache(Full(tmp_path), cache_dir=tmp_path / "c", max_bytes=1, workers=2)
    with caplog.at_level(logging.WARNING, logger="felis.features"):
        cache.put_many(EXTRACTOR, {sha(i): np.ones(4, np.float32) for i in range(n)})
    assert Full.batches == 2  # stopped at the first failure
    assert "not all stored" in caplog.text
    assert len(cache.get_many(EXTRACTOR, [sha(i) for i in range(n)])) == module._LOCAL_BATCH


def test_bad_lookups_are_refused(tmp_path, monkeypatch):
    from service.store import features as module

    cache = BlobFeatureCache(LocalBlobStore(tmp_path), cache_dir=tmp_path / "c", max_bytes=1)
    with pytest.raises(ValueError, match="sha256"):
        cache.get_many(EXTRACTOR, ["../../etc/passwd"])
    with pytest.raises(ValueError, match="extractor id"):
        cache.put_many("../x", {sha(0): np.ones(2)})
    monkeypatch.setattr(module, "MAX_LOOKUP", 3)
    with pytest.raises(ValueError, match="at most 3"):
        cache.get_many(EXTRACTOR, [sha(i) for i in range(4)])
    with pytest.raises(ValueError, match="max_bytes"):
        BlobFeatureCache(LocalBlobStore(tmp_path), cache_dir=tmp_path / "c", max_bytes=-1)


def test_the_settings_put_the_local_copies_under_the_data_dir(felis_env, monkeypatch):
    from service.config import Settings

    settings = Settings()
    assert settings.feature_cache_dir == felis_env.resolve() / "feature-cache"
    assert settings.feature_cache_bytes == 4 * 1024 ** 3
    monkeypatch.setenv("FELIS_FEATURE_CACHE_BYTES", "-1")
    with pytest.raises(ValueError, match="feature_cache_bytes"):
        Settings()


# --- the local copies of a remote store -------------------------------------------------------------


def test_a_remote_store_is_read_through_local_copies(tmp_path):
    store = Counting(tmp_path / "remote")
    f, shas = features(4, 64), [sha(i) for i in range(4)]
    writer = BlobFeatureCache(store, cache_dir=tmp_path / "worker-a", max_bytes=1 << 20)
    writer.put_many(EXTRACTOR, dict(zip(shas, f)))
    assert store.calls["put"] == 4 and (tmp_path / "worker-a" / feature_key(EXTRACTOR, shas[0])).is_file()

    reader = BlobFeatureCache(store, cache_dir=tmp_path / "worker-b", max_bytes=1 << 20)  # another worker
    got = reader.get_many(EXTRACTOR, shas[:2])  # misses: fetched, and kept
    assert store.calls["get"] == 2 and set(got) == set(shas[:2])
    got = reader.get_many(EXTRACTOR, shas)  # two hits, two misses
    assert store.calls["get"] == 4 and set(got) == set(shas)
    np.testing.assert_array_equal(got[shas[3]], f[3].astype(np.float16))
    reader.get_many(EXTRACTOR, shas)  # warm: nothing from the store
    assert store.calls["get"] == 4

    copy = tmp_path / "worker-b" / feature_key(EXTRACTOR, shas[0])
    copy.write_bytes(copy.read_bytes()[:20])  # a local copy gone bad: fetched again
    assert set(reader.get_many(EXTRACTOR, shas)) == set(shas) and store.calls["get"] == 5
    assert decode(copy.read_bytes()) is not None


def test_a_cold_read_lists_a_crowded_folder_instead_of_asking_for_each_missing_blob(tmp_path):
    store = Counting(tmp_path / "remote")
    shas = [sha(i) for i in range(8000)]  # about 31 a folder
    crowded = [s for s in shas if s[:2] == "00"]
    assert len(crowded) >= 16
    BlobFeatureCache(store, cache_dir=tmp_path / "writer", max_bytes=1 << 30).put_many(
        EXTRACTOR, {crowded[0]: np.ones(4, np.float32)})
    cache = BlobFeatureCache(store, cache_dir=tmp_path / "copies", max_bytes=1 << 30)
    got = cache.get_many(EXTRACTOR, crowded)
    assert set(got) == {crowded[0]}
    assert store.calls["list"] == 1 and store.calls["get"] == 1


def test_missing_names_what_is_not_cached_without_reading_it(tmp_path):
    """What a training fans out to shards (service.domain.extraction): in place on local disk,
    through local copies and a listing on a store that is not (a crowded folder is listed once,
    nothing is fetched); an image listed twice is named once."""
    shas = [sha(i) for i in range(6000)]
    local = BlobFeatureCache(LocalBlobStore(tmp_path / "blobs"), cache_dir=None, max_bytes=0)
    local.put_many(EXTRACTOR, {s: np.ones(4, np.float32) for s in shas[::2]})
    assert local.missing(EXTRACTOR, shas + shas[:10]) == shas[1::2]
    assert local.missing("another-extractor", shas[:3]) == shas[:3]

    store = Counting(tmp_path / "remote")
    BlobFeatureCache(store, cache_dir=tmp_path / "writer", max_bytes=1 << 30).put_many(
        EXTRACTOR, {s: np.ones(4, np.float32) for s in shas[::3]})
    cache = BlobFeatureCache(store, cache_dir=tmp_path / "copies", max_bytes=1 << 30)
    cache.get_many(EXTRACTOR, shas[:300])  # some local copies
    before = dict(store.calls)
    assert cache.missing(EXTRACTOR, shas) == [s for i, s in enumerate(shas) if i % 3]
    assert store.calls["get"] == before["get"] and store.calls["list"] - before["list"] <= 256  # one listing a folder


def test_the_local_copies_stay_within_their_bound_least_recently_used_first(tmp_path):
    store = Counting(tmp_path / "remote")
    shas = [sha(i) for i in range(25)]
    BlobFeatureCache(store, cache_dir=tmp_path / "w", max_bytes=1 << 30).put_many(
        EXTRACTOR, {s: np.ones(8, np.float32) for s in shas})
    probe = os.stat(tmp_path / "w" / feature_key(EXTRACTOR, shas[0]))
    unit = max(probe.st_blocks * 512, probe.st_size)  # what one copy takes on this disk
    cache = BlobFeatureCache(store, cache_dir=tmp_path / "copies", max_bytes=20 * unit)
    local = cache.local
    cache.get_many(EXTRACTOR, shas[:10])
    for i, s in enumerate(shas[:10]):  # read long ago, in this order
        then = time.time() - 10_000 + i
        os.utime(local.path(feature_key(EXTRACTOR, s)), (then, then))
    cache.get_many(EXTRACTOR, shas[:1])  # the oldest is read again: used most recently now
    cache.get_many(EXTRACTOR, shas[10:])  # 15 more: 25 copies, the bound holds 20
    assert local.size() <= 20 * unit
    kept = {s for s in shas if local.path(feature_key(EXTRACTOR, s)).exists()}
    gone = set(shas) - kept
    assert {shas[0], *shas[10:]} <= kept  # the one read again stays
    assert len(gone) >= 5 and gone == set(shas[1:1 + len(gone)])  # the least recently used went first
    gets = store.calls["get"]
    assert set(cache.get_many(EXTRACTOR, shas)) == set(shas)  # evicted copies are fetched again
    assert store.calls["get"] == gets + len(set(shas) - kept)


def test_the_local_cache_refuses_an_empty_bound_and_ignores_a_full_disk(tmp_path, monkeypatch):
    with pytest.raises(ValueError):
        LocalFeatureCache(tmp_path, 0)
    assert BlobFeatureCache(Counting(tmp_path / "r"), cache_dir=tmp_path / "c", max_bytes=0).local is None
    local = LocalFeatureCache(tmp_path / "c", 1 << 20)

    def full(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("tempfile.mkstemp", full)
    local.write(feature_key(EXTRACTOR, sha(0)), b"x")  # no copy, no failure
    assert local.read(feature_key(EXTRACTOR, sha(0))) is None


# --- S3, through moto ------------------------------------------------------------------------------------


def test_round_trip_on_s3_with_local_copies(moto_server, s3_bucket, tmp_path):
    store = s3_store(moto_server, s3_bucket)
    f, shas = features(40, 128), [sha(i) for i in range(40)]
    BlobFeatureCache(store, cache_dir=tmp_path / "a", max_bytes=1 << 20).put_many(EXTRACTOR, dict(zip(shas, f)))
    assert f"felis/{feature_key(EXTRACTOR, shas[0])}" in moto_server.keys(s3_bucket, "felis/features/")
    cache = BlobFeatureCache(store, cache_dir=tmp_path / "b", max_bytes=1 << 20)
    matrix, found = cache.get_matrix(EXTRACTOR, shas + [sha(1000)])
    assert found.tolist() == [True] * 40 + [False]
    np.testing.assert_array_equal(matrix[:40], f.astype(np.float16))
    assert (tmp_path / "b" / feature_key(EXTRACTOR, shas[5])).is_file()
    moto_server.client().put_object(Bucket=s3_bucket, Key=f"felis/{feature_key(EXTRACTOR, sha(1000))}", Body=b"junk")
    assert sha(1000) not in cache.get_many(EXTRACTOR, [sha(1000)])


def test_features_are_shared_by_datasets_with_the_same_images(session, store, settings):
    """Two datasets of the same images: the second one's training computes no features."""
    import io

    from service.domain import datasets, pipeline, trainings, uploads
    from service.store.tables import ModelVersion
    from tests.conftest import ASSETS, zip_folder

    computed = {}
    for name in ("a", "b"):
        dataset = datasets.create(session, name)
        session.commit()
        archive = io.BytesIO(zip_folder(ASSETS / "cifar-cat" / "train"))
        uploads.ingest(session, store, dataset, uploads.archive_candidates(archive, settings), settings)
        t = trainings.request(session, name, {"image_size": 64, "cv_folds": 2}, settings)
        session.commit()
        assert pipeline.run_training(t.id, settings=settings, store=store) == "succeeded"
        row = session.query(ModelVersion).filter_by(dataset_id=dataset.id).one()
        computed[name] = row.metrics["features_computed"]
        extractor = row.metrics["feature_extractor"]
    assert computed == {"a": 32, "b": 0}
    assert len(list(store.list(f"features/{extractor}/"))) == 32


# --- the collection of feature blobs no image uses ------------------------------------------------


@pytest.mark.parametrize("backend", ["local", "s3"])
def test_the_collection_removes_feature_blobs_no_image_uses(backend, felis_env, session, settings, request):
    from service.domain import cleanup, datasets, uploads
    from service.store.tables import Image

    store = LocalBlobStore(settings.storage_path) if backend == "local" else \
        s3_store(request.getfixturevalue("moto_server"), request.getfixturevalue("s3_bucket"))
    ds = datasets.create(session, "pets")
    session.commit()
    used, gone, orphan = sha(1), sha(2), sha(3)
    for s in (used, gone):
        session.add(Image(dataset_id=ds.id, sha256=s, label="cat", filename=f"{s[:8]}.png", format="PNG",
                          width=8, height=8, size_bytes=10, phash="0" * 16))
        store.put(image_key(s), b"image")
    session.commit()
    cache = BlobFeatureCache(store, cache_dir=felis_env / "c", max_bytes=1 << 20)
    for extractor in ("lite0-a", "lite0-b"):
        cache.put_many(extractor, {s: np.ones(4, np.float32) for s in (used, gone, orphan)})
    session.query(Image).filter_by(sha256=gone).delete()  # as images.delete does: the blob listed
    uploads.orphan_blobs(session, [image_key(gone)])
    session.commit()
    settings.blob_grace_seconds = 0
    cleanup._features_scanned_to = None
    counts = cleanup.collect(session, store, settings)
    assert counts["blobs"] == 1 and counts["features"] == 2  # gone's with its blob; the orphan's by the scan
    left = {parse_feature_key(k) for k in store.list("features/")}
    assert left == {("lite0-a", used), ("lite0-b", used)}
    assert not store.exists(image_key(gone)) and store.exists(image_key(used))


# --- list(prefix), on both backends --------------------------------------------------------------------

KEYS = ["features/a/00/x", "features/a/01/y", "features/a/01/z", "features/b-c/00/w", "features/b/ff/v",
        "images/ab/abc", "models/1/t/r/model.pt"]


@pytest.fixture(params=["local", "s3"])
def listed(request, tmp_path):
    if request.param == "local":
        store = LocalBlobStore(tmp_path)
    else:
        store = s3_store(request.getfixturevalue("moto_server"), request.getfixturevalue("s3_bucket"))
        store.list_page_size = 2  # several pages for every listing
    for key in KEYS:
        store.put(key, b"x")
    return store


def test_list_walks_the_keys_under_a_prefix_in_order(listed):
    under = list(listed.list("features/"))
    assert sorted(under) == sorted(k for k in KEYS if k.startswith("features/"))
    assert list(listed.list("features/a/01/")) == ["features/a/01/y", "features/a/01/z"]
    assert set(listed.list("features/b")) == {"features/b-c/00/w", "features/b/ff/v"}  # a start of a name, as S3
    assert list(listed.list("nothing/")) == [] and list(listed.list("features/zz")) == []
    assert sorted(listed.list("")) == sorted(KEYS)


def test_list_goes_on_after_a_key_and_covers_everything_a_window_at_a_time(listed):
    from itertools import islice

    seen, after = [], ""
    while True:
        window = list(islice(listed.list("features/", start_after=after), 2))
        if not window:
            break
        seen += window
        after = window[-1]
    assert seen == list(listed.list("features/"))
    assert list(listed.list("features/", start_after="features/a/01/y")) == seen[seen.index("features/a/01/y") + 1:]
    assert list(listed.list("features/", start_after="features/a/00/xx")) == seen[1:]  # a key deleted since


def test_list_one_level_gives_the_folders(listed):
    assert sorted(listed.list("features/", recursive=False)) == ["features/a/", "features/b-c/", "features/b/"]
    assert list(listed.list("features/a/01/", recursive=False)) == ["features/a/01/y", "features/a/01/z"]


@pytest.mark.parametrize("prefix", ["../", "/abs/", "a//b/", "a/../b"])
def test_list_refuses_a_prefix_outside_the_store(listed, prefix):
    with pytest.raises(ValueError):
        list(listed.list(prefix))


def test_local_list_skips_temp_files(tmp_path):
    store = LocalBlobStore(tmp_path)
    store.put("features/a/00/x", b"x")
    (tmp_path / "features" / "a" / "00" / ".tmp-half").write_bytes(b"h")
    assert list(store.list("features/")) == ["features/a/00/x"]
