"""`felis import-customvision`: copy a Custom Vision project's tagged images into a felis dataset.

    felis import-customvision --endpoint https://<resource>.cognitiveservices.azure.com/ \
        --training-key KEY --project "Japanese Cherry" [--dataset cherries]

Azure Custom Vision shuts down on 2028-09-25; this moves a classification project's training data
out before then. It lists the project's tagged images with Microsoft's own SDK
(`pip install 'felis-client[customvision]'`: azure-cognitiveservices-vision-customvision 3.1.1),
downloads each from the URL the service hands out (no key: those URLs are signed), 256 a page,
into a temporary folder with one folder per tag, and uploads them with `Client.upload`: run it
again after an interruption and what the dataset holds already is not sent twice. Tag names are
free text ("Good Dog"); felis labels are slugs of them ("good-dog", a suffix where two collide).
An image with several tags (a multilabel project) takes its first; untagged images are not listed
by the SDK and stay behind. Each download is capped at Custom Vision's own image limit (6 MB) and
a timeout.
"""

from __future__ import annotations

import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

MAX_IMAGE_BYTES = 6 * 1024 * 1024  # Custom Vision's limit for one training image
PAGE = 256  # the SDK's largest page of tagged images
_SUFFIXES = {"image/jpeg": ".jpg", "image/png": ".png", "image/bmp": ".bmp", "image/gif": ".gif", "image/webp": ".webp"}


class CustomVisionImportError(ValueError):
    """Something the user can act on (missing SDK, unknown project): one line on the command line."""


def label_for(tag_name: str, taken: set[str]) -> str:
    """A felis label (1-64 of letters, digits, '_', '.', '-', not 'unlabeled') for a free-text tag name."""
    base = re.sub(r"[^A-Za-z0-9_.-]+", "-", tag_name.strip().lower()).strip("-._")[:56] or "tag"
    if base == "unlabeled":
        base = "unlabeled-tag"
    label, n = base, 2
    while label in taken:
        label, n = f"{base}-{n}", n + 1
    taken.add(label)
    return label


def dataset_for(project_name: str) -> str:
    """A felis dataset name (1-64 of a-z, 0-9, '_', '-') for a free-text project name."""
    return re.sub(r"[^a-z0-9_-]+", "-", project_name.strip().lower()).strip("-_")[:64] or "imported"


def _trainer(endpoint: str, key: str):
    try:
        from azure.cognitiveservices.vision.customvision.training import CustomVisionTrainingClient
        from msrest.authentication import ApiKeyCredentials
    except ImportError:
        raise CustomVisionImportError("the Custom Vision SDK is not installed: pip install 'felis-client[customvision]'") from None
    return CustomVisionTrainingClient(endpoint, ApiKeyCredentials(in_headers={"Training-key": key}))


def _project(trainer, wanted: str):
    for p in trainer.get_projects():
        if p.id == wanted or p.name == wanted:
            return p
    raise CustomVisionImportError(f"no project {wanted!r} at this endpoint (give its name or id)")


def _download(http: httpx.Client, url: str, folder: Path, image_id: str) -> Path | None:
    """The image at url into folder, at most MAX_IMAGE_BYTES; None when it cannot be had."""
    with http.stream("GET", url) as r:
        if r.status_code != 200:
            return None
        suffix = _SUFFIXES.get(r.headers.get("content-type", "").split(";")[0].strip(), ".jpg")
        path = folder / f"{image_id}{suffix}"
        size = 0
        with open(path, "wb") as f:
            for chunk in r.iter_bytes(1 << 16):
                size += len(chunk)
                if size > MAX_IMAGE_BYTES:
                    f.close()
                    path.unlink(missing_ok=True)
                    return None
                f.write(chunk)
    return path


def import_project(felis, *, endpoint: str, training_key: str, project: str, dataset: str | None = None,
                   on_progress: Callable[[int, int], None] | None = None, trainer=None) -> dict[str, Any]:
    """Copy the project's tagged images into `dataset` (created if missing; default: a slug of the
    project's name). Returns {"dataset", "labels": {tag name: label}, "listed", "downloaded",
    "failed": [image ids], "upload": the upload report}."""
    from .errors import FelisError

    trainer = trainer or _trainer(endpoint, training_key)
    proj = _project(trainer, project)
    name = dataset or dataset_for(proj.name)
    try:
        felis.create_dataset(name)
    except FelisError as e:
        if e.code != "dataset_exists":
            raise
    taken: set[str] = set()
    labels = {t.name: label_for(t.name, taken) for t in trainer.get_tags(proj.id)}
    folder = Path(tempfile.mkdtemp(prefix="felis-cv-import-"))
    listed, failed, downloaded = 0, [], 0
    try:
        with httpx.Client(timeout=httpx.Timeout(30.0, connect=10.0), follow_redirects=True) as http:
            skip = 0
            while True:
                page = trainer.get_tagged_images(proj.id, take=PAGE, skip=skip)
                if not page:
                    break
                skip += len(page)
                for image in page:
                    listed += 1
                    tag = (image.tags or [None])[0]
                    if tag is None or not image.original_image_uri:
                        failed.append(image.id)
                        continue
                    label = labels.get(tag.tag_name) or labels.setdefault(tag.tag_name, label_for(tag.tag_name, taken))
                    (folder / label).mkdir(exist_ok=True)
                    try:
                        got = _download(http, image.original_image_uri, folder / label, image.id)
                    except httpx.HTTPError:
                        got = None
                    if got is None:
                        failed.append(image.id)
                    else:
                        downloaded += 1
                if on_progress:
                    on_progress(listed, listed)
                if len(page) < PAGE:
                    break
        report = felis.upload(name, folder) if downloaded else {"created": 0, "duplicates": 0, "rejected": 0, "skipped": 0}
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return {"dataset": name, "labels": labels, "listed": listed, "downloaded": downloaded, "failed": failed, "upload": report}
