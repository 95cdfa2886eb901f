"""felis_client: configuration, upload planning and the event stream in isolation (httpx.MockTransport),
then every endpoint against a real `felis up` (API + worker)."""

from __future__ import annotations

import hashlib
import json
import zipfile
from pathlib import Path

import httpx
import pytest

from felis_client import Client, FelisError, load_config
from felis_client import upload as up
from felis_client.client import _sse_data
from tests.conftest import ASSETS, asset_images, zip_folder

TRAIN = ASSETS / "cifar-cat" / "train"
TEST = ASSETS / "cifar-cat" / "test"


def _mock(handler) -> Client:
    return Client("http://felis.test", api_key="fk_secret", transport=httpx.MockTransport(handler))


# --- configuration -------------------------------------------------------------------------------


def test_config_precedence_argument_env_file(monkeypatch, tmp_path):
    config = tmp_path / "config.toml"
    config.write_text('url = "http://from-file:1/"\napi_key = "file-key"\n')
    monkeypatch.setenv("FELIS_CONFIG", str(config))
    monkeypatch.delenv("FELIS_URL", raising=False)
    monkeypatch.delenv("FELIS_API_KEY", raising=False)
    assert load_config() == load_config(path=config)
    assert (load_config().url, load_config().api_key) == ("http://from-file:1", "file-key")
    monkeypatch.setenv("FELIS_URL", "http://from-env:2")
    monkeypatch.setenv("FELIS_API_KEY", "env-key")
    assert (load_config().url, load_config().api_key) == ("http://from-env:2", "env-key")
    assert load_config("http://arg:3", "arg-key").url == "http://arg:3"
    assert load_config("http://arg:3", "arg-key").api_key == "arg-key"


def test_config_defaults_and_a_broken_file(no_felis_config, tmp_path):
    assert load_config().url == "http://127.0.0.1:8000" and load_config().api_key is None
    bad = tmp_path / "bad.toml"
    bad.write_text("url = ")
    with pytest.raises(ValueError, match="config file"):
        load_config(path=bad)


# --- requests and errors ----------------------------------------------------------------------------


def test_bearer_key_and_error_answers_become_felis_errors():
    seen = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if request.url.path == "/v1/datasets/nope":
            return httpx.Response(404, json={"error": {"code": "dataset_not_found", "message": "no such dataset"}})
        return httpx.Response(502, text="bad gateway")

    felis = _mock(handler)
    with pytest.raises(FelisError) as e:
        felis.dataset("nope")
    assert (e.value.status, e.value.code, e.value.message) == (404, "dataset_not_found", "no such dataset")
    assert seen[0].headers["authorization"] == "Bearer fk_secret"
    with pytest.raises(FelisError) as e:
        felis.datasets()
    assert (e.value.status, e.value.code) == (502, "http_error") and "bad gateway" in e.value.message


def test_no_key_no_authorization_header(no_felis_config):
    seen = []
    felis = Client("http://felis.test", transport=httpx.MockTransport(
        lambda r: seen.append(r) or httpx.Response(200, json={"status": "ok"})))
    assert felis.health() == {"status": "ok"}
    assert "authorization" not in seen[0].headers


def test_unreachable_server_is_a_felis_error(no_felis_config):
    from tests.utils.processes import free_port

    with Client(f"http://127.0.0.1:{free_port()}", timeout=2) as felis:
        with pytest.raises(FelisError) as e:
            felis.datasets()
    assert e.value.status == 0 and e.value.code == "connection_error"


# --- upload planning ---------------------------------------------------------------------------------


def _members(batch: up.Batch) -> list[str]:
    with zipfile.ZipFile(batch.archive) as zf:
        return sorted(zf.namelist())


def test_a_folder_per_label_becomes_an_archive(tmp_path):
    (tmp_path / ".DS_Store").write_bytes(b"x")
    batches = list(up.plan(TRAIN))
    try:
        assert len(batches) == 1 and batches[0].archive is not None
        names = _members(batches[0])
        assert len(names) == 32 and {n.split("/")[0] for n in names} == {"cat", "noncat"}
    finally:
        for b in batches:
            b.cleanup()
    assert not batches[0].archive.exists()  # temporary zips are removed


def test_a_folder_of_split_folders_is_refused_before_anything_is_sent(tmp_path):
    """myset/train/cat/, myset/test/cat/: before, each image went up as train/cat_1.jpg, the label
    'train' holding every class (the service cannot tell once the subfolders are flattened)."""
    for split in ("train", "test"):
        for label in ("cat", "noncat"):
            (tmp_path / split / label).mkdir(parents=True)
            for src in asset_images("train", label)[:2]:
                (tmp_path / split / label / src.name).write_bytes(src.read_bytes())
    with pytest.raises(ValueError, match=r"split folders with folders inside \(test/, train/\).*one folder per label"):
        list(up.plan(tmp_path))
    (batch,) = list(up.plan(tmp_path / "train"))  # one split: its label folders are the labels
    assert {n.split("/")[0] for n in _members(batch)} == {"cat", "noncat"}
    batch.cleanup()
    (tmp_path / "trains").mkdir()
    (tmp_path / "trains" / "a.jpg").write_bytes(asset_images("train", "cat")[0].read_bytes())
    (tmp_path / "train" / "b.jpg").write_bytes(asset_images("train", "cat")[1].read_bytes())
    with pytest.raises(ValueError, match="train/"):  # train/ still holds folders
        list(up.plan(tmp_path))
    from service.domain.uploads import SPLIT_FOLDERS

    assert up.SPLIT_FOLDERS == SPLIT_FOLDERS  # the client's copy of the service's names


def test_a_folder_of_one_folder_of_folders_gets_a_note_not_a_guess(tmp_path):
    """data/PetImages/Cat/, data/PetImages/Dog/ (Kaggle's zip unpacked): every image goes up as
    label PetImages, as the rule says (a folder's subfolders are its labels); cat/indoor/ beside
    cat/outdoor/ looks the same and is one label. The CLI says so before it sends anything."""
    for label in ("Cat", "Dog"):
        (tmp_path / "PetImages" / label).mkdir(parents=True)
        for src in asset_images("train", "cat" if label == "Cat" else "noncat")[:2]:
            (tmp_path / "PetImages" / label / src.name).write_bytes(src.read_bytes())
    assert up.one_label_hint(tmp_path) == ("every image gets the label 'PetImages' (its folders Cat/, Dog/ become part of the "
                                           f"file names); if those folders are the labels, upload {tmp_path / 'PetImages'} instead")
    assert up.one_label_hint(tmp_path / "PetImages") is None and up.one_label_hint(TRAIN) is None
    (tmp_path / "readme.jpg").write_bytes(asset_images("train", "cat")[0].read_bytes())
    assert up.one_label_hint(tmp_path) is None  # an image beside it: no single label folder


def test_a_flat_folder_needs_a_label_and_then_gets_it(tmp_path):
    for p in asset_images("train", "cat")[:3]:
        (tmp_path / p.name).write_bytes(p.read_bytes())
    with pytest.raises(ValueError, match="no label folders"):
        list(up.plan(tmp_path))
    (batch,) = list(up.plan(tmp_path, label="cat"))
    assert all(n.startswith("cat/") for n in _members(batch)) and len(_members(batch)) == 3
    batch.cleanup()
    (batch,) = list(up.plan(tmp_path, unlabeled=True))  # or unlabeled: the zip's unlabeled/ folder
    assert all(n.startswith("unlabeled/") for n in _members(batch)) and len(_members(batch)) == 3
    batch.cleanup()
    with pytest.raises(ValueError, match="not both"):
        list(up.plan(tmp_path, label="cat", unlabeled=True))


def test_big_folders_and_many_files_are_split(tmp_path):
    batches = list(up.plan(TRAIN, max_files=10))
    assert [len(_members(b)) for b in batches] == [10, 10, 10, 2]
    for b in batches:
        b.cleanup()
    files = asset_images("train", "cat")
    assert [len(b.files) for b in up.plan(files, label="cat", max_files=7)] == [7, 7, 2]


def test_zips_pass_through_and_files_need_a_label(tmp_path):
    archive = tmp_path / "set.zip"
    archive.write_bytes(zip_folder(TEST))
    (batch,) = list(up.plan(archive))
    assert batch.archive == archive and not batch.temporary
    with pytest.raises(ValueError, match="label"):
        list(up.plan(archive, label="cat"))
    with pytest.raises(ValueError, match="unlabeled/ folder"):  # before: sent as it is, its folders became labels
        list(up.plan(archive, unlabeled=True))
    with pytest.raises(ValueError, match="need a label"):
        list(up.plan(asset_images("test", "cat")))
    assert [b.label for b in up.plan(asset_images("test", "cat"), unlabeled=True)] == [None]
    with pytest.raises(FileNotFoundError):
        list(up.plan(tmp_path / "missing"))


def test_progress_file_streams_lazily_and_counts_bytes():
    path = asset_images("train", "cat")[0]
    counted = []
    f = up.ProgressFile(path, counted.append)
    assert f.seek(0, 2) == path.stat().st_size and f.tell() == path.stat().st_size  # length without opening
    f.seek(0)
    data = b"".join(iter(lambda: f.read(1000), b""))
    assert data == path.read_bytes() and sum(counted) == len(data)


# --- the event stream ---------------------------------------------------------------------------------


def test_sse_parsing_skips_comments_and_joins_lines():
    lines = ["retry: 2000", "", ": keep-alive", "", "id: 1", 'data: {"a":', "data: 1}", "", "data: 2", ""]
    assert list(_sse_data(lines)) == ['{"a":\n1}', "2"]


def _training(status: str, **progress) -> dict:
    return {"id": "t1", "status": status, "progress": progress, "model_version": 1 if status == "succeeded" else None}


def test_wait_follows_the_event_stream():
    events = [_training("queued"), _training("running", phase="training", epoch=1),
              _training("succeeded", phase="done")]
    body = "retry: 2000\n\n" + "".join(f"data: {json.dumps(e)}\n\n" for e in events)

    def handler(request: httpx.Request) -> httpx.Response:
        assert request.url.path == "/v1/trainings/t1/events"
        return httpx.Response(200, text=body, headers={"content-type": "text/event-stream"})

    seen = []
    final = _mock(handler).wait("t1", on_progress=seen.append)
    assert final["status"] == "succeeded" and [t["status"] for t in seen] == ["queued", "running", "succeeded"]


def test_wait_polls_a_server_without_the_stream():
    answers = iter([_training("running", epoch=1), _training("running", epoch=1), _training("failed")])

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/events"):
            return httpx.Response(404, json={"error": {"code": "not_found", "message": "Not Found"}})
        return httpx.Response(200, json=next(answers))

    seen = []
    final = _mock(handler).wait("t1", on_progress=seen.append, poll_interval=0.01)
    assert final["status"] == "failed" and len(seen) == 2  # an unchanged answer is not reported twice


def test_wait_for_a_missing_training_raises():
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(404, json={"error": {"code": "training_not_found", "message": "no"}})

    with pytest.raises(FelisError) as e:
        _mock(handler).wait("nope")
    assert e.value.code == "training_not_found"


# --- against a real felis ----------------------------------------------------------------------------------


@pytest.fixture
def felis(felis_url, no_felis_config):
    with Client(felis_url) as client:
        yield client


def test_dataset_lifecycle(felis):
    created = felis.create_dataset("lifecycle")
    assert created["name"] == "lifecycle" and created["image_count"] == 0
    assert "lifecycle" in [d["name"] for d in felis.datasets()["data"]]
    with pytest.raises(FelisError) as e:
        felis.create_dataset("lifecycle")
    assert (e.value.status, e.value.code) == (409, "dataset_exists")
    felis.delete_dataset("lifecycle")
    with pytest.raises(FelisError) as e:
        felis.dataset("lifecycle")
    assert e.value.code == "dataset_not_found"


def test_a_labels_subfolders_stay_that_label(felis, tmp_path):
    """A folder of dated subfolders uploaded with a label (or unlabeled, or as a label folder of a
    folder per label): every image gets that label. Before, the client zipped cat/2023/1.jpg and
    the service took cat/ for a wrapper: labels 2023 and 2024, and 'phone' for unlabeled photos."""
    cats, noncats = asset_images("train", "cat"), asset_images("train", "noncat")
    for i, p in enumerate(cats[:4]):
        (tmp_path / "cats" / f"{2023 + i % 2}").mkdir(parents=True, exist_ok=True)
        (tmp_path / "cats" / f"{2023 + i % 2}" / p.name).write_bytes(p.read_bytes())
    for i, p in enumerate(noncats[:4]):
        (tmp_path / "inbox" / ("phone", "camera")[i % 2]).mkdir(parents=True, exist_ok=True)
        (tmp_path / "inbox" / ("phone", "camera")[i % 2] / p.name).write_bytes(p.read_bytes())
    for i, p in enumerate(cats[4:8]):
        (tmp_path / "labelled" / "cat" / ("indoor", "outdoor")[i % 2]).mkdir(parents=True, exist_ok=True)
        (tmp_path / "labelled" / "cat" / ("indoor", "outdoor")[i % 2] / p.name).write_bytes(p.read_bytes())
    felis.create_dataset("nested")
    assert felis.upload("nested", tmp_path / "cats", label="cat")["created"] == 4
    assert felis.upload("nested", tmp_path / "inbox", unlabeled=True)["created"] == 4
    assert felis.upload("nested", tmp_path / "labelled")["created"] == 4
    d = felis.dataset("nested")
    assert (d["label_counts"], d["unlabeled_count"]) == ({"cat": 8}, 4)


def test_upload_folder_zip_and_files_then_manage_images(felis, tmp_path):
    felis.create_dataset("uploads")
    progress = []
    report = felis.upload("uploads", TRAIN, on_progress=lambda done, total: progress.append((done, total)))
    assert (report["created"], report["duplicates"], report["rejected"]) == (32, 0, 0)
    assert progress[-1][0] == progress[-1][1] > 0
    again = felis.upload("uploads", TRAIN)  # all there already: not sent again, a report, not an exception
    assert again["skipped"] == 32 and again["created"] == 0 and again["results"] == []

    archive = tmp_path / "test.zip"
    archive.write_bytes(zip_folder(TEST))
    assert felis.upload("uploads", archive)["created"] == 8
    junk = tmp_path / "junk.jpg"
    junk.write_bytes(b"not an image")
    mixed = felis.upload("uploads", [junk, asset_images("test", "cat")[0]], label="cat")
    assert [(r["status"], r["reason"]) for r in mixed["results"]] == [("rejected", "not_an_image")]
    assert mixed["skipped"] == 1  # the cat is in the dataset already: not sent
    d = felis.dataset("uploads")
    assert d["image_count"] == 40 and d["label_counts"] == {"cat": 20, "noncat": 20}

    listing = felis.images("uploads", label="cat", limit=5)
    assert listing["count"] == 20 and len(listing["data"]) == 5
    image = listing["data"][0]
    assert felis.image("uploads", image["id"])["id"] == image["id"]
    content = felis.image_content("uploads", image["id"])
    assert hashlib.sha256(content).hexdigest() == image["sha256"]
    assert felis.relabel("uploads", image["id"], "noncat")["label"] == "noncat"
    felis.delete_image("uploads", listing["data"][1]["id"])
    assert felis.dataset("uploads")["label_counts"] == {"cat": 18, "noncat": 21}
    with pytest.raises(FelisError) as e:
        felis.image("uploads", listing["data"][1]["id"])
    assert e.value.status == 404


def test_upload_with_a_bad_label_is_a_felis_error(felis):
    felis.create_dataset("badlabel")
    with pytest.raises(FelisError) as e:
        felis.upload("badlabel", asset_images("test", "cat")[:1], label="no spaces allowed")
    assert e.value.status == 422


@pytest.fixture(scope="module")
def trained(felis_url):
    """A dataset with two simple_cnn versions (v1 is the default)."""
    with Client(felis_url, api_key=None) as felis:
        felis.create_dataset("trained")
        felis.upload("trained", TRAIN)
        seen: list[dict] = []
        first = felis.train("trained", architecture="simple_cnn", epochs=2, seed=0)
        assert first["status"] == "queued"
        done = felis.wait(first["id"], on_progress=seen.append, timeout=600)
        assert done["status"] == "succeeded", done
        second = felis.wait(felis.train("trained", architecture="simple_cnn", epochs=1, seed=1)["id"], timeout=600)
        assert second["status"] == "succeeded", second
        yield {"first": done, "second": second, "seen": seen}


def test_train_and_wait_report_progress(felis, trained):
    statuses = [t["status"] for t in trained["seen"]]
    assert statuses[-1] == "succeeded" and statuses[0] in ("queued", "running")
    assert trained["first"]["model_version"] == 1 and trained["second"]["model_version"] == 2
    assert felis.training(trained["first"]["id"])["status"] == "succeeded"
    assert {t["id"] for t in felis.trainings("trained")["data"]} >= {trained["first"]["id"], trained["second"]["id"]}
    with pytest.raises(FelisError) as e:
        felis.cancel(trained["first"]["id"])
    assert (e.value.status, e.value.code) == (409, "training_finished")
    assert str(e.value).endswith("has already ended (succeeded)")  # before: 'has already succeeded', 'has already cancelled'


def test_models_evaluation_promote_download_thresholds(felis, trained, tmp_path):
    models = felis.models("trained")["data"]
    assert [m["version"] for m in models] == [1, 2] and models[0]["default"]
    assert felis.model("trained", 2)["architecture"] == "simple_cnn"
    evaluation = felis.evaluation("trained", 1)
    assert {"accuracy", "confusion_matrix", "calibration"} <= set(evaluation)
    blob = felis.download("trained", 1)
    path = felis.download("trained", 1, tmp_path)
    assert path == tmp_path / "trained-v1.pt" and path.read_bytes() == blob and len(blob) > 100
    updated = felis.set_threshold("trained", 1, "cat", threshold=0.7)
    assert updated["thresholds"] == {"cat": 0.7}
    assert felis.clear_threshold("trained", 1, "cat")["thresholds"] == {}
    with pytest.raises(ValueError, match="exactly one"):  # before: threshold dropped, min_precision sent
        felis.set_threshold("trained", 1, "cat", threshold=0.5, min_precision=0.99)
    calibrated = felis.model("trained", 1)["ood"]
    moved = felis.set_ood_threshold("trained", 1, flagged_fraction=0.5)["ood"]
    assert moved["flagged_fraction"] == 0.5 and moved["threshold"] <= calibrated["threshold"]
    assert felis.set_ood_threshold("trained", 1, threshold=calibrated["threshold"])["ood"]["threshold"] == calibrated["threshold"]
    with pytest.raises(ValueError):
        felis.set_ood_threshold("trained", 1)


def test_predict_paths_bytes_and_versions(felis, trained):
    images = asset_images("test", "cat") + asset_images("test", "noncat")
    answer = felis.predict("trained", images)
    assert answer["model_version"] == felis.dataset("trained")["default_version"]
    assert [p["filename"] for p in answer["predictions"]] == [p.name for p in images]
    for p in answer["predictions"]:
        assert set(p["probabilities"]) == {"cat", "noncat"} and abs(sum(p["probabilities"].values()) - 1) < 1e-4
        assert isinstance(p["ood_score"], float) and isinstance(p["ood"], bool)
    one = felis.predict("trained", ("x.jpg", images[0].read_bytes()), version=2)
    assert one["model_version"] == 2 and len(one["predictions"]) == 1
    felis.promote("trained", 2)
    assert felis.predict("trained", images[0])["model_version"] == 2
    felis.promote("trained", 1)
    with pytest.raises(FelisError) as e:
        felis.predict("trained", images[0], version=99)
    assert e.value.code == "version_not_found"


def test_many_images_are_sent_in_batches_answered_by_one_version(felis, trained, monkeypatch):
    from felis_client import client as client_module

    monkeypatch.setattr(client_module, "PREDICT_BATCH", 3)
    images = asset_images("test", "cat") + asset_images("test", "noncat")
    answer = felis.predict("trained", images)
    assert len(answer["predictions"]) == 8 and answer["model_version"] == 1
    # a request of unreadable images alone, first or last, is each image's error as in a mixed one
    # (before: FelisError 422, and the good requests' predictions were lost)
    bad = [("a.jpg", b"not an image" * 9), ("b.jpg", b""), ("a.jpg", b"not an image" * 9)]  # one request of 3
    for order in (images[:3] + bad + images[3:6], bad + images[:6]):
        got = felis.predict("trained", order)["predictions"]
        assert [p.get("error", {}).get("code") for p in got] == [None if isinstance(x, Path) else
                                                                 "not_an_image" if x[0] == "a.jpg" else "empty_file" for x in order]
    with pytest.raises(FelisError) as e:  # none readable: as the service answers
        felis.predict("trained", bad * 2)
    assert (e.value.status, e.value.code) == (422, "not_an_image")


def test_a_key_that_is_sent_is_checked(felis_url, no_felis_config):
    with Client(felis_url, api_key="fk_not_a_real_key") as felis:
        with pytest.raises(FelisError) as e:
            felis.datasets()
    assert e.value.status == 401


def test_wait_gives_up_after_its_timeout():
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/events"):
            return httpx.Response(503, json={"error": {"code": "database_unavailable", "message": "down"}})
        raise AssertionError("no polling while the stream endpoint exists")

    with pytest.raises(TimeoutError):
        _mock(handler).wait("t1", timeout=0.3, poll_interval=0.05)
    with pytest.raises(FelisError) as e:
        _mock(handler).wait("t1", poll_interval=0.01, max_reconnects=2)
    assert e.value.code == "database_unavailable"


def test_unlabeled_images_get_suggestions_from_the_worker(felis):
    """Against the real `felis up` (API + worker): images uploaded without a label after a training
    get a suggestion from the worker's felis.suggest task; accepting and unlabelling go through
    label_images."""
    import time

    felis.create_dataset("suggest")
    with pytest.raises(FelisError) as e:
        felis.suggestions("suggest")
    assert e.value.code == "dataset_not_found" or e.value.code == "no_model"
    felis.upload("suggest", TRAIN)
    training = felis.train("suggest", image_size=64, cv_folds=2)
    assert felis.wait(training["id"])["status"] == "succeeded"
    later = asset_images("test", "cat") + asset_images("test", "noncat")
    report = felis.upload("suggest", later, unlabeled=True)
    assert report["created"] == len(later) and all(r["label"] is None for r in report["results"])
    assert felis.images("suggest", labeled=False)["count"] == len(later)
    assert felis.dataset("suggest")["unlabeled_count"] == len(later)
    deadline = time.monotonic() + 120
    while (page := felis.suggestions("suggest", order="certain"))["pending"]:
        assert time.monotonic() < deadline, page
        time.sleep(0.5)
    assert page["count"] == len(later) and page["version"] == 1
    first, second = page["data"][:2]
    done = felis.label_images("suggest", {first["image_id"]: first["suggested_label"], "nope": "cat"})
    assert (done["applied"], done["rejected"]) == (1, 1) and done["results"][1]["error"]["code"] == "image_not_found"
    assert felis.image("suggest", first["image_id"])["label"] == first["suggested_label"]
    assert felis.relabel("suggest", first["image_id"], None)["label"] is None
    assert felis.suggestions("suggest")["count"] == len(later)  # unlabeled again: its suggestion is listed again


def test_an_interrupted_upload_resumes_without_sending_twice(felis, monkeypatch):
    """The second of several requests fails (the connection drops); run again, the upload sends
    only what the dataset does not hold yet: nothing twice, nothing missing, one progress total."""
    felis.create_dataset("resume")
    monkeypatch.setitem(up.plan.__kwdefaults__, "max_files", 10)  # four requests: 10, 10, 10, 2
    real, calls = Client._upload_batch, []

    def flaky(self, dataset, batch, advance):
        calls.append(batch)
        if len(calls) == 2:
            raise FelisError(0, "connection_error", "the connection dropped")
        return real(self, dataset, batch, advance)

    monkeypatch.setattr(Client, "_upload_batch", flaky)
    with pytest.raises(FelisError):
        felis.upload("resume", TRAIN)
    assert felis.dataset("resume")["image_count"] == 10
    monkeypatch.setattr(Client, "_upload_batch", real)
    progress = []
    report = felis.upload("resume", TRAIN, on_progress=lambda done, total: progress.append((done, total)))
    assert (report["skipped"], report["created"], report["duplicates"]) == (10, 22, 0)
    assert progress[-1][0] == progress[-1][1] and len({total for _, total in progress}) == 1
    assert felis.dataset("resume")["image_count"] == 32
    again = felis.upload("resume", TRAIN)
    assert (again["skipped"], again["created"], len(again["results"])) == (32, 0, 0)


def test_known_hashes_are_bounded_and_validated(felis):
    import httpx

    felis.create_dataset("known")
    felis.upload("known", asset_images("test", "cat"), label="cat")
    sha = hashlib.sha256(asset_images("test", "cat")[0].read_bytes()).hexdigest()
    base = felis.base_url
    r = httpx.post(f"{base}/v1/datasets/known/images/known", json={"sha256": [sha, "0" * 64, sha.upper()]})
    assert r.status_code == 200 and r.json() == {"known": [sha]}
    for body, status, code in (({"sha256": ["0" * 64] * 10_001}, 422, "too_many_items"),
                               ({"sha256": ["xyz"]}, 422, "invalid_sha256"), ({"nope": 1}, 422, "validation_error")):
        r = httpx.post(f"{base}/v1/datasets/known/images/known", json=body)
        assert (r.status_code, r.json()["error"]["code"]) == (status, code)
    r = httpx.post(f"{base}/v1/datasets/known/images/known", content=b'{"sha256": [' + b" " * 1_100_000 + b"]}",
                   headers={"content-type": "application/json"})
    assert (r.status_code, r.json()["error"]["code"]) == (413, "request_too_large")
