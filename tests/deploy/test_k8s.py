"""k8s/: each overlay renders (real kustomize, inside kubectl) to objects that validate
against the Kubernetes API schemas, reference each other correctly, and run felis right."""

from __future__ import annotations

import copy
import json

import kubernetes_validate
import pytest

OVERLAYS = ("gpu", "cpu")
# Oldest Kubernetes we promise (docs/deploying.md) and the newest schemas we have.
KUBE_VERSIONS = ("1.31.0", kubernetes_validate.latest_version())
WORKLOADS = ("Deployment", "StatefulSet", "Job")


def find(objects: list[dict], kind: str, name: str) -> dict:
    matches = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(matches) == 1, f"expected one {kind}/{name}, found {len(matches)}"
    return matches[0]


def of_kind(objects: list[dict], kind: str) -> list[dict]:
    return [o for o in objects if o["kind"] == kind]


def container(workload: dict, name: str) -> dict:
    return next(c for c in workload["spec"]["template"]["spec"]["containers"] if c["name"] == name)


def all_containers(pod_spec: dict) -> list[dict]:
    """The init containers and the containers of a pod."""
    return pod_spec.get("initContainers", []) + pod_spec["containers"]


def env_of(objects: list[dict], workload: dict, name: str) -> dict[str, str]:
    """The environment a container sees: envFrom ConfigMaps/Secrets, then env literals."""
    c = container(workload, name)
    env: dict[str, str] = {}
    for source in c.get("envFrom", []):
        if "configMapRef" in source:
            env |= find(objects, "ConfigMap", source["configMapRef"]["name"])["data"]
        if "secretRef" in source:
            env |= find(objects, "Secret", source["secretRef"]["name"]).get("stringData", {})
    for var in c.get("env", []):
        env[var["name"]] = var.get("value", "<from>")
    return env


def selects(selector: dict, labels: dict) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


# --- renders and validates ----------------------------------------------------------


@pytest.mark.parametrize("version", KUBE_VERSIONS)
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_object_validates(rendered, overlay, version):
    errors = []
    for obj in rendered[overlay]:
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            errors.append(f"{obj['kind']}/{obj['metadata']['name']}: {'.'.join(map(str, e.path))}: {e.message}")
    assert not errors, "\n".join(errors)


def test_validation_is_live(rendered):
    """The schema check can fail: a misspelt field in a container is rejected."""
    api = copy.deepcopy(find(rendered["gpu"], "Deployment", "felis-api"))
    container(api, "api")["readinessProbe"]["httpGett"] = {"path": "/readyz", "port": "http"}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(api, KUBE_VERSIONS[0], strict=True)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_overlay_has_every_piece(rendered, overlay):
    objects = rendered[overlay]
    kinds = {(o["kind"], o["metadata"]["name"]) for o in objects}
    for expected in [
        ("Namespace", "felis"), ("Secret", "felis-secrets"), ("PersistentVolumeClaim", "felis-data"),
        ("Deployment", "felis-api"), ("Service", "felis-api"), ("HorizontalPodAutoscaler", "felis-api"),
        ("PodDisruptionBudget", "felis-api"), ("Ingress", "felis-api"), ("Deployment", "felis-worker"),
        ("StatefulSet", "redis"), ("Service", "redis"), ("StatefulSet", "postgres"), ("Service", "postgres"),
        ("Job", "felis-migrate"),
    ]:
        assert expected in kinds, f"{overlay} renders no {expected}"
    assert len([o for o in of_kind(objects, "ConfigMap") if o["metadata"]["name"].startswith("felis-config-")]) == 1
    for obj in objects:
        if obj["kind"] != "Namespace":
            assert obj["metadata"].get("namespace") == "felis", f"{obj['kind']}/{obj['metadata']['name']}"
        assert obj["metadata"]["labels"]["app.kubernetes.io/part-of"] == "felis"


# --- wiring: every reference points at something that exists -------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_references_resolve(rendered, overlay):
    objects = rendered[overlay]
    names = {(o["kind"], o["metadata"]["name"]) for o in objects}
    pods = {o["metadata"]["name"]: o["spec"]["template"] for o in objects if o["kind"] in WORKLOADS}
    for workload, pod in pods.items():
        spec = pod["spec"]
        for c in all_containers(spec):
            for source in c.get("envFrom", []):
                ref = source.get("configMapRef") or source.get("secretRef")
                kind = "ConfigMap" if "configMapRef" in source else "Secret"
                assert (kind, ref["name"]) in names, f"{workload}: {kind}/{ref['name']}"
            for var in c.get("env", []):
                key_ref = var.get("valueFrom", {}).get("secretKeyRef")
                if key_ref:
                    secret = find(objects, "Secret", key_ref["name"])
                    assert key_ref["key"] in secret["stringData"], f"{workload}: {key_ref}"
            ports = {p.get("name") for p in c.get("ports", [])} | {p["containerPort"] for p in c.get("ports", [])}
            for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
                action = c.get(probe, {}).get("httpGet") or c.get(probe, {}).get("tcpSocket")
                if action:
                    assert action["port"] in ports, f"{workload}: {probe} on undeclared port {action['port']}"
            mounts = {m["name"] for m in c.get("volumeMounts", [])}
            declared = {v["name"] for v in spec.get("volumes", [])}
            declared |= {t["metadata"]["name"] for t in find(objects, *_kind_name(objects, workload))["spec"].get(
                "volumeClaimTemplates", [])}
            assert mounts <= declared, f"{workload}: mounts {mounts - declared} not declared"
        for volume in spec.get("volumes", []):
            if "persistentVolumeClaim" in volume:
                claim = volume["persistentVolumeClaim"]["claimName"]
                assert ("PersistentVolumeClaim", claim) in names, f"{workload}: PVC {claim}"
    for svc in of_kind(objects, "Service"):
        targets = [p for p in pods.values() if selects(svc["spec"]["selector"], p["metadata"]["labels"])]
        assert len(targets) == 1, f"Service {svc['metadata']['name']} selects {len(targets)} workloads"
        port_names = {p.get("name") for c in targets[0]["spec"]["containers"] for p in c.get("ports", [])}
        for port in svc["spec"]["ports"]:
            assert port["targetPort"] in port_names, f"Service {svc['metadata']['name']}: {port['targetPort']}"
    for sts in of_kind(objects, "StatefulSet"):
        assert ("Service", sts["spec"]["serviceName"]) in names
    for obj in of_kind(objects, "Deployment") + of_kind(objects, "StatefulSet"):
        assert selects(obj["spec"]["selector"]["matchLabels"], obj["spec"]["template"]["metadata"]["labels"])
    pdb = find(objects, "PodDisruptionBudget", "felis-api")
    assert selects(pdb["spec"]["selector"]["matchLabels"], pods["felis-api"]["metadata"]["labels"])
    hpa = find(objects, "HorizontalPodAutoscaler", "felis-api")
    assert (hpa["spec"]["scaleTargetRef"]["kind"], hpa["spec"]["scaleTargetRef"]["name"]) in names
    for rule in find(objects, "Ingress", "felis-api")["spec"]["rules"]:
        for path in rule["http"]["paths"]:
            backend = path["backend"]["service"]
            svc = find(objects, "Service", backend["name"])
            assert backend["port"]["name"] in {p["name"] for p in svc["spec"]["ports"]}


def _kind_name(objects: list[dict], name: str) -> tuple[str, str]:
    kind = next(o["kind"] for o in objects if o["kind"] in WORKLOADS and o["metadata"]["name"] == name)
    return kind, name


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_urls_point_at_the_in_cluster_services(rendered, overlay):
    objects = rendered[overlay]
    env = env_of(objects, find(objects, "Deployment", "felis-api"), "api")
    redis, postgres = find(objects, "Service", "redis"), find(objects, "Service", "postgres")
    assert env["FELIS_BROKER_URL"] == f"redis://redis:{redis['spec']['ports'][0]['port']}/0"
    assert f"@postgres:{postgres['spec']['ports'][0]['port']}/" in env["FELIS_DATABASE_URL"]
    secret = find(objects, "Secret", "felis-secrets")["stringData"]
    assert f":{secret['POSTGRES_PASSWORD']}@" in secret["FELIS_DATABASE_URL"], "password mismatch"


# --- the API ---------------------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_api_probes_and_resources(rendered, overlay):
    objects = rendered[overlay]
    api = find(objects, "Deployment", "felis-api")
    c = container(api, "api")
    assert c["args"] == ["felis", "api"]
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert c["startupProbe"]["httpGet"]["path"] == "/healthz"
    env = env_of(objects, api, "api")
    assert env["FELIS_HOST"] == "0.0.0.0"
    port = next(p for p in c["ports"] if p["name"] == "http")
    assert port["containerPort"] == int(env["FELIS_PORT"])
    assert "FELIS_DEVICE" not in env, "the API has no GPU: FELIS_DEVICE belongs to workers"
    hpa = find(objects, "HorizontalPodAutoscaler", "felis-api")["spec"]
    pdb = find(objects, "PodDisruptionBudget", "felis-api")["spec"]
    assert 1 <= pdb["minAvailable"] < hpa["minReplicas"] <= hpa["maxReplicas"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_console_behind_the_ingress_may_change_state(rendered, overlay):
    """TLS ends at the ingress, so the API sees http:// while the console's Origin is https://<host>:
    every ingress host must be an allowed origin, or the console's uploads answer 403."""
    from service.api.guards import normalize_origin
    from service.config import Settings

    objects = rendered[overlay]
    env = env_of(objects, find(objects, "Deployment", "felis-api"), "api")
    allowed = {normalize_origin(o) for o in Settings.model_validate({"allowed_origins": env["FELIS_ALLOWED_ORIGINS"]}).allowed_origins}
    ingress = find(objects, "Ingress", "felis-api")["spec"]
    tls_hosts = {h for t in ingress.get("tls", []) for h in t["hosts"]}
    for rule in ingress["rules"]:
        scheme = "https" if rule["host"] in tls_hosts else "http"
        assert f"{scheme}://{rule['host']}" in allowed, f"FELIS_ALLOWED_ORIGINS lacks {scheme}://{rule['host']}"


def test_ingress_accepts_large_uploads(rendered):
    ingress = find(rendered["gpu"], "Ingress", "felis-api")
    annotations = ingress["metadata"]["annotations"]
    assert annotations["nginx.ingress.kubernetes.io/proxy-body-size"] == "1g"
    assert ingress["spec"]["ingressClassName"] == "nginx"


# --- workers: the GPU overlay asks for one GPU per pod, the CPU overlay for none ------------


def test_gpu_overlay_gives_each_worker_one_gpu(rendered):
    objects = rendered["gpu"]
    worker = find(objects, "Deployment", "felis-worker")
    spec = worker["spec"]["template"]["spec"]
    c = container(worker, "worker")
    assert c["args"] == ["felis", "worker", "--queues", "gpu", "--concurrency", "1"]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert env_of(objects, worker, "worker")["FELIS_DEVICE"] == "cuda"
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]
    assert spec["nodeSelector"]
    assert c["image"].rsplit(":", 1)[0].endswith("/felis-worker")
    # a surge pod would wait forever for a GPU that is taken by the pod it replaces
    assert worker["spec"]["strategy"]["rollingUpdate"]["maxSurge"] == 0
    gpu_users = [o["metadata"]["name"] for o in objects if "nvidia.com/gpu" in json.dumps(o.get("spec", {}))
                 and o["kind"] in WORKLOADS]
    assert gpu_users == ["felis-worker"]


def test_cpu_overlay_asks_for_no_gpu(rendered):
    objects = rendered["cpu"]
    assert "nvidia.com/gpu" not in json.dumps(objects)
    worker = find(objects, "Deployment", "felis-worker")
    spec = worker["spec"]["template"]["spec"]
    assert "tolerations" not in spec and "nodeSelector" not in spec
    assert env_of(objects, worker, "worker")["FELIS_DEVICE"] == "cpu"
    api_image = container(find(objects, "Deployment", "felis-api"), "api")["image"]
    assert container(worker, "worker")["image"] == api_image, "CPU workers run the CPU-only API image"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_workers_drain_and_share_blobs_with_the_api(rendered, overlay):
    objects = rendered[overlay]
    api, worker = find(objects, "Deployment", "felis-api"), find(objects, "Deployment", "felis-worker")
    env = env_of(objects, api, "api")
    assert env_of(objects, worker, "worker")["FELIS_DATA_DIR"] == env["FELIS_DATA_DIR"]
    assert env["FELIS_STORAGE_PATH"].startswith(env["FELIS_DATA_DIR"] + "/")
    for workload, name in ((api, "api"), (worker, "worker")):
        mount = next(m for m in container(workload, name)["volumeMounts"] if m["mountPath"] == env["FELIS_DATA_DIR"])
        volume = next(v for v in workload["spec"]["template"]["spec"]["volumes"] if v["name"] == mount["name"])
        assert volume["persistentVolumeClaim"]["claimName"] == "felis-data"
    assert find(objects, "PersistentVolumeClaim", "felis-data")["spec"]["accessModes"] == ["ReadWriteMany"]
    grace = worker["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace > int(env["FELIS_TRAINING_TIME_LIMIT"]), "a rollout would kill the longest training"
    assert "livenessProbe" not in container(worker, "worker")


# --- schema migrations: a Job runs `felis migrate`, the API and workers wait for it ---------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_a_job_migrates_the_schema_before_the_api_and_workers_start(rendered, overlay):
    objects = rendered[overlay]
    job = find(objects, "Job", "felis-migrate")
    api = find(objects, "Deployment", "felis-api")
    c = container(job, "migrate")
    assert c["args"] == ["felis", "migrate"]
    assert c["image"] == container(api, "api")["image"], "migrate runs the API image of the same release"
    env, api_env = env_of(objects, job, "migrate"), env_of(objects, api, "api")
    assert env["FELIS_MODE"] == "production"
    assert env["FELIS_DATABASE_URL"] == api_env["FELIS_DATABASE_URL"]
    spec = job["spec"]
    assert spec["template"]["spec"]["restartPolicy"] in ("Never", "OnFailure")
    assert spec["backoffLimit"] >= 1, "retry while PostgreSQL is still starting"
    # a finished Job goes away, so the next release's Job (a new pod template) can be applied
    assert 0 < spec["ttlSecondsAfterFinished"] <= 3600
    # in production the API and workers never migrate: they wait until the schema is this release's
    for workload, name in ((api, "api"), (find(objects, "Deployment", "felis-worker"), "worker")):
        pod = workload["spec"]["template"]["spec"]
        (wait,) = pod["initContainers"]
        assert "felis migrate --check" in " ".join(wait.get("command", []) + wait.get("args", []))
        assert wait["image"] == container(workload, name)["image"], "no second image to pull"
        assert wait["envFrom"] == container(workload, name)["envFrom"]
    # and PostgreSQL lets the Job in
    policy = find(objects, "NetworkPolicy", "postgres")
    (rule,) = policy["spec"]["ingress"]
    allowed = {v for source in rule["from"] for expr in source["podSelector"]["matchExpressions"]
               for v in expr["values"]}
    assert job["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"] in allowed


# --- Redis and PostgreSQL ---------------------------------------------------------------


def test_redis_is_append_only_on_a_persistent_volume(rendered):
    redis = find(rendered["gpu"], "StatefulSet", "redis")
    args = container(redis, "redis")["args"]
    assert args[args.index("--appendonly") + 1] == "yes"
    assert args[args.index("--maxmemory-policy") + 1] == "noeviction"
    mount = next(m for m in container(redis, "redis")["volumeMounts"] if m["mountPath"] == "/data")
    assert mount["name"] in {t["metadata"]["name"] for t in redis["spec"]["volumeClaimTemplates"]}


def test_postgres_keeps_its_data(rendered):
    pg = find(rendered["gpu"], "StatefulSet", "postgres")
    c = container(pg, "postgres")
    env = {v["name"]: v.get("value") for v in c["env"]}
    assert env["PGDATA"].startswith(c["volumeMounts"][0]["mountPath"] + "/")
    assert c["volumeMounts"][0]["name"] in {t["metadata"]["name"] for t in pg["spec"]["volumeClaimTemplates"]}
    assert c["readinessProbe"]["exec"]["command"][0] == "pg_isready"


def test_the_example_secret_is_an_obvious_placeholder(rendered):
    secret = find(rendered["gpu"], "Secret", "felis-secrets")
    assert secret["metadata"]["annotations"]["felis.example/placeholder"] == "true"
    assert "CHANGE-ME" in secret["stringData"]["POSTGRES_PASSWORD"]


# --- every pod: sized, and allowed by Pod Security "restricted" -------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pods_are_sized_and_restricted(rendered, overlay):
    objects = rendered[overlay]
    namespace = find(objects, "Namespace", "felis")
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    for workload in [o for o in objects if o["kind"] in WORKLOADS]:
        name = workload["metadata"]["name"]
        spec = workload["spec"]["template"]["spec"]
        pod_sc = spec.get("securityContext", {})
        assert pod_sc.get("runAsNonRoot") is True and pod_sc.get("runAsUser", 0) > 0, name
        assert pod_sc.get("seccompProfile", {}).get("type") == "RuntimeDefault", name
        assert not any(k in spec for k in ("hostNetwork", "hostPID", "hostIPC")), name
        for volume in spec.get("volumes", []):
            assert set(volume) - {"name"} <= {"persistentVolumeClaim", "emptyDir", "configMap", "secret"}, name
        for c in all_containers(spec):
            sc = c.get("securityContext", {})
            assert sc.get("allowPrivilegeEscalation") is False, f"{name}/{c['name']}"
            assert sc.get("capabilities", {}).get("drop") == ["ALL"], f"{name}/{c['name']}"
            assert not sc.get("privileged"), f"{name}/{c['name']}"
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(c["resources"][kind]), f"{name}/{c['name']} {kind}"
            assert ":" in c["image"] and not c["image"].endswith(":latest"), f"{name}/{c['name']}: {c['image']}"
