"""API keys with scopes, and per-caller rate limits, through the HTTP layer."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from service.api.ratelimit import RateLimiter
from service.domain import keys
from service.errors import RateLimited


@pytest.fixture
def secured(felis_env, monkeypatch):
    monkeypatch.setenv("FELIS_API_KEYS_REQUIRED", "true")
    from service.api.app import create_app
    from service.config import get_settings
    from service.store.db import session_scope

    get_settings.cache_clear()
    with session_scope() as s:
        made = {scope: keys.create(s, [scope])[1] for scope in ("predict", "write", "admin")}
    with TestClient(create_app()) as c:
        yield c, made


def test_keys_are_required_and_scoped(secured):
    c, made = secured
    r = c.get("/v1/datasets")
    assert r.status_code == 401 and r.json()["error"]["code"] == "api_key_required"
    assert c.get("/healthz").status_code == 200  # probes stay open
    bearer = lambda scope: {"Authorization": f"Bearer {made[scope]}"}
    assert c.get("/v1/datasets", headers=bearer("predict")).status_code == 200
    r = c.post("/v1/datasets", json={"name": "pets"}, headers=bearer("predict"))
    assert r.status_code == 403 and r.json()["error"]["code"] == "insufficient_scope"
    assert c.post("/v1/datasets", json={"name": "pets"}, headers=bearer("write")).status_code == 201
    assert c.delete("/v1/datasets/pets", headers={"X-API-Key": made["admin"]}).status_code == 204
    r = c.get("/v1/datasets", headers={"Authorization": "Bearer felis_dead_beef"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"


def test_revoked_key_stops_working(secured):
    c, made = secured
    from service.store.db import session_scope

    key_id = made["write"].split("_")[1]
    with session_scope() as s:
        keys.revoke(s, key_id)
        assert all(k["revoked"] == (k["id"] == key_id) for k in keys.list_keys(s))
    assert c.get("/v1/datasets", headers={"Authorization": f"Bearer {made['write']}"}).status_code == 401


def test_keys_are_stored_hashed(secured):
    _, made = secured
    from service.store.db import session_scope
    from service.store.tables import ApiKey

    with session_scope() as s:
        stored = [row.key_hash for row in s.query(ApiKey)]
    assert stored and not any(key in h or h in key for key in made.values() for h in stored)


def test_rate_limit_gives_429_with_retry_after(felis_env, monkeypatch):
    monkeypatch.setenv("FELIS_RATE_LIMIT_UPLOAD_PER_MINUTE", "6")
    from service.api.app import create_app
    from service.config import get_settings

    get_settings.cache_clear()
    with TestClient(create_app()) as c:
        c.post("/v1/datasets", json={"name": "pets"})
        codes = [c.post("/v1/datasets/pets/images", data={"label": "cat"}).status_code for _ in range(3)]
        assert codes[0] == 422 and codes[-1] == 429
        r = c.post("/v1/datasets/pets/images", data={"label": "cat"})
        assert r.json()["error"]["code"] == "rate_limited" and int(r.headers["Retry-After"]) >= 1


def test_token_bucket_refills():
    limiter = RateLimiter(per_minute=600, burst=2)
    limiter.take("a")
    limiter.take("a")
    with pytest.raises(RateLimited) as e:
        limiter.take("a")
    assert 0 < e.value.retry_after <= 0.11
    limiter.take("b")  # callers are independent
