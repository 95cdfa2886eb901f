"""service.api.metrics: /metrics (latency by route template, uploads, predictions, queue depth)
and request ids on every log line."""

from __future__ import annotations

import json
import logging

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from service.api import metrics
from service.store import queue
from tests.conftest import asset_images


@pytest.fixture
def client(felis_env):
    from service.api.app import create_app

    with TestClient(create_app()) as c:
        yield c


def _samples(client: TestClient) -> dict[tuple[str, tuple], float]:
    r = client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    out = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def _value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_latency_is_labelled_by_route_template_not_path(client):
    before = _samples(client)
    client.post("/v1/datasets", json={"name": "m1"})
    client.get("/v1/datasets/m1")
    client.get("/v1/datasets/does-not-exist")
    client.get("/no/such/path/123")
    after = _samples(client)
    count = "felis_http_request_duration_seconds_count"
    delta = lambda **l: _value(after, count, **l) - _value(before, count, **l)  # noqa: E731
    assert delta(method="POST", route="/v1/datasets", status="201") == 1
    assert delta(method="GET", route="/v1/datasets/{name}", status="200") == 1
    assert delta(method="GET", route="/v1/datasets/{name}", status="404") == 1
    assert delta(method="GET", route=metrics.UNMATCHED, status="404") == 1
    assert not any("m1" in str(labels) or "/no/such" in str(labels) for _, labels in after)


def test_uploads_are_counted_by_status_and_reason(client):
    before = _samples(client)
    client.post("/v1/datasets", json={"name": "m2"})
    cats = asset_images("train", "cat")[:2]
    files = [("files", (p.name, p.read_bytes(), "image/jpeg")) for p in cats]
    client.post("/v1/datasets/m2/images", data={"label": "cat"}, files=files)
    r = client.post("/v1/datasets/m2/images", data={"label": "cat"},
                    files=files[:1] + [("files", ("junk.jpg", b"not an image", "image/jpeg"))])
    assert r.status_code == 422
    after = _samples(client)
    delta = lambda **l: _value(after, "felis_uploaded_files_total", **l) - _value(before, "felis_uploaded_files_total", **l)  # noqa: E731
    assert delta(status="created", reason="") == 2
    assert delta(status="duplicate", reason="") == 1
    assert delta(status="rejected", reason="not_an_image") == 1


def test_predictions_are_counted_by_dataset_and_version():
    before = metrics.PREDICTIONS.labels("pets", "3")._value.get()
    answer = {"model_version": 3, "predictions": [{"filename": "a", "probabilities": {"cat": 1.0}},
                                                  {"filename": "b", "error": {"code": "not_an_image"}}]}
    metrics.count_predictions({"path_params": {"name": "pets"}}, 200, answer)
    assert metrics.PREDICTIONS.labels("pets", "3")._value.get() - before == 1


def test_queue_depth_counts_waiting_messages_in_the_filesystem_broker(client, settings):
    folder = settings.broker_dir / "queue"
    folder.mkdir(parents=True, exist_ok=True)
    assert _value(_samples(client), "felis_queue_depth", queue="gpu") == 0
    for i in range(3):
        (folder / f"{1000 + i}_abc{i}.gpu.msg").write_bytes(b"{}")
    (folder / "1003_x.other.msg").write_bytes(b"{}")
    assert _value(_samples(client), "felis_queue_depth", queue="gpu") == 3


def test_queue_depth_in_redis(felis_env, monkeypatch):
    redis = pytest.importorskip("redis")
    url = "redis://127.0.0.1:6379/15"
    try:
        r = redis.Redis.from_url(url, socket_connect_timeout=1)
        r.ping()
    except redis.RedisError:
        pytest.skip("no Redis on 127.0.0.1:6379")
    from service.config import get_settings

    monkeypatch.setenv("FELIS_BROKER_URL", url)
    get_settings.cache_clear()
    r.delete("gpu", "gpu\x06\x163")
    r.rpush("gpu", "a", "b")
    r.rpush("gpu\x06\x163", "c")
    try:
        assert queue.queue_depth() == 3
    finally:
        r.delete("gpu", "gpu\x06\x163")


def test_request_id_is_on_every_log_line_of_the_request(felis_env):
    from service.api.app import create_app
    from service.config import get_settings
    from service.logs import JsonFormatter, TextFormatter, make_handler

    app = create_app()
    log = logging.getLogger("felis.test")

    @app.get("/_log_twice")
    def log_twice() -> dict:  # a sync route: runs in the threadpool, the context must follow
        log.warning("inside the request")
        return {}

    records: list[logging.LogRecord] = []
    handler = make_handler(get_settings())
    handler.emit = records.append  # type: ignore[method-assign]
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        with TestClient(app) as c:
            assert c.get("/_log_twice", headers={"X-Request-ID": "req-abc"}).headers["x-request-id"] == "req-abc"
            c.get("/_log_twice")
    finally:
        root.removeHandler(handler)
    mine = [r for r in records if r.name == "felis.test"]
    assert mine[0].request_id == "req-abc"
    assert mine[1].request_id not in (None, "req-abc") and len(mine[1].request_id) == 32  # made up per request
    assert json.loads(JsonFormatter().format(mine[0]))["request_id"] == "req-abc"
    assert "[request_id=req-abc]" in TextFormatter().format(mine[0])


def test_log_context_for_a_training():
    from service.logs import ContextFilter, current, log_context

    record = logging.LogRecord("felis.worker", logging.INFO, __file__, 1, "training", None, None)
    with log_context(training_id="t1", request_id="r1"):
        assert current() == {"training_id": "t1", "request_id": "r1"}
        ContextFilter().filter(record)
    assert (record.training_id, record.request_id) == ("t1", "r1") and current() == {}


def test_made_up_request_ids_are_distinct_hex_also_in_a_forked_child():
    import os

    from service.api.middleware import new_request_id

    ids = {new_request_id() for _ in range(10_000)}
    assert len(ids) == 10_000 and all(len(i) == 32 and int(i, 16) >= 0 for i in ids)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child's generator is seeded afresh: not the parent's next ids
        os.write(write, new_request_id().encode())
        os._exit(0)
    os.waitpid(pid, 0)
    child = os.read(read, 64).decode()
    assert child != new_request_id() and child not in ids
