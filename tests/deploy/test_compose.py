"""docker-compose.yml and its CPU override: they resolve, and the stack is wired right.

`docker compose config` (the real Compose v2 loader, no engine needed) validates each file
against the Compose specification's JSON schema, merges the override, interpolates ${...}
and fails on unknown services in depends_on; these tests then check what it resolved.
"""

from __future__ import annotations

import pytest

WORKER_COMMAND = ["felis", "worker", "--queues", "gpu", "--concurrency", "1"]
VARIANTS = ("gpu", "cpu")
ONE_SHOT = {"migrate"}  # run to completion before the services that need them


def _services(compose, variant):
    return compose[variant]["services"]


def test_the_stack_has_every_service(compose):
    for variant in VARIANTS:
        assert set(_services(compose, variant)) == {"migrate", "api", "worker", "redis", "postgres", "flower"}


def test_a_schema_violation_is_caught(compose_config, tmp_path):
    """The check is live: an unknown key in a service makes `config` fail."""
    broken = tmp_path / "broken.yml"
    broken.write_text("services:\n  api:\n    image: x\n    gpus_please: 1\n")
    proc = compose_config([broken], tmp_path)
    assert proc.returncode != 0
    assert "gpus_please" in proc.stderr


@pytest.mark.parametrize("variant", VARIANTS)
def test_references_resolve(compose, variant, root):
    model = compose[variant]
    services, volumes = model["services"], set(model.get("volumes", {}))
    for name, svc in services.items():
        for dep in svc.get("depends_on", {}):
            assert dep in services, f"{name} depends on unknown service {dep}"
        for mount in svc.get("volumes", []):
            if mount["type"] == "volume":
                assert mount["source"] in volumes, f"{name} mounts undeclared volume {mount['source']}"
            else:
                pytest.fail(f"{name}: bind mount {mount['source']} (use named volumes)")
        if "build" in svc:
            assert (root / svc["build"]["dockerfile"]).is_file(), f"{name}: missing Dockerfile"
    mounted = {m["source"] for s in services.values() for m in s.get("volumes", [])}
    assert volumes == mounted, f"declared but unused volumes: {volumes - mounted}"


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_service_has_a_healthcheck_and_waits_for_healthy_dependencies(compose, variant):
    services = _services(compose, variant)
    for name, svc in services.items():
        if name in ONE_SHOT:
            assert svc.get("restart") == "no", f"{name} runs once; a restart loop would hide its failure"
        else:
            assert svc.get("healthcheck", {}).get("test"), f"{name} has no healthcheck"
            assert svc.get("restart") == "unless-stopped", name
        for dep, spec in svc.get("depends_on", {}).items():
            expected = "service_completed_successfully" if dep in ONE_SHOT else "service_healthy"
            assert spec["condition"] == expected, f"{name} -> {dep}"
    assert {"postgres", "redis"} <= set(services["api"]["depends_on"])
    assert {"postgres", "redis"} <= set(services["worker"]["depends_on"])


@pytest.mark.parametrize("variant", VARIANTS)
def test_migrate_runs_once_before_the_api_and_the_workers(compose, variant):
    """Production never migrates implicitly: the one-shot `felis migrate` does, on the API image and
    the same database, and the API and workers start only once it has exited 0."""
    services = _services(compose, variant)
    migrate = services["migrate"]
    assert migrate["command"] == ["felis", "migrate"]
    assert migrate["image"] == services["api"]["image"]
    assert migrate["build"]["dockerfile"] == services["api"]["build"]["dockerfile"]
    assert {dep: spec["condition"] for dep, spec in migrate["depends_on"].items()} == {"postgres": "service_healthy"}
    api = services["api"]["environment"]
    for key in ("FELIS_MODE", "FELIS_DATABASE_URL", "FELIS_LOG_JSON"):
        assert migrate["environment"][key] == api[key], key
    for name in ("api", "worker"):
        assert services[name]["depends_on"]["migrate"]["condition"] == "service_completed_successfully", name
    assert "ports" not in migrate and "healthcheck" not in migrate


def test_api_listens_on_all_interfaces_and_checks_healthz(compose):
    api = _services(compose, "gpu")["api"]
    assert api["command"] == ["felis", "api"]
    env = api["environment"]
    assert env["FELIS_HOST"] == "0.0.0.0"
    assert any(p["target"] == int(env["FELIS_PORT"]) for p in api["ports"])
    assert any("/healthz" in part for part in api["healthcheck"]["test"])
    assert "FELIS_DEVICE" not in env, "the API has no GPU: FELIS_DEVICE belongs to workers"


def test_keys_cannot_be_turned_off_from_the_shell(root):
    """The API listens on every interface: FELIS_API_KEYS_REQUIRED is written down, not ${...}."""
    import yaml

    shared = yaml.safe_load((root / "docker-compose.yml").read_text())["x-felis-env"]
    assert shared["FELIS_MODE"] == "production"
    assert shared["FELIS_API_KEYS_REQUIRED"] == "true"


def test_gpu_worker_reserves_one_nvidia_gpu(compose):
    worker = _services(compose, "gpu")["worker"]
    assert worker["command"] == WORKER_COMMAND
    assert worker["environment"]["FELIS_DEVICE"] == "cuda"
    assert worker["build"]["dockerfile"] == "docker/worker.Dockerfile"
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]


def test_cpu_override_drops_the_gpu_and_trains_on_cpu(compose):
    services = _services(compose, "cpu")
    worker = services["worker"]
    assert worker["command"] == WORKER_COMMAND
    assert worker["environment"]["FELIS_DEVICE"] == "cpu"
    assert not worker.get("deploy", {}).get("resources"), "GPU reservation left in the CPU stack"
    for name, svc in services.items():
        assert "devices" not in str(svc.get("deploy", {})), name
    # The CPU worker runs the slim API image: no CUDA download for CPU-only hosts.
    assert worker["image"] == services["api"]["image"]
    assert worker["build"]["dockerfile"] == services["api"]["build"]["dockerfile"]


@pytest.mark.parametrize("variant", VARIANTS)
def test_api_and_worker_share_state(compose, variant):
    services = _services(compose, variant)
    api, worker = services["api"]["environment"], services["worker"]["environment"]
    for key in ("FELIS_MODE", "FELIS_DATABASE_URL", "FELIS_BROKER_URL", "FELIS_DATA_DIR",
                "FELIS_STORAGE_BACKEND", "FELIS_STORAGE_PATH", "FELIS_TRAINING_TIME_LIMIT"):
        assert api[key] == worker[key], key
    assert api["FELIS_MODE"] == "production"
    assert api["FELIS_STORAGE_PATH"].startswith(api["FELIS_DATA_DIR"] + "/")
    mounts = {name: {(m["source"], m["target"]) for m in services[name]["volumes"]} for name in ("api", "worker")}
    assert (("felis-data", api["FELIS_DATA_DIR"])) in mounts["api"] & mounts["worker"]
    # Host names in the URLs are the Compose services.
    assert "@postgres:5432/" in api["FELIS_DATABASE_URL"]
    assert api["FELIS_DATABASE_URL"].startswith("postgresql+psycopg://")
    assert api["FELIS_BROKER_URL"] == "redis://redis:6379/0"


def test_worker_stops_gracefully_after_the_longest_training(compose):
    worker = _services(compose, "gpu")["worker"]
    limit_s = int(worker["environment"]["FELIS_TRAINING_TIME_LIMIT"])
    grace = worker["stop_grace_period"]  # e.g. "1h6m0s"
    hours, _, rest = grace.partition("h")
    minutes, _, seconds = rest.partition("m")
    grace_s = int(hours or 0) * 3600 + int(minutes or 0) * 60 + int(seconds.rstrip("s") or 0)
    assert grace_s > limit_s
    assert int(worker["shm_size"]) >= 1 << 30  # DataLoader workers need more than 64 MB


def test_redis_is_append_only_on_a_volume(compose):
    redis = _services(compose, "gpu")["redis"]
    cmd = redis["command"]
    assert cmd[cmd.index("--appendonly") + 1] == "yes"
    assert cmd[cmd.index("--maxmemory-policy") + 1] == "noeviction"
    assert any(m["type"] == "volume" and m["target"] == "/data" for m in redis["volumes"])


def test_postgres_has_a_volume_and_pg_isready(compose):
    pg = _services(compose, "gpu")["postgres"]
    assert pg["healthcheck"]["test"][:2] == ["CMD", "pg_isready"]
    assert any(m["target"] == "/var/lib/postgresql/data" for m in pg["volumes"])
    url = _services(compose, "gpu")["api"]["environment"]["FELIS_DATABASE_URL"]
    env = pg["environment"]
    assert url.endswith(f"//{env['POSTGRES_USER']}:{env['POSTGRES_PASSWORD']}@postgres:5432/{env['POSTGRES_DB']}")


def test_flower_watches_the_same_broker_and_is_not_public(compose):
    services = _services(compose, "gpu")
    flower = services["flower"]
    assert f"--broker={services['api']['environment']['FELIS_BROKER_URL']}" in flower["command"]
    assert all(p.get("host_ip") == "127.0.0.1" for p in flower["ports"])
