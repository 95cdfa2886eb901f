"""service.domain.customvision: Custom Vision's ids and free-text names mapped onto datasets,
labels, trainings and versions."""

from __future__ import annotations

import uuid

import pytest
from sqlalchemy import select

from service.domain import customvision as cv
from service.domain import datasets, uploads
from service.errors import AlreadyExists, Conflict, InvalidRequest, NotFound
from service.store.db import get_engine
from service.store.tables import CvIteration, CvProject, CvPublishAlias, CvTag, Dataset
from tests.utils.rows import update_training


@pytest.mark.parametrize(("name", "label", "dataset"), [
    ("Japanese Cherry", "Japanese_Cherry", "japanese-cherry"),
    ("  Hemlock!  ", "Hemlock", "hemlock"),
    ("猫", "tag", "project"),
    ("-Dog.v2-", "Dog.v2", "dog-v2"),
    ("x" * 200, "x" * 60, "x" * 60),
])
def test_slugs_fit_felis_names(name, label, dataset):
    assert cv.slug(name, lower=False) == label and uploads.LABEL_RE.fullmatch(label)
    assert cv.slug(name, lower=True) == dataset and datasets.NAME_RE.fullmatch(dataset)


def test_projects_get_dashed_ids_and_suffixed_dataset_names(session):
    datasets.create(session, "pets")
    session.commit()
    first = cv.create_project(session, "Pets")
    second = cv.create_project(session, "pets")
    session.commit()
    assert (first.dataset.name, second.dataset.name) == ("pets-2", "pets-3")
    assert str(uuid.UUID(first.project.id)) == first.project.id
    assert [r.project.name for r in cv.list_projects(session)] == ["Pets", "pets"]
    assert cv.get_project(session, first.project.id.upper()).dataset.name == "pets-2"
    # a key limited to other datasets does not see it
    with pytest.raises(NotFound):
        cv.get_project(session, first.project.id, {"pets": 1})


@pytest.mark.parametrize(("kwargs", "code"), [
    ({"classification_type": "Multilabel"}, "multilabel_unsupported"),
    ({"classification_type": "Detection"}, "unknown_classification"),
    ({"domain_id": "0732100f-1a38-4e49-a514-c9b44c697ab5"}, "unknown_domain"),  # General (compact): not offered
])
def test_what_is_not_offered_is_refused_clearly(session, kwargs, code):
    with pytest.raises(InvalidRequest) as refused:
        cv.create_project(session, "x", **kwargs)
    assert refused.value.code == code
    with pytest.raises(InvalidRequest):
        cv.create_project(session, "   ")


def test_tags_exist_before_images_and_collide_into_suffixed_labels(session):
    ref = cv.create_project(session, "p")
    a, b = cv.create_tag(session, ref, "Japanese Cherry"), cv.create_tag(session, ref, "Japanese-Cherry")
    session.commit()
    assert (a.label, b.label) == ("Japanese_Cherry", "Japanese-Cherry")
    c = cv.create_tag(session, ref, "Japanese_Cherry")
    assert c.label == "Japanese_Cherry-2"
    with pytest.raises(AlreadyExists):
        cv.create_tag(session, ref, "Japanese Cherry")
    with pytest.raises(InvalidRequest):
        cv.create_tag(session, ref, "Negative", kind="Negative")
    assert [cv.image_counts(session, ref).get(t.label, 0) for t in cv.tags_of(session, ref)] == [0, 0, 0]


def _iteration(session, ref, status: str, version: int | None = None) -> CvIteration:
    from tests.utils.rows import training_row

    training_id = training_row(status)
    update_training(training_id, dataset_id=ref.dataset.id, model_version=version)
    iteration = CvIteration(id=str(uuid.uuid4()), project_id=ref.project.id, training_id=training_id, name="Iteration 1")
    session.add(iteration)
    session.commit()
    return iteration


@pytest.mark.parametrize(("status", "shown"), [("queued", "Training"), ("running", "Training"),
                                               ("failed", "Failed"), ("cancelled", "Failed"),
                                               ("succeeded", "Failed")])  # succeeded, but its version is gone
def test_iteration_status_follows_its_training(session, status, shown):
    ref = cv.create_project(session, "p")
    session.commit()
    iteration = _iteration(session, ref, status, version=1 if status == "succeeded" else None)
    assert cv.iteration_state(session, ref, iteration).status == shown
    with pytest.raises(Conflict):  # not completed: nothing to publish
        cv.publish(session, ref, iteration, "prod", None)


def test_deleting_a_project_drops_its_rows_and_marks_its_dataset_in_one_commit(session):
    ref = cv.create_project(session, "p")
    cv.create_tag(session, ref, "Cat")
    session.commit()
    _iteration(session, ref, "failed")
    cv.delete_project(session, ref)
    for table in (CvProject, CvTag, CvIteration, CvPublishAlias):
        assert session.scalars(select(table)).all() == []
    assert session.get(Dataset, ref.dataset.id).deleted_at is not None
    with pytest.raises(NotFound):
        cv.get_project(session, ref.project.id)


def test_an_alias_names_a_version_of_its_dataset(session):
    ref = cv.create_project(session, "p")
    session.commit()
    iteration = _iteration(session, ref, "failed")
    session.add(CvPublishAlias(dataset_id=ref.dataset.id, name="prod", version=3, iteration_id=iteration.id))
    session.commit()
    with get_engine().connect() as conn:
        assert cv.alias_version(conn, ref.dataset.name, "prod") == 3
        with pytest.raises(NotFound):
            cv.alias_version(conn, ref.dataset.name, "staging")
        with pytest.raises(NotFound):
            cv.alias_version(conn, "other", "prod")
    with pytest.raises(Conflict):  # published: unpublish first
        cv.delete_iteration(session, None, ref, iteration)
    cv.unpublish(session, ref, iteration)
    with pytest.raises(Conflict):
        cv.unpublish(session, ref, iteration)


@pytest.mark.parametrize("positives, negatives, expected", [
    ([0.9, 0.95], [0.1, 0.05], 1.0),  # separated: every threshold that finds both cats is precise
    ([0.9, 0.4], [0.6, 0.1], (1 / 1 + 2 / 3) / 2),  # ranked cat, non-cat, cat, non-cat: AP's own definition
])
def test_average_precision_takes_each_recalls_best_precision(positives, negatives, expected):
    """Before: a perfect model's averagePrecision was 0.75. Of the curve's points with the same
    recall, the sort met the threshold-0 point first (precision = the label's share, 0.5)."""
    import numpy as np

    from models.evaluate import _threshold_curve

    p = np.array(positives + negatives)
    curve = _threshold_curve(p, np.array([True] * len(positives) + [False] * len(negatives)))
    assert cv._average_precision(curve) == pytest.approx(expected)
