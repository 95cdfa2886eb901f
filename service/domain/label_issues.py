"""A version's label-error report: the images whose given label its training's held-out
predictions contradict (issue 15), most likely first.

The training stored, beside the version's checkpoint, one blob with every training image's held-out
probabilities and the rows the rule flagged (models.heldout, models.label_issues.pack_heldout;
service.domain.pipeline writes it). This joins those rows with the images as they are now: an image
deleted since is left out, `label` is the one it had when the version was trained and
`current_label` the one it has now (a relabel shows at once; the report stays the training's until
the next training). Reads only: the blob and one indexed query per 500 flagged images.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from models.label_issues import unpack_heldout
from service.domain import versions
from service.errors import Conflict
from service.store.blobs import BlobStore
from service.store.tables import Dataset, Image

_CHUNK = 500  # ids per IN (...) query


def report(session: Session, store: BlobStore, dataset: Dataset, version: int | None = None, *,
           limit: int = 100, offset: int = 0) -> dict[str, Any]:
    """{"version", "data": [{image_id, filename, label, current_label, suggested_label, score}], "count"}
    for the version asked for, else the default. 404 no_model / version_not_found; 409
    label_issues_unavailable for a version without a report (fine-tuned, imported, or trained before
    felis kept one)."""
    row = versions.resolve(session, dataset, version)
    if not row.heldout_key:
        raise Conflict(f"version {row.version} of {dataset.name!r} has no label-error report (only linear trainings "
                       "with cross-validation make one, and only since felis kept the report); retrain to get one", code="label_issues_unavailable")
    held = unpack_heldout(store.get(row.heldout_key))
    ids, labels = held["image_ids"], held["labels"]
    flagged = [(ids[r], labels[int(held["y"][r])], labels[int(s)], float(score))
               for r, s, score in zip(held["issue_rows"], held["issue_suggested"], held["issue_scores"])]
    now = _current(session, dataset, [image_id for image_id, _, _, _ in flagged])
    items = [{"image_id": image_id, "filename": now[image_id][0], "label": label, "current_label": now[image_id][1],
              "suggested_label": suggested, "score": round(score, 6)}
             for image_id, label, suggested, score in flagged if image_id in now]
    return {"version": row.version, "data": items[offset:offset + limit], "count": len(items)}


def _current(session: Session, dataset: Dataset, image_ids: list[str]) -> dict[str, tuple[str, str]]:
    """image id -> (filename, label) of those still in the dataset."""
    out: dict[str, tuple[str, str]] = {}
    for start in range(0, len(image_ids), _CHUNK):
        chunk = image_ids[start:start + _CHUNK]
        out.update((r.id, (r.filename, r.label)) for r in session.execute(
            select(Image.id, Image.filename, Image.label).where(Image.dataset_id == dataset.id, Image.id.in_(chunk))))
    return out
