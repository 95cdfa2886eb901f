"""Microsoft's own client (azure-cognitiveservices-vision-customvision 3.1.1) against a real felis,
through the flow of its published Python image-classification quickstart, with only the endpoint
and the keys changed: a felis ``write`` key as the Training-Key, a ``predict`` key as the
Prediction-Key. Embedded (`felis up`) and production (API and worker processes, PostgreSQL, Redis),
keys required in both. Real photos: 20 cats and 20 dogs from photos/train, held-out ones from photos/test."""

from __future__ import annotations

import secrets
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import DATASETS, needs_datasets
from tests.utils.processes import Proc, create_postgres_database, felis_env, free_port, migrate, redis_database, wait_ready

pytest.importorskip("azure.cognitiveservices.vision.customvision")
from azure.cognitiveservices.vision.customvision.prediction import CustomVisionPredictionClient  # noqa: E402
from azure.cognitiveservices.vision.customvision.prediction.models import (  # noqa: E402
    CustomVisionErrorException as PredictionError,
)
from azure.cognitiveservices.vision.customvision.training import CustomVisionTrainingClient  # noqa: E402
from azure.cognitiveservices.vision.customvision.training.models import (  # noqa: E402
    CustomVisionErrorException,
    ImageFileCreateBatch,
    ImageFileCreateEntry,
)
from msrest.authentication import ApiKeyCredentials  # noqa: E402

pytestmark = [needs_datasets(), pytest.mark.timeout(900)]

PHOTOS = DATASETS / "photos"


def _photos(split: str, folder: str, prefix: str, n: int) -> list[Path]:
    return sorted(p for p in (PHOTOS / split / folder).iterdir() if p.name.startswith(prefix))[:n]


@pytest.fixture(scope="module", params=["embedded", pytest.param("production", marks=pytest.mark.production)])
def felis(request, tmp_path_factory) -> Iterator[dict]:
    """A felis with keys required; its base URL and one write and one predict key."""
    mode = request.param
    tmp = tmp_path_factory.mktemp(f"customvision-{mode}")
    port, admin = free_port(), secrets.token_urlsafe(32)
    base = f"http://127.0.0.1:{port}"
    common = {"FELIS_DATA_DIR": str(tmp / "var"), "FELIS_PORT": str(port), "FELIS_API_KEYS_REQUIRED": "true",
              "FELIS_BOOTSTRAP_ADMIN_KEY": admin}
    cleanup = []
    if mode == "embedded":
        procs = [Proc(["up"], felis_env(**common), tmp / "up.log")]
    else:
        db_url, drop = create_postgres_database()
        cleanup.append(drop)
        env = felis_env(**common, FELIS_MODE="production", FELIS_DATABASE_URL=db_url, FELIS_BROKER_URL=redis_database(),
                        FELIS_WORKER_METRICS_PORT=str(free_port()))
        migrate(env)
        procs = [Proc(["worker", "--queues", "gpu", "--concurrency", "1", "--hostname", f"cv-{port}@%h"], env,
                      tmp / "worker.log"),
                 Proc(["api", "--port", str(port)], env, tmp / "api.log")]
    try:
        wait_ready(base, procs)
        with httpx.Client(base_url=base, timeout=60, headers={"Authorization": f"Bearer {admin}"}) as c:
            keys = {scope: c.post("/v1/keys", json={"scopes": [scope], "name": f"customvision {scope}"}).json()["key"]
                    for scope in ("write", "predict")}
        yield {"base": base, "keys": keys, "procs": procs}
    finally:
        for p in reversed(procs):
            p.stop()
        for fn in cleanup:
            fn()


def test_the_quickstart_runs_unchanged_but_for_endpoint_and_keys(felis):
    endpoint, keys = felis["base"], felis["keys"]
    # --- as the quickstart: the clients, with the keys in Custom Vision's headers ---
    trainer = CustomVisionTrainingClient(endpoint, ApiKeyCredentials(in_headers={"Training-key": keys["write"]}))
    predictor = CustomVisionPredictionClient(endpoint, ApiKeyCredentials(in_headers={"Prediction-key": keys["predict"]}))
    publish_iteration_name = "classifyModel"
    prediction_resource_id = "/subscriptions/x/resourceGroups/y/providers/Microsoft.CognitiveServices/accounts/z"

    assert any(d.name == "General" and d.type == "Classification" for d in trainer.get_domains())
    project = trainer.create_project(uuid.uuid4())  # the quickstart names its project by a UUID
    assert str(uuid.UUID(project.id)) == project.id and project.settings.classification_type == "Multiclass"
    cat_tag = trainer.create_tag(project.id, "Cat")
    dog_tag = trainer.create_tag(project.id, "Good Dog")  # free text, as "Japanese Cherry"
    assert {t.name: t.image_count for t in trainer.get_tags(project.id)} == {"Cat": 0, "Good Dog": 0}

    cats, dogs = _photos("train", "cat", "kaggle_", 20), _photos("train", "noncat", "kaggle_", 20)
    image_list = [ImageFileCreateEntry(name=p.name, contents=p.read_bytes(), tag_ids=[cat_tag.id]) for p in cats]
    image_list += [ImageFileCreateEntry(name=p.name, contents=p.read_bytes(), tag_ids=[dog_tag.id]) for p in dogs[:-1]]
    upload_result = trainer.create_images_from_files(project.id, ImageFileCreateBatch(images=image_list))
    assert upload_result.is_batch_successful, [i.status for i in upload_result.images]
    assert [i.status for i in upload_result.images] == ["OK"] * 39
    # the same bytes again: a duplicate, and the batch not successful (as Custom Vision answers)
    again = trainer.create_images_from_files(project.id, ImageFileCreateBatch(images=image_list[:1]))
    assert not again.is_batch_successful and again.images[0].status == "OKDuplicate"
    # raw bytes, multipart without a filename (create_images_from_data)
    data = trainer.create_images_from_data(project.id, dogs[-1].read_bytes(), tag_ids=[dog_tag.id])
    assert data.is_batch_successful and data.images[0].image.tags[0].tag_name == "Good Dog"
    assert {t.name: t.image_count for t in trainer.get_tags(project.id)} == {"Cat": 20, "Good Dog": 20}

    tagged = trainer.get_tagged_images(project.id, tag_ids=[cat_tag.id], take=100)
    assert len(tagged) == 20 and all(i.tags[0].tag_id == cat_tag.id for i in tagged)
    original = httpx.get(tagged[0].original_image_uri)  # signed: no key needed
    assert original.status_code == 200 and original.content in {p.read_bytes() for p in cats}
    assert httpx.get(tagged[0].thumbnail_uri).headers["content-type"] == "image/jpeg"

    iteration = trainer.train_project(project.id)
    deadline = time.monotonic() + 600
    while iteration.status != "Completed":
        assert iteration.status == "Training", iteration.training_error_details
        assert time.monotonic() < deadline, "training did not complete in 10 minutes"
        time.sleep(1)
        iteration = trainer.get_iteration(project.id, iteration.id)
    assert [i.id for i in trainer.get_iterations(project.id)] == [iteration.id]
    performance = trainer.get_iteration_performance(project.id, iteration.id)
    assert {t.name for t in performance.per_tag_performance} == {"Cat", "Good Dog"}
    assert 0.8 <= performance.precision <= 1 and 0.8 <= performance.recall <= 1 and performance.average_precision > 0.8

    assert trainer.publish_iteration(project.id, iteration.id, publish_iteration_name, prediction_resource_id) is True
    assert trainer.get_iteration(project.id, iteration.id).publish_name == publish_iteration_name

    # --- predict held-out photos, as the quickstart does ---
    held_out = [(p, "Cat") for p in _photos("test", "cat", "kaggle_", 5)]
    held_out += [(p, "Good Dog") for p in _photos("test", "noncat", "kaggle_", 5)]
    right = 0
    for path, truth in held_out:
        results = predictor.classify_image(project.id, publish_iteration_name, path.read_bytes())
        probabilities = [p.probability for p in results.predictions]
        assert probabilities == sorted(probabilities, reverse=True) and abs(sum(probabilities) - 1) < 1e-3
        assert results.iteration == iteration.id and results.project == project.id
        right += results.predictions[0].tag_name == truth
    assert right >= 9, f"{right} of {len(held_out)} held-out photos right"
    no_store = predictor.classify_image_with_no_store(project.id, publish_iteration_name, held_out[0][0].read_bytes())
    assert no_store.predictions[0].tag_name == "Cat"
    assert {t.name: t.image_count for t in trainer.get_tags(project.id)} == {"Cat": 20, "Good Dog": 20}  # nothing stored
    with pytest.raises(PredictionError) as off:  # felis fetches no URL unless FELIS_CUSTOMVISION_URL_HOSTS lists its host
        predictor.classify_image_url(project.id, publish_iteration_name, url="https://example.com/cat.jpg")
    assert off.value.response.status_code == 422 and off.value.error.code == "BadRequestNotSupported"
    # the publish name is an alias /v1 predict takes too
    dataset = trainer.get_project(project.id, raw=True).response.json()["felisDataset"]
    version = trainer.get_iteration(project.id, iteration.id, raw=True).response.json()["felisVersion"]
    with httpx.Client(base_url=endpoint, headers={"Authorization": f"Bearer {keys['predict']}"}) as v1:
        r = v1.post(f"/v1/datasets/{dataset}/predict", params={"alias": publish_iteration_name},
                    files={"files": ("cat.jpg", held_out[0][0].read_bytes())})
        assert r.status_code == 200 and r.json()["model_version"] == version

    # --- a Prediction-Key never trains, and unknown keys are refused ---
    with pytest.raises(CustomVisionErrorException) as refused:
        CustomVisionTrainingClient(endpoint, ApiKeyCredentials(in_headers={"Training-key": keys["predict"]})) \
            .create_project("not allowed")
    assert refused.value.response.status_code == 403 and refused.value.error.code == "Forbidden"
    with pytest.raises(CustomVisionErrorException) as refused:
        CustomVisionTrainingClient(endpoint, ApiKeyCredentials(in_headers={"Training-key": "an-old-azure-key"})) \
            .get_projects()
    assert refused.value.response.status_code == 401 and refused.value.error.code == "Unauthorized"

    # --- and clean up, as the quickstart's cleanup does ---
    trainer.unpublish_iteration(project.id, iteration.id)
    with pytest.raises(PredictionError) as gone:
        predictor.classify_image(project.id, publish_iteration_name, held_out[0][0].read_bytes())
    assert gone.value.response.status_code == 404
    trainer.delete_iteration(project.id, iteration.id)
    assert trainer.get_iterations(project.id) == []
    trainer.delete_project(project.id)
    assert project.id not in [p.id for p in trainer.get_projects()]
    with pytest.raises(CustomVisionErrorException) as gone:
        trainer.get_project(project.id)
    assert gone.value.response.status_code == 404 and gone.value.error.code == "NotFoundProject"
