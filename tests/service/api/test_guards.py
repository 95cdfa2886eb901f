"""Safe to expose (issue 14): other sites' web pages cannot change state, a rebinding DNS name gets
nothing in embedded mode, /readyz tells nothing internal, and image bytes are not for shared caches."""

from __future__ import annotations

import asyncio
import logging

import pytest
from fastapi.testclient import TestClient

from tests.conftest import asset_images

EVIL = "https://evil.example"


def _app(monkeypatch, **env: str):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    from service.api.app import create_app
    from service.config import get_settings

    get_settings.cache_clear()
    return create_app()


@pytest.fixture
def local(felis_env, monkeypatch):
    """Embedded felis as a browser on this machine reaches it: http://127.0.0.1:8000."""
    with TestClient(_app(monkeypatch), base_url="http://127.0.0.1:8000") as c:
        yield c


def _cats(n: int = 1) -> list:
    return [("files", (p.name, p.read_bytes(), "image/jpeg")) for p in asset_images("train", "cat")[:n]]


def _names(client: TestClient) -> list[str]:
    return [d["name"] for d in client.get("/v1/datasets").json()["data"]]


# --- cross-site requests ---------------------------------------------------------------------------


def test_another_sites_page_cannot_change_state(local):
    """A form or fetch() from evil.example: multipart upload, empty-body POST, JSON, DELETE."""
    assert local.post("/v1/datasets", json={"name": "pets"}).status_code == 201  # no browser: allowed
    cross = {"Origin": EVIL, "Sec-Fetch-Site": "cross-site"}
    attempts = [
        local.post("/v1/datasets", json={"name": "evil"}, headers=cross),
        local.post("/v1/datasets/pets/images", data={"label": "cat"}, files=_cats(), headers=cross),
        local.post("/v1/datasets/pets/trainings", headers=cross),
        local.delete("/v1/datasets/pets", headers=cross),
        local.post("/v1/datasets", json={"name": "evil"}, headers={"Origin": EVIL}),  # no Sec-Fetch-* (older browsers)
        local.post("/v1/datasets", json={"name": "evil"}, headers={"Sec-Fetch-Site": "cross-site"}),  # no Origin
        local.post("/v1/datasets", json={"name": "evil"}, headers={"Origin": "null"}),  # sandboxed iframe, file://
    ]
    for r in attempts:
        assert r.status_code == 403, r.text
        assert r.json()["error"]["code"] == "cross_site_request"
        assert "FELIS_ALLOWED_ORIGINS" in r.json()["error"]["message"]
    assert _names(local) == ["pets"]
    assert local.get("/v1/datasets/pets").json()["image_count"] == 0


def test_the_console_and_other_clients_keep_working(local):
    own = {"Origin": "http://127.0.0.1:8000", "Sec-Fetch-Site": "same-origin"}
    assert local.post("/v1/datasets", json={"name": "pets"}, headers=own).status_code == 201
    r = local.post("/v1/datasets/pets/images", data={"label": "cat"}, files=_cats(), headers=own)
    assert r.status_code == 201, r.text
    assert local.post("/v1/datasets", json={"name": "cli"}).status_code == 201  # curl, the felis client
    assert local.post("/v1/datasets", json={"name": "typed"}, headers={"Sec-Fetch-Site": "none"}).status_code == 201
    # reads from anywhere are not state changes (CORS keeps the answer from the other page)
    assert local.get("/v1/datasets", headers={"Origin": EVIL, "Sec-Fetch-Site": "cross-site"}).status_code == 200
    assert sorted(_names(local)) == ["cli", "pets", "typed"]


def test_another_port_or_scheme_is_another_origin(local):
    for origin in ("http://127.0.0.1:3000", "https://127.0.0.1:8000", "http://localhost:8000"):
        r = local.post("/v1/datasets", json={"name": "x"}, headers={"Origin": origin})
        assert r.status_code == 403, origin
    # the default port may be left out on either side
    with TestClient(local.app, base_url="http://localhost") as c:
        assert c.post("/v1/datasets", json={"name": "a"}, headers={"Origin": "http://localhost:80"}).status_code == 201


def test_same_site_is_refused_unless_the_origin_is_allowed(felis_env, monkeypatch):
    app = _app(monkeypatch, FELIS_ALLOWED_ORIGINS="https://console.example.org, http://127.0.0.1:5173",
               FELIS_ALLOWED_HOSTS="felis.example.org")
    with TestClient(app, base_url="https://felis.example.org") as c:
        sibling = {"Origin": "https://blog.example.org", "Sec-Fetch-Site": "same-site"}
        r = c.post("/v1/datasets", json={"name": "a"}, headers=sibling)
        assert r.status_code == 403 and r.json()["error"]["code"] == "cross_site_request"
        allowed = {"Origin": "https://console.example.org", "Sec-Fetch-Site": "same-site"}
        assert c.post("/v1/datasets", json={"name": "b"}, headers=allowed).status_code == 201
        dev = {"Origin": "http://127.0.0.1:5173", "Sec-Fetch-Site": "cross-site"}
        assert c.post("/v1/datasets", json={"name": "c"}, headers=dev).status_code == 201
        assert c.post("/v1/datasets", json={"name": "d"}, headers={"Origin": "https://felis.example.org"}).status_code == 201


# --- Host (DNS rebinding) ------------------------------------------------------------------------------


def test_a_rebinding_host_name_gets_nothing_in_embedded_mode(felis_env, monkeypatch):
    app = _app(monkeypatch)
    with TestClient(app, base_url="http://127.0.0.1:8000") as c:
        assert c.post("/v1/datasets", json={"name": "pets"}).status_code == 201
    # evil.example now resolves to 127.0.0.1: the page is same-origin with itself, so only Host tells
    with TestClient(app, base_url="http://evil.example:8000") as c:
        for r in (c.get("/v1/datasets"), c.get("/v1/datasets/pets"), c.delete("/v1/datasets/pets"),
                  c.post("/v1/datasets", json={"name": "x"}, headers={"Origin": "http://evil.example:8000"})):
            assert r.status_code == 403, r.text
            assert r.json()["error"]["code"] == "host_not_allowed"
            assert "FELIS_ALLOWED_HOSTS" in r.json()["error"]["message"]
        assert c.get("/healthz").status_code == 200  # probes address pods by IP; these tell nothing
    with TestClient(app, base_url="http://127.0.0.1:8000") as c:
        assert _names(c) == ["pets"]


@pytest.mark.parametrize("host", ["localhost", "localhost:8000", "127.0.0.1:1234", "[::1]:8000", "LOCALHOST:9"])
def test_loopback_names_pass_on_any_port(felis_env, monkeypatch, host):
    with TestClient(_app(monkeypatch)) as c:
        assert c.get("/v1/datasets", headers={"Host": host}).status_code == 200


def test_allowed_hosts(felis_env, monkeypatch):
    with TestClient(_app(monkeypatch, FELIS_ALLOWED_HOSTS="felis.lan,nas.lan:8443")) as c:
        assert c.get("/v1/datasets", headers={"Host": "felis.lan:8000"}).status_code == 200
        assert c.get("/v1/datasets", headers={"Host": "nas.lan:8443"}).status_code == 200
        assert c.get("/v1/datasets", headers={"Host": "nas.lan:8000"}).status_code == 403
        assert c.get("/v1/datasets", headers={"Host": "felis.lan.evil.example"}).status_code == 403
    with TestClient(_app(monkeypatch, FELIS_ALLOWED_HOSTS='["*"]')) as c:
        assert c.get("/v1/datasets", headers={"Host": "anything.example"}).status_code == 200


# --- the middleware alone: production mode, proxies ---------------------------------------------------


def _call(settings, method: str, headers: dict[str, str], client: tuple[str, int] = ("203.0.113.9", 5000),
          scheme: str = "http", path: str = "/v1/datasets") -> tuple[int, bytes]:
    from service.api.guards import RequestGuardMiddleware

    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    sent: list[dict] = []

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": method, "path": path, "scheme": scheme, "client": client,
             "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()]}
    asyncio.run(RequestGuardMiddleware(app, settings=settings)(scope, receive, send))
    return sent[0]["status"], b"".join(m.get("body", b"") for m in sent[1:])


def _settings(**values):
    from service.config import Settings

    return Settings(_env_file=None, **values)


def test_production_checks_origins_but_not_hosts(felis_env):
    prod = _settings(mode="production")
    assert _call(prod, "GET", {"host": "felis.example.com"})[0] == 200
    assert _call(prod, "POST", {"host": "felis.example.com", "origin": "http://felis.example.com"})[0] == 200
    status, body = _call(prod, "POST", {"host": "felis.example.com", "origin": EVIL, "sec-fetch-site": "cross-site"})
    assert status == 403 and b"cross_site_request" in body


def test_forwarded_headers_count_from_trusted_proxies_only(felis_env):
    """Behind a proxy that terminates TLS and rewrites Host: the page is https://felis.example.com."""
    proxied = {"host": "felis-api:8000", "x-forwarded-host": "felis.example.com", "x-forwarded-proto": "https",
               "origin": "https://felis.example.com", "sec-fetch-site": "same-origin"}
    trusting = _settings(mode="production", trusted_proxies="10.0.0.0/8")
    assert _call(trusting, "POST", proxied, client=("10.1.2.3", 4000))[0] == 200
    assert _call(trusting, "POST", proxied, client=("203.0.113.9", 4000))[0] == 403  # anyone can send these headers
    assert _call(_settings(mode="production"), "POST", proxied, client=("10.1.2.3", 4000))[0] == 403
    # embedded behind a local proxy: the forwarded host is the one checked
    embedded = _settings(trusted_proxies="127.0.0.1", allowed_hosts="felis.example.com")
    assert _call(embedded, "POST", proxied, client=("127.0.0.1", 4000))[0] == 200
    assert _call(embedded, "GET", {**proxied, "x-forwarded-host": "evil.example"}, client=("127.0.0.1", 4000))[0] == 403


# --- what the answers tell -----------------------------------------------------------------------------


def test_readyz_names_components_but_not_their_errors(local, monkeypatch, caplog):
    from service.api.routes import health
    from service.store import blobs

    def broken_storage(self):
        raise OSError("[Errno 13] Permission denied: '/srv/secret-volume/blobs'")

    def broken_broker():
        raise ConnectionError("redis://:hunter2@10.0.0.7:6379/0 refused")

    monkeypatch.setattr(blobs.LocalBlobStore, "check", broken_storage)
    monkeypatch.setattr(health, "check_broker", broken_broker)
    with caplog.at_level(logging.WARNING, logger="felis.api"):
        r = local.get("/readyz")
    assert r.status_code == 503
    assert r.json()["checks"] == {"database": "ok", "storage": "unavailable", "broker": "unavailable"}
    assert r.json()["error"]["code"] == "not_ready"
    assert "secret-volume" not in r.text and "hunter2" not in r.text and "10.0.0.7" not in r.text
    assert "secret-volume" in caplog.text and "10.0.0.7" in caplog.text  # the operator still finds out why


def test_image_bytes_are_not_kept_by_shared_caches(local):
    local.post("/v1/datasets", json={"name": "pets"})
    image_id = local.post("/v1/datasets/pets/images", data={"label": "cat"}, files=_cats()).json()["results"][0]["image_id"]
    r = local.get(f"/v1/datasets/pets/images/{image_id}/content")
    assert r.status_code == 200
    directives = {d.strip() for d in r.headers["cache-control"].split(",")}
    assert "private" in directives and "public" not in directives
