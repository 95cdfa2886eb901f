"""`felis import-customvision` against felis's own Custom Vision surface (a real `felis up`):
Microsoft's SDK creates a project with free-text tag names and tagged images, the command copies
them into a dataset, and run again it sends nothing twice."""

from __future__ import annotations


import pytest

from felis_client import Client
from felis_client.customvision_import import dataset_for, label_for
from service.cli import main
from tests.conftest import asset_images

pytest.importorskip("azure.cognitiveservices.vision.customvision")
from azure.cognitiveservices.vision.customvision.training import CustomVisionTrainingClient  # noqa: E402
from azure.cognitiveservices.vision.customvision.training.models import (  # noqa: E402
    ImageFileCreateBatch,
    ImageFileCreateEntry,
)
from msrest.authentication import ApiKeyCredentials  # noqa: E402


def test_names_become_slugs():
    taken: set[str] = set()
    assert [label_for(n, taken) for n in ("Good Dog", "good dog", "Unlabeled", "  ", "Japanese Cherry!")] == [
        "good-dog", "good-dog-2", "unlabeled-tag", "tag", "japanese-cherry"]
    assert dataset_for("My Pets (2024)") == "my-pets-2024" and dataset_for("!!!") == "imported"


def test_a_project_is_copied_into_a_dataset(felis_url, no_felis_config, capsys):
    trainer = CustomVisionTrainingClient(felis_url, ApiKeyCredentials(in_headers={"Training-key": "any"}))
    project = trainer.create_project("Pets To Move")
    tags = {name: trainer.create_tag(project.id, name) for name in ("Good Dog", "Cat")}
    images = {"Cat": asset_images("train", "cat")[:6], "Good Dog": asset_images("train", "noncat")[:5]}
    entries = [ImageFileCreateEntry(name=p.name, contents=p.read_bytes(), tag_ids=[tags[tag].id])
               for tag, paths in images.items() for p in paths]
    assert trainer.create_images_from_files(project.id, ImageFileCreateBatch(images=entries)).is_batch_successful
    code = main(["import-customvision", "--url", felis_url, "--endpoint", felis_url, "--training-key", "any",
                 "--project", "Pets To Move", "--dataset", "moved"])
    out, err = capsys.readouterr()
    assert code == 0, out + err
    assert "11 tagged images listed, 11 downloaded, 11 created" in out and "Good Dog -> good-dog" in out
    with Client(felis_url) as c:
        assert c.dataset("moved")["label_counts"] == {"cat": 6, "good-dog": 5}
    code = main(["import-customvision", "--url", felis_url, "--endpoint", felis_url, "--training-key", "any",
                 "--project", project.id, "--dataset", "moved"])  # by id, again: nothing sent twice
    out, err = capsys.readouterr()
    assert code == 0 and "0 created, 11 already there" in out, out + err
    code = main(["import-customvision", "--url", felis_url, "--endpoint", felis_url, "--training-key", "any",
                 "--project", "no such project"])
    assert code == 2 and "no project 'no such project'" in capsys.readouterr().err
