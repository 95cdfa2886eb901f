"""API keys with scopes, keys limited to datasets, and per-caller rate limits, through the HTTP layer."""

from __future__ import annotations

import json
import pytest
from fastapi.testclient import TestClient

from service.api.ratelimit import RateLimiter
from service.domain import keys
from service.errors import RateLimited
from tests.conftest import asset_images

BASE = "http://127.0.0.1"  # a loopback Host, which embedded mode accepts
BOOTSTRAP = "operator-chosen-bootstrap-secret-0123456789"


class Secured:
    """A felis app with keys required, and a way to make keys."""

    def __init__(self, client: TestClient):
        self.c = client

    def key(self, *scopes: str, datasets: list[str] | None = None) -> str:
        from service.store.db import session_scope

        with session_scope() as s:
            if datasets is None:
                return keys.create(s, list(scopes))[1]
            return keys.create(s, list(scopes), dataset_names=datasets)[1]

    def auth(self, *scopes: str, datasets: list[str] | None = None) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key(*scopes, datasets=datasets)}"}


def _app_client(**kw) -> TestClient:
    from service.api.app import create_app

    return TestClient(create_app(), base_url=BASE, **kw)


@pytest.fixture
def secured(felis_env, monkeypatch):
    monkeypatch.setenv("FELIS_API_KEYS_REQUIRED", "true")
    from service.config import get_settings

    get_settings.cache_clear()
    with _app_client() as c:
        yield Secured(c)


def _upload(c: TestClient, dataset: str, headers: dict, n: int = 2, label: str = "cat") -> list[str]:
    files = [("files", (p.name, p.read_bytes(), "image/jpeg")) for p in asset_images("train", "cat")[:n]]
    r = c.post(f"/v1/datasets/{dataset}/images", data={"label": label}, files=files, headers=headers)
    assert r.status_code == 201, r.text
    return [res["image_id"] for res in r.json()["results"]]


def _training_row(dataset: str) -> str:
    """A queued training of the dataset, as the API would have recorded it."""
    from service.domain import datasets
    from service.store.db import session_scope
    from service.store.tables import Training

    with session_scope() as s:
        t = Training(dataset_id=datasets.get(s, dataset).id, status="queued")
        s.add(t)
        s.flush()
        return t.id


def _code(r) -> tuple[int, str | None]:
    try:
        return r.status_code, r.json().get("error", {}).get("code")
    except ValueError:
        return r.status_code, None


# --- 401 and 403, with codes -----------------------------------------------------------------


def test_keys_are_required_and_answers_carry_codes(secured):
    c = secured.c
    r = c.get("/v1/datasets")
    assert _code(r) == (401, "api_key_required") and r.headers["WWW-Authenticate"] == "Bearer"
    r = c.get("/v1/datasets", headers={"Authorization": "Bearer felis_dead_beef"})
    assert _code(r) == (401, "invalid_api_key")
    for path in ("/healthz", "/readyz", "/", "/openapi.json", "/docs"):  # no scope: open
        assert c.get(path).status_code == 200, path
    predict = secured.auth("predict")
    assert c.get("/v1/datasets", headers=predict).status_code == 200
    r = c.post("/v1/datasets", json={"name": "pets"}, headers=predict)
    assert _code(r) == (403, "insufficient_scope")
    assert r.json()["error"]["details"] == {"required_scope": "write", "granted": ["predict"]}
    assert c.post("/v1/datasets", json={"name": "pets"}, headers=secured.auth("write")).status_code == 201
    assert c.delete("/v1/datasets/pets", headers={"X-API-Key": secured.key("admin")}).status_code == 204
    # the scope is checked before the body: a key without it learns nothing from validation
    assert _code(c.post("/v1/datasets", json={"name": 5}, headers=predict)) == (403, "insufficient_scope")


def test_scopes_nest():
    assert keys.granted(["predict"]) == {keys.Scope.PREDICT}
    assert keys.granted(["read"]) == {keys.Scope.PREDICT, keys.Scope.READ}
    assert keys.granted(["write"]) == {keys.Scope.PREDICT, keys.Scope.READ, keys.Scope.WRITE}
    assert keys.granted(["admin"]) == set(keys.Scope)
    assert keys.granted(["nonsense"]) == set()
    assert keys.SCOPES == ("predict", "read", "write", "admin")


# --- the findings: scope by URL suffix, every GET on predict, admin = write --------------------


def test_a_predict_key_cannot_change_a_dataset_or_label_named_predict(secured):
    c, write, predict = secured.c, secured.auth("write"), secured.auth("predict")
    assert c.post("/v1/datasets", json={"name": "predict"}, headers=write).status_code == 201
    assert _code(c.delete("/v1/datasets/predict", headers=predict)) == (403, "insufficient_scope")
    r = c.put("/v1/datasets/predict/models/1/thresholds/predict", json={"threshold": 0.5}, headers=predict)
    assert _code(r) == (403, "insufficient_scope")
    assert c.get("/v1/datasets/predict", headers=predict).status_code == 200  # still there


def test_a_predict_key_predicts_and_reads_metadata_only(secured):
    """A key shipped in a mobile app: no training image, no model file, no evaluation."""
    c, write, predict = secured.c, secured.auth("write"), secured.auth("predict")
    c.post("/v1/datasets", json={"name": "pets"}, headers=write)
    image = _upload(c, "pets", write)[0]
    training = _training_row("pets")
    for path in ("/v1/datasets", "/v1/datasets/pets", "/v1/datasets/pets/models"):
        assert c.get(path, headers=predict).status_code == 200, path
    assert _code(c.get("/v1/datasets/pets/models/1", headers=predict)) == (404, "version_not_found")
    cat = asset_images("test", "cat")[0]
    r = c.post("/v1/datasets/pets/predict", files={"files": (cat.name, cat.read_bytes())}, headers=predict)
    assert _code(r) == (404, "no_model")  # allowed; there is no model yet
    for path in ("/v1/datasets/pets/images", f"/v1/datasets/pets/images/{image}",
                 f"/v1/datasets/pets/images/{image}/content", "/v1/datasets/pets/images/near-duplicates",
                 "/v1/datasets/pets/models/1/evaluation", "/v1/datasets/pets/models/1/download",
                 "/v1/datasets/pets/models/1/download?format=onnx", "/v1/datasets/pets/trainings",
                 f"/v1/trainings/{training}", f"/v1/trainings/{training}/events"):
        assert _code(c.get(path, headers=predict)) == (403, "insufficient_scope"), path


def test_a_read_key_reads_everything_and_changes_nothing(secured):
    c, write, read = secured.c, secured.auth("write"), secured.auth("read")
    c.post("/v1/datasets", json={"name": "pets"}, headers=write)
    image = _upload(c, "pets", write)[0]
    training = _training_row("pets")
    for path in ("/v1/datasets/pets/images", f"/v1/datasets/pets/images/{image}",
                 f"/v1/datasets/pets/images/{image}/content", "/v1/datasets/pets/images/near-duplicates",
                 "/v1/datasets/pets/trainings", f"/v1/trainings/{training}"):
        assert c.get(path, headers=read).status_code == 200, path
    assert _code(c.get("/v1/datasets/pets/models/1/evaluation", headers=read)) == (404, "version_not_found")
    assert _code(c.get("/v1/datasets/pets/models/1/download", headers=read)) == (404, "version_not_found")
    refused = [
        c.post("/v1/datasets/pets/images", data={"label": "cat"}, headers=read),
        c.patch(f"/v1/datasets/pets/images/{image}", json={"label": "dog"}, headers=read),
        c.delete(f"/v1/datasets/pets/images/{image}", headers=read),
        c.post("/v1/datasets/pets/trainings", json={}, headers=read),
        c.post(f"/v1/trainings/{training}/cancel", headers=read),
        c.post("/v1/datasets/pets/models/1/promote", headers=read),
        c.delete("/v1/datasets/pets/models/1", headers=read),
        c.delete("/v1/datasets/pets", headers=read),
        c.post("/v1/datasets", json={"name": "more"}, headers=read),
    ]
    assert [_code(r) for r in refused] == [(403, "insufficient_scope")] * len(refused)


def test_write_changes_datasets_and_only_admin_manages_keys(secured):
    c, write, admin = secured.c, secured.auth("write"), secured.auth("admin")
    c.post("/v1/datasets", json={"name": "pets"}, headers=write)
    image = _upload(c, "pets", write)[0]
    assert c.patch(f"/v1/datasets/pets/images/{image}", json={"label": "dog"}, headers=write).status_code == 200
    training = _training_row("pets")
    assert c.post(f"/v1/trainings/{training}/cancel", headers=write).status_code == 200
    assert c.delete(f"/v1/datasets/pets/images/{image}", headers=write).status_code == 204
    for method, path in (("POST", "/v1/keys"), ("GET", "/v1/keys"), ("DELETE", "/v1/keys/x"), ("GET", "/metrics")):
        r = c.request(method, path, json={"scopes": ["read"]} if method == "POST" else None, headers=write)
        assert _code(r) == (403, "insufficient_scope"), (method, path)
    assert c.get("/v1/keys", headers=admin).status_code == 200
    assert c.get("/metrics", headers=admin).status_code == 200


def test_an_admin_key_manages_keys_over_http(secured):
    c, admin = secured.c, secured.auth("admin")
    c.post("/v1/datasets", json={"name": "pets"}, headers=admin)
    r = c.post("/v1/keys", json={"scopes": ["read"], "name": "gallery app"}, headers=admin)
    assert r.status_code == 201, r.text
    made = r.json()
    assert made["scopes"] == ["read"] and made["datasets"] is None and made["key"].startswith("felis_")
    new = {"Authorization": f"Bearer {made['key']}"}
    assert c.get("/v1/datasets/pets/images", headers=new).status_code == 200
    assert _code(c.post("/v1/datasets/pets/images", headers=new)) == (403, "insufficient_scope")

    listed = c.get("/v1/keys", headers=admin).json()
    assert listed["count"] == len(listed["data"]) == 2
    mine = next(k for k in listed["data"] if k["id"] == made["id"])
    assert mine == {k: v for k, v in made.items() if k != "key"}  # the secret is answered once, at creation
    assert made["key"] not in json.dumps(listed)

    assert c.delete(f"/v1/keys/{made['id']}", headers=admin).status_code == 204
    assert _code(c.get("/v1/datasets", headers=new)) == (401, "invalid_api_key")
    assert next(k for k in c.get("/v1/keys", headers=admin).json()["data"] if k["id"] == made["id"])["revoked"]
    assert _code(c.delete("/v1/keys/nope", headers=admin)) == (404, "key_not_found")
    assert c.post("/v1/keys", json={"scopes": ["root"]}, headers=admin).status_code == 422
    assert c.post("/v1/keys", json={"scopes": []}, headers=admin).status_code == 422
    assert _code(c.post("/v1/keys", json={"scopes": ["read"], "datasets": ["nope"]}, headers=admin)) == (
        404, "dataset_not_found")


# --- keys limited to datasets ------------------------------------------------------------------


def test_a_key_limited_to_datasets_sees_only_those(secured):
    c, admin = secured.c, secured.auth("admin")
    for name in ("pets", "birds", "cars"):
        assert c.post("/v1/datasets", json={"name": name}, headers=admin).status_code == 201
    bird = _upload(c, "birds", admin)[0]
    _upload(c, "pets", admin)
    pets_training, birds_training = _training_row("pets"), _training_row("birds")
    r = c.post("/v1/keys", json={"scopes": ["write"], "datasets": ["pets", "cars"]}, headers=admin)
    assert r.status_code == 201 and r.json()["datasets"] == ["cars", "pets"]
    limited = {"Authorization": f"Bearer {r.json()['key']}"}

    listing = c.get("/v1/datasets", headers=limited).json()
    assert [d["name"] for d in listing["data"]] == ["cars", "pets"] and listing["count"] == 2
    assert c.get("/v1/datasets?limit=1&offset=1", headers=limited).json()["data"][0]["name"] == "pets"
    assert c.get("/v1/datasets/pets/images", headers=limited).status_code == 200
    assert c.get(f"/v1/trainings/{pets_training}", headers=limited).status_code == 200

    # outside the list: 404 as for a dataset that does not exist, so its existence does not leak
    missing = c.get("/v1/datasets/nope", headers=limited)
    hidden = c.get("/v1/datasets/birds", headers=limited)
    assert _code(hidden) == _code(missing) == (404, "dataset_not_found")
    assert hidden.json()["error"]["message"] == missing.json()["error"]["message"].replace("nope", "birds")
    for r in (c.get("/v1/datasets/birds/images", headers=limited),
              c.get(f"/v1/datasets/birds/images/{bird}/content", headers=limited),
              c.post("/v1/datasets/birds/images", data={"label": "x"}, headers=limited),
              c.get("/v1/datasets/birds/models", headers=limited),
              c.post("/v1/datasets/birds/trainings", json={}, headers=limited),
              c.delete("/v1/datasets/birds", headers=limited)):
        assert _code(r) == (404, "dataset_not_found"), r.request.url
    assert c.get("/v1/datasets/birds", headers=admin).status_code == 200  # not deleted
    for r in (c.get(f"/v1/trainings/{birds_training}", headers=limited),
              c.get(f"/v1/trainings/{birds_training}/events", headers=limited),
              c.post(f"/v1/trainings/{birds_training}/cancel", headers=limited)):
        assert _code(r) == (404, "training_not_found"), r.request.url

    # a limited key creates no datasets (not even as admin), and manages no keys
    assert _code(c.post("/v1/datasets", json={"name": "new"}, headers=limited)) == (403, "key_limited_to_datasets")
    limited_admin = secured.auth("admin", datasets=["pets"])
    assert _code(c.post("/v1/datasets", json={"name": "new"}, headers=limited_admin)) == (
        403, "key_limited_to_datasets")
    assert _code(c.post("/v1/keys", json={"scopes": ["admin"]}, headers=limited_admin)) == (
        403, "key_limited_to_datasets")
    assert _code(c.get("/metrics", headers=limited_admin)) == (403, "key_limited_to_datasets")  # labels name datasets


def test_a_limited_key_stores_dataset_ids_not_names(secured):
    c, admin = secured.c, secured.auth("admin")
    c.post("/v1/datasets", json={"name": "pets"}, headers=admin)
    limited = secured.auth("read", datasets=["pets"])
    assert c.get("/v1/datasets/pets", headers=limited).status_code == 200
    assert c.delete("/v1/datasets/pets", headers=admin).status_code == 204
    assert c.post("/v1/datasets", json={"name": "pets"}, headers=admin).status_code == 201  # another dataset
    assert _code(c.get("/v1/datasets/pets", headers=limited)) == (404, "dataset_not_found")
    assert c.get("/v1/datasets", headers=limited).json() == {"data": [], "count": 0}

    from service.domain import cleanup
    from service.store.db import session_scope

    with session_scope() as s:  # the old one's rows removed: the key still sees nothing, not everything
        from service.store.blobs import get_store

        cleanup.purge(s, get_store())
    assert c.get("/v1/datasets", headers=limited).json() == {"data": [], "count": 0}
    assert _code(c.get("/v1/datasets/pets", headers=limited)) == (404, "dataset_not_found")


# --- keys made before, the first key, the command line ----------------------------------------


def test_the_migration_turns_a_stored_predict_key_into_predict_and_read(tmp_path):
    from alembic import command
    from sqlalchemy import text

    from service.store import migrate
    from service.store.db import make_engine

    engine = make_engine(f"sqlite:///{tmp_path / 'old.db'}")
    try:
        with migrate.migration_connection(engine) as conn:
            command.upgrade(migrate.alembic_config(conn), "0004_staged_uploads")
        with engine.begin() as conn:
            for key_id, scopes in (("p", ["predict"]), ("pw", ["predict", "write"]), ("a", ["admin"])):
                conn.execute(text("INSERT INTO api_keys (id, name, scopes, key_hash, created_at, revoked) "
                                  "VALUES (:id, '', :scopes, 'h', '2026-01-01', false)"),
                             {"id": key_id, "scopes": json.dumps(scopes)})
        migrate.upgrade(engine)

        def stored() -> dict:
            with engine.connect() as conn:
                return {k: json.loads(s) for k, s in conn.execute(text("SELECT id, scopes FROM api_keys"))}

        assert stored() == {"p": ["predict", "read"], "pw": ["predict", "write"], "a": ["admin"]}
        with engine.connect() as conn:
            assert set(conn.execute(text("SELECT limited FROM api_keys")).scalars()) == {0}
        with migrate.migration_connection(engine) as conn:
            command.downgrade(migrate.alembic_config(conn), "0004_staged_uploads")
        assert stored() == {"p": ["predict"], "pw": ["predict", "write"], "a": ["admin"]}
    finally:
        engine.dispose()


def test_the_bootstrap_admin_key_is_stored_at_first_start_only(felis_env, monkeypatch):
    from service.config import get_settings

    monkeypatch.setenv("FELIS_API_KEYS_REQUIRED", "true")
    monkeypatch.setenv("FELIS_BOOTSTRAP_ADMIN_KEY", BOOTSTRAP)
    get_settings.cache_clear()
    with _app_client() as c:
        r = c.post("/v1/keys", json={"scopes": ["write"]}, headers={"Authorization": f"Bearer {BOOTSTRAP}"})
        assert r.status_code == 201, r.text
    from service.store.db import session_scope
    from service.store.tables import ApiKey

    with session_scope() as s:
        assert BOOTSTRAP not in json.dumps([row.key_hash for row in s.query(ApiKey)])  # hashed

    other = "another-bootstrap-secret-set-later-0123456789"
    monkeypatch.setenv("FELIS_BOOTSTRAP_ADMIN_KEY", other)
    get_settings.cache_clear()
    with _app_client() as c:  # keys exist: ignored
        assert _code(c.get("/v1/keys", headers={"Authorization": f"Bearer {other}"})) == (401, "invalid_api_key")
        assert c.get("/v1/keys", headers={"Authorization": f"Bearer {BOOTSTRAP}"}).status_code == 200
        assert c.delete(f"/v1/keys/{keys.BOOTSTRAP_ID}", headers={"X-API-Key": BOOTSTRAP}).status_code == 204
    with _app_client() as c:  # revoked, and not made again: a revoked key is a key
        assert _code(c.get("/v1/keys", headers={"Authorization": f"Bearer {BOOTSTRAP}"})) == (401, "invalid_api_key")

    from pydantic import ValidationError

    from service.config import Settings

    monkeypatch.setenv("FELIS_BOOTSTRAP_ADMIN_KEY", "short")
    with pytest.raises(ValidationError, match="at least 32 characters"):
        Settings()
    assert BOOTSTRAP not in repr(Settings(bootstrap_admin_key=BOOTSTRAP))


def test_felis_keys_create_read_and_limited(felis_env, capsys):
    from service import cli
    from service.store.db import session_scope

    with session_scope() as s:
        from service.domain import datasets

        datasets.create(s, "pets")
    assert cli.main(["keys", "create", "--scope", "read", "--name", "gallery"]) == 0
    made = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert made["scopes"] == ["read"] and made["datasets"] is None and made["key"].startswith("felis_")
    assert cli.main(["keys", "create", "--scope", "predict", "--dataset", "pets"]) == 0
    limited = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert limited["datasets"] == ["pets"]
    assert cli.main(["keys", "create", "--scope", "predict", "--dataset", "nope"]) == 1
    assert "dataset_not_found" in capsys.readouterr().err
    assert cli.main(["keys", "list"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert {k["id"]: k["datasets"] for k in listed} == {made["id"]: None, limited["id"]: ["pets"]}
    import re  # the API's time format (before: '2026-12-06 21:05:59.031615+00:00', str() of the datetime)

    assert all(re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z", k["created_at"]) for k in [made, *listed]), listed
    for scope in keys.SCOPES:  # every scope can be given
        assert cli.build_parser().parse_args(["keys", "create", "--scope", scope]).scope == [scope]


def test_revoked_key_stops_working(secured):
    c = secured.c
    key = secured.key("write")
    from service.store.db import session_scope

    key_id = key.split("_")[1]
    with session_scope() as s:
        keys.revoke(s, key_id)
        assert all(k["revoked"] == (k["id"] == key_id) for k in keys.list_keys(s))
    assert c.get("/v1/datasets", headers={"Authorization": f"Bearer {key}"}).status_code == 401


def test_keys_are_stored_hashed(secured):
    made = [secured.key(scope) for scope in keys.SCOPES]
    from service.store.db import session_scope
    from service.store.tables import ApiKey

    with session_scope() as s:
        stored = [row.key_hash for row in s.query(ApiKey)]
    assert len(stored) == 4 and not any(key in h or h in key for key in made for h in stored)


# --- who is calling: one check per request, no thread hop without a key -------------------------


def test_one_key_check_per_request_and_none_without_a_key(felis_env, monkeypatch):
    from service.api import auth

    hops: list[str] = []
    real = auth.run_in_threadpool

    async def counted(fn, *args):
        hops.append(fn.__name__)
        return await real(fn, *args)

    monkeypatch.setattr(auth, "run_in_threadpool", counted)
    with _app_client() as c:
        c.post("/v1/datasets", json={"name": "pets"})
        cat = asset_images("test", "cat")[0]
        hops.clear()
        r = c.post("/v1/datasets/pets/predict", files={"files": (cat.name, cat.read_bytes())})
        assert _code(r) == (404, "no_model") and hops == []  # keys optional, none sent: no hop
        from service.store.db import session_scope

        with session_scope() as s:
            key = keys.create(s, ["predict"])[1]
        r = c.post("/v1/datasets/pets/predict", files={"files": (cat.name, cat.read_bytes())},
                   headers={"Authorization": f"Bearer {key}"})
        assert _code(r) == (404, "no_model")
        assert hops == ["_check_key"]  # three declarations on the route (scope, dataset, metrics): one check


# --- rate limits: per key, per client address, failed attempts -----------------------------------


def test_rate_limit_gives_429_with_retry_after(felis_env, monkeypatch):
    monkeypatch.setenv("FELIS_RATE_LIMIT_UPLOAD_PER_MINUTE", "6")
    from service.config import get_settings

    get_settings.cache_clear()
    with _app_client() as c:
        c.post("/v1/datasets", json={"name": "pets"})
        codes = [c.post("/v1/datasets/pets/images", data={"label": "cat"}).status_code for _ in range(3)]
        assert codes[0] == 422 and codes[-1] == 429
        r = c.post("/v1/datasets/pets/images", data={"label": "cat"})
        assert r.json()["error"]["code"] == "rate_limited" and int(r.headers["Retry-After"]) >= 1
        # other routes are not counted against uploads, whatever their path ends with
        c.post("/v1/datasets", json={"name": "images"})
        assert c.get("/v1/datasets/images").status_code == 200


def test_rate_limits_are_per_key(felis_env, monkeypatch):
    monkeypatch.setenv("FELIS_RATE_LIMIT_UPLOAD_PER_MINUTE", "6")  # a burst of 1
    from service.config import get_settings
    from service.store.db import session_scope

    get_settings.cache_clear()
    with session_scope() as s:
        one, two = keys.create(s, ["write"])[1], keys.create(s, ["write"])[1]
    with _app_client() as c:
        c.post("/v1/datasets", json={"name": "pets"})
        upload = lambda key: c.post("/v1/datasets/pets/images", data={"label": "cat"},  # noqa: E731
                                    headers={"Authorization": f"Bearer {key}"}).status_code
        assert [upload(one), upload(one), upload(two)] == [422, 429, 422]


def _proxied():
    """TestClient(app, client=(peer, port)) for one app: callers at different addresses."""
    from service.config import get_settings

    get_settings.cache_clear()
    from service.api.app import create_app

    app = create_app()
    return lambda peer: TestClient(app, base_url=BASE, client=(peer, 40000))


def test_client_addresses_come_from_x_forwarded_for_of_trusted_proxies_only(felis_env, monkeypatch):
    monkeypatch.setenv("FELIS_RATE_LIMIT_UPLOAD_PER_MINUTE", "6")  # a burst of 1
    monkeypatch.setenv("FELIS_TRUSTED_PROXIES", '["10.0.0.0/8"]')
    client = _proxied()
    with client("10.1.2.3") as ingress, client("198.51.100.9") as direct:
        ingress.post("/v1/datasets", json={"name": "pets"})

        def upload(c: TestClient, forwarded: str | None) -> int:
            headers = {"X-Forwarded-For": forwarded} if forwarded else {}
            return c.post("/v1/datasets/pets/images", data={"label": "cat"}, headers=headers).status_code

        # behind the ingress, each client has its own bucket: one attacker does not lock out the rest
        assert [upload(ingress, "203.0.113.1"), upload(ingress, "203.0.113.1")] == [422, 429]
        assert upload(ingress, "203.0.113.2") == 422
        # what a client writes into the header itself stays left of what the proxy appended
        assert upload(ingress, "192.0.2.77, 203.0.113.1") == 429
        assert upload(ingress, "203.0.113.3, 10.9.9.9") == 422  # a chain of trusted proxies
        # from a peer that is no trusted proxy the header is ignored
        assert [upload(direct, "192.0.2.1"), upload(direct, "192.0.2.2")] == [422, 429]


def test_failed_key_attempts_are_limited_per_client_address(felis_env, monkeypatch):
    from service.api import auth
    from service.store.db import session_scope

    with session_scope() as s:
        good = {"Authorization": f"Bearer {keys.create(s, ['predict'])[1]}"}
    client = _proxied()
    with client("198.51.100.1") as attacker, client("198.51.100.2") as other:
        bad = [attacker.get("/v1/datasets", headers={"Authorization": f"Bearer felis_{i:08x}_guess"})
               for i in range(20)]
        burst = getattr(auth, "FAILED_KEYS_BURST", 10)
        assert [_code(r) for r in bad[:burst]] == [(401, "invalid_api_key")] * burst
        assert _code(bad[-1]) == (429, "rate_limited") and int(bad[-1].headers["Retry-After"]) >= 1
        assert _code(attacker.get("/v1/datasets", headers=good)) == (429, "rate_limited")  # even a good key waits
        assert other.get("/v1/datasets", headers=good).status_code == 200  # others are not locked out
        assert attacker.get("/v1/datasets").status_code == 200  # no key, keys optional: not a key attempt


def test_token_bucket_refills():
    limiter = RateLimiter(per_minute=600, burst=2)
    limiter.take("a")
    limiter.check("a")  # checking spends nothing
    limiter.take("a")
    with pytest.raises(RateLimited) as e:
        limiter.check("a")
    assert 0 < e.value.retry_after <= 0.11
    limiter.take("b")  # callers are independent
