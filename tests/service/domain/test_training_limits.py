"""Limits on training requests (security finding 8): unfinished trainings are capped per dataset
and per API key (429 ``too_many_trainings``), and options whose memory cannot fit the worker are
refused before anything is queued (422 ``training_memory_exceeded`` naming the option to lower).

On SQLite and on the local PostgreSQL (`production` mark), where requests racing each other must
not get past a cap together."""

from __future__ import annotations

import io
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from service.config import Settings
from service.domain import datasets, trainings, uploads
from service.domain.trainings import Status
from service.errors import FelisError, InvalidRequest
from service.store.tables import Training
from tests.conftest import ASSETS, zip_folder

GIB = 1 << 30


@dataclass
class Felis:
    session: Session
    settings: Settings

    def dataset(self, name: str) -> str:
        """A dataset holding the 32 small real images of tests/assets (two labels)."""
        from service.store.blobs import get_store

        ds = datasets.create(self.session, name)
        self.session.commit()
        archive = io.BytesIO(zip_folder(ASSETS / "cifar-cat" / "train"))
        uploads.ingest(self.session, get_store(), ds, uploads.archive_candidates(archive, self.settings), self.settings)
        return name

    def request(self, name: str, options: dict | None = None, key_id: str | None = None) -> Training:
        """A training request as the route makes it: request, then commit."""
        t = _request(self.session, name, options or {}, self.settings, key_id)
        self.session.commit()
        return t

    def unfinished(self, **where) -> int:
        from service.store.db import new_session

        with new_session() as s:
            q = select(func.count()).select_from(Training).where(Training.status.in_(trainings.ACTIVE))
            for column, value in where.items():
                q = q.where(getattr(Training, column) == value)
            return s.scalar(q)


@pytest.fixture
def felis(metadata_store) -> Iterator[Felis]:
    """A felis on SQLite, or on a PostgreSQL database of its own (conftest.metadata_store)."""
    from service.config import get_settings
    from service.store.db import new_session

    session = new_session()
    try:
        yield Felis(session, get_settings())
    finally:
        session.close()


def _request(session: Session, name: str, options: dict, settings: Settings, key_id: str | None) -> Training:
    return trainings.request(session, name, options, settings, **({"key_id": key_id} if key_id else {}))


def _too_many(f: Felis, name: str, key_id: str | None = None) -> FelisError:
    with pytest.raises(FelisError) as e:
        _request(f.session, name, {}, f.settings, key_id)
    f.session.rollback()
    assert e.value.code == "too_many_trainings", e.value.message
    return e.value


# --- the caps on unfinished trainings ------------------------------------------------------------


def test_a_fourth_unfinished_training_of_a_dataset_is_refused(felis):
    """Before: any number was queued (each one a job for the workers)."""
    felis.dataset("pets")
    first = felis.request("pets")
    assert trainings.claim(first.id, "w1", felis.settings.training_lease_seconds)  # running counts too
    felis.request("pets")
    felis.request("pets")
    err = _too_many(felis, "pets")
    assert err.details == {"cap": "per_dataset", "count": 3, "limit": 3}
    assert "wait" in err.message and "cancel" in err.message and "'pets'" in err.message
    assert felis.unfinished() == 3


def test_a_finished_or_cancelled_training_frees_its_slot(felis):
    felis.dataset("pets")
    queued = [felis.request("pets") for _ in range(3)]
    _too_many(felis, "pets")
    trainings.cancel(felis.session, queued[0].id)
    felis.request("pets")  # the cancelled one's slot
    _too_many(felis, "pets")
    token = trainings.claim(queued[1].id, "w1", felis.settings.training_lease_seconds)
    assert trainings.fail(queued[1].id, "training_error", "boom", token=token)
    felis.request("pets")  # the failed one's
    assert felis.unfinished(dataset_id=queued[0].dataset_id) == 3


def test_the_per_key_cap_spans_datasets(felis):
    felis.settings.max_queued_trainings_per_key = 4
    felis.dataset("cats")
    felis.dataset("dogs")
    for _ in range(3):
        felis.request("cats", key_id="k1")
    felis.request("dogs", key_id="k1")
    err = _too_many(felis, "dogs", key_id="k1")
    assert err.details == {"cap": "per_key", "count": 4, "limit": 4}
    assert "API key" in err.message
    other = felis.request("dogs", key_id="k2")  # another key has its own
    assert other.key_id == "k2" and felis.unfinished(key_id="k1") == 4
    felis.request("dogs")  # no key (embedded mode without keys): only the dataset's cap
    _too_many(felis, "dogs")


def test_a_cap_of_zero_is_no_cap(felis):
    felis.settings.max_queued_trainings_per_dataset = 0
    felis.settings.max_queued_trainings_per_key = 0
    felis.dataset("pets")
    for _ in range(5):
        felis.request("pets", key_id="k1")
    assert felis.unfinished() == 5


def _race(felis: Felis, names: list[str], key_id: str | None) -> list[str]:
    """One request per name, all at once, each on a session of its own; their outcomes."""
    from service.store.db import new_session

    barrier = threading.Barrier(len(names))
    outcomes: list[str] = []

    def one(name: str) -> None:
        with new_session() as s:
            barrier.wait()
            try:
                _request(s, name, {}, felis.settings, key_id)
                s.commit()
                outcomes.append("queued")
            except FelisError as e:
                outcomes.append(e.details["cap"] if e.code == "too_many_trainings" else e.code)
            except Exception as e:  # noqa: BLE001  (a deadlock, a timeout: the test says which)
                outcomes.append(f"{type(e).__name__}: {e}")

    threads = [threading.Thread(target=one, args=(name,)) for name in names]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    return sorted(outcomes)


def test_requests_racing_each_other_cannot_pass_the_dataset_cap(felis):
    """Before (PostgreSQL, READ COMMITTED): every request counted the others' uncommitted rows as
    absent, and all eight were queued."""
    felis.dataset("pets")
    felis.request("pets")
    outcomes = _race(felis, ["pets"] * 8, key_id=None)
    assert outcomes == ["per_dataset"] * 6 + ["queued"] * 2
    assert felis.unfinished() == 3


def test_requests_racing_each_other_cannot_pass_the_key_cap(felis):
    """One key, a request on each of four datasets at once: the key's cap holds across them."""
    from service.domain import keys

    felis.settings.max_queued_trainings_per_key = 2
    row, _ = keys.create(felis.session, ["write"])
    names = [felis.dataset(f"set{i}") for i in range(4)]
    outcomes = _race(felis, names, key_id=row.id)
    assert outcomes == ["per_key"] * 2 + ["queued"] * 2
    assert felis.unfinished(key_id=row.id) == 2


# --- options that cannot fit the worker's memory ---------------------------------------------------


def _refused(f: Felis, options: dict) -> InvalidRequest:
    with pytest.raises(InvalidRequest) as e:
        _request(f.session, "pets", options, f.settings, None)
    f.session.rollback()
    assert e.value.code == "training_memory_exceeded", e.value.message
    return e.value


def test_options_that_cannot_fit_the_worker_are_refused_naming_the_field(felis):
    """Before: image_size 1024 with batch_size 1024 was queued; the worker ran out of memory, and
    the training was retried 3 times."""
    felis.dataset("pets")
    felis.settings.worker_memory_bytes = 4 * GIB
    big = {"mode": "finetune", "image_size": 1024, "batch_size": 1024}
    err = _refused(felis, big)
    details = err.details
    assert details["field"] == "image_size"  # 1024 px does not fit even 2 at a time
    assert details["budget_bytes"] == 4 * GIB < details["estimated_bytes"]
    assert "image_size" in err.message and "FELIS_WORKER_MEMORY_BYTES" in err.message
    felis.request("pets", {**big, "image_size": details["max_value"]})  # the size it suggests fits

    err = _refused(felis, {"mode": "finetune", "batch_size": 1024})  # 224 px: fewer at a time would fit
    assert err.details["field"] == "batch_size" and 2 <= err.details["max_value"] < 1024
    felis.request("pets", {"mode": "finetune", "batch_size": err.details["max_value"]})
    assert felis.unfinished() == 2


def test_the_defaults_fit_a_worker_of_this_machine(felis, monkeypatch):
    """worker_memory_bytes 0: the budget is this machine's (service.limits.memory_budget)."""
    from service import limits

    felis.dataset("pets")
    assert felis.settings.worker_memory_bytes == 0
    for options in ({}, {"architecture": "simple_cnn"}):
        felis.request("pets", options)
    trainings.cancel_all(felis.session, datasets.get(felis.session, "pets").id, "done")
    felis.session.commit()
    monkeypatch.setattr(limits, "memory_budget", lambda: 256 << 20)  # the fallback is the one consulted
    assert _refused(felis, {}).details["budget_bytes"] == 256 << 20


# --- through the HTTP API ---------------------------------------------------------------------------


@pytest.fixture
def client(felis_env, monkeypatch):
    from fastapi.testclient import TestClient

    from service.api.app import create_app
    from service.config import get_settings

    monkeypatch.setenv("FELIS_API_KEYS_REQUIRED", "true")
    monkeypatch.setenv("FELIS_MAX_QUEUED_TRAININGS_PER_KEY", "4")
    monkeypatch.setenv("FELIS_WORKER_MEMORY_BYTES", str(4 * GIB))
    get_settings.cache_clear()
    with TestClient(create_app(), base_url="http://127.0.0.1") as c:
        yield c


def _key(*scopes: str) -> dict[str, str]:
    from service.domain import keys
    from service.store.db import session_scope

    with session_scope() as s:
        return {"Authorization": f"Bearer {keys.create(s, list(scopes))[1]}"}


def _api_dataset(c, name: str, auth: dict) -> None:
    assert c.post("/v1/datasets", json={"name": name}, headers=auth).status_code == 201
    archive = zip_folder(ASSETS / "cifar-cat" / "train")
    r = c.post(f"/v1/datasets/{name}/images", files={"archive": ("set.zip", archive, "application/zip")}, headers=auth)
    assert r.status_code == 201, r.text


def test_the_api_answers_429_and_422_with_the_reason(client):
    alice, bob = _key("write"), _key("write")
    _api_dataset(client, "cats", alice)
    _api_dataset(client, "dogs", alice)
    train = lambda name, auth, body=None: client.post(f"/v1/datasets/{name}/trainings", json=body or {}, headers=auth)
    for _ in range(3):
        assert train("cats", alice).status_code == 202
    r = train("cats", bob)
    assert r.status_code == 429, r.text
    error = r.json()["error"]
    assert error["code"] == "too_many_trainings" and error["details"] == {"cap": "per_dataset", "count": 3, "limit": 3}
    assert "cancel" in error["message"]
    assert train("dogs", alice).status_code == 202  # the key's fourth
    r = train("dogs", alice)
    assert r.status_code == 429 and r.json()["error"]["details"] == {"cap": "per_key", "count": 4, "limit": 4}
    assert train("dogs", bob).status_code == 202  # the route passed each caller's key

    r = train("dogs", bob, {"mode": "finetune", "image_size": 1024, "batch_size": 1024})
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert error["code"] == "training_memory_exceeded" and error["details"]["field"] == "image_size"
    assert error["details"]["budget_bytes"] == 4 * GIB < error["details"]["estimated_bytes"]
    listed = client.get("/v1/datasets/dogs/trainings", headers=alice).json()
    assert listed["count"] == 2  # nothing refused was queued
