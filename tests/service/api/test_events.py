"""GET /v1/trainings/{id}/events: the training as server-sent events, ending at a final status."""

from __future__ import annotations

import json
import threading
import time

import pytest
from fastapi.testclient import TestClient

from service.api.routes import events
from tests.utils.rows import training_row, update_training


@pytest.fixture
def client(felis_env, monkeypatch):
    from service.api.app import create_app

    monkeypatch.setattr(events, "POLL_SECONDS", 0.05)
    with TestClient(create_app()) as c:
        yield c


_training, _update = training_row, update_training


def _events(text: str) -> list[dict]:
    return [json.loads(line[5:]) for line in text.splitlines() if line.startswith("data:")]


def test_a_finished_training_is_one_event(client):
    tid = _training("succeeded")
    r = client.get(f"/v1/trainings/{tid}/events")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    assert r.headers["cache-control"] == "no-cache"
    (event,) = _events(r.text)
    assert event == client.get(f"/v1/trainings/{tid}").json()


def test_each_change_is_an_event_until_the_final_status(client):
    tid = _training("queued")

    def worker() -> None:
        time.sleep(1.0)  # after the stream's first read, even on a loaded machine (0.3 s was not, in CI)
        _update(tid, status="running", progress={"phase": "training", "epoch": 1, "epochs": 2, "loss": 0.7})
        time.sleep(0.3)
        _update(tid, progress={"phase": "training", "epoch": 2, "epochs": 2, "loss": 0.5, "val_accuracy": 0.8})
        time.sleep(0.3)
        _update(tid, status="succeeded", progress={"phase": "done"})

    thread = threading.Thread(target=worker)
    thread.start()
    r = client.get(f"/v1/trainings/{tid}/events")  # returns when the stream ends
    thread.join()
    seen = _events(r.text)
    assert [e["status"] for e in seen] == ["queued", "running", "running", "succeeded"]
    assert [e["progress"].get("epoch") for e in seen] == [None, 1, 2, None]
    assert "retry: 2000" in r.text


def test_a_missing_training_is_a_404_before_the_stream(client):
    r = client.get("/v1/trainings/nope/events")
    assert r.status_code == 404 and r.json()["error"]["code"] == "training_not_found"


def test_streams_are_left_out_of_the_latency_histogram(client):
    tid = _training("cancelled")
    client.get(f"/v1/trainings/{tid}/events")
    assert 'route="/v1/trainings/{training_id}/events",status="200"' not in client.get("/metrics").text


def test_a_stream_ends_when_its_key_is_revoked(felis_env, monkeypatch):
    """The key is checked while a stream lasts (it can last hours), not only when it opens. Before,
    a stream opened with a key revoked a moment later delivered every event to the end."""
    from service.api.app import create_app

    monkeypatch.setenv("FELIS_API_KEYS_REQUIRED", "true")
    monkeypatch.setenv("FELIS_BOOTSTRAP_ADMIN_KEY", "events-admin-key-0123456789abcdefghij")
    from tests.conftest import _reset_caches

    _reset_caches()
    monkeypatch.setattr(events, "POLL_SECONDS", 0.05)
    monkeypatch.setattr(events, "KEY_CHECK_SECONDS", 0.0)
    admin = {"Authorization": "Bearer events-admin-key-0123456789abcdefghij"}
    tid = _training("running")
    with TestClient(create_app()) as c:
        dataset = c.get(f"/v1/trainings/{tid}", headers=admin).json()["dataset"]
        made = c.post("/v1/keys", json={"scopes": ["read"], "datasets": [dataset]}, headers=admin).json()

        def operator() -> None:
            time.sleep(1.0)
            assert c.delete(f"/v1/keys/{made['id']}", headers=admin).status_code == 204
            time.sleep(0.3)
            _update(tid, progress={"phase": "training", "epoch": 1, "epochs": 2, "loss": 0.7})
            time.sleep(0.3)
            _update(tid, status="succeeded", progress={"phase": "done"})

        thread = threading.Thread(target=operator)
        thread.start()
        r = c.get(f"/v1/trainings/{tid}/events", headers={"Authorization": f"Bearer {made['key']}"})
        thread.join()
    assert r.status_code == 200
    assert [e["status"] for e in _events(r.text)] == ["running"], r.text
