"""Bounded memory and time (issue 14): thread pools sized from the cgroup CPU quota, a per-process
cap on upload/predict requests and on event streams (503 + Retry-After past it), and event streams
that cost the database one look per training, not one per stream."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from tests.conftest import asset_images
from tests.utils import processes
from tests.utils.processes import ROOT, start_felis
from tests.utils.rows import training_row, update_training

# --- cpu_budget --------------------------------------------------------------------------------------


def _tree(tmp_path: Path, proc_cgroup: str, files: dict[str, str]) -> tuple[Path, Path]:
    root = tmp_path / "cgroup"
    root.mkdir(parents=True)
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    proc = tmp_path / "proc-self-cgroup"
    proc.write_text(proc_cgroup)
    return root, proc


def test_cgroup_v2_quota(tmp_path):
    from service.limits import cgroup_cpu_limit

    root, proc = _tree(tmp_path, "0::/\n", {"cpu.max": "200000 100000\n"})
    assert cgroup_cpu_limit(root, proc) == 2.0
    root2, proc2 = _tree(tmp_path / "b", "0::/\n", {"cpu.max": "max 100000\n"})
    assert cgroup_cpu_limit(root2, proc2) is None


def test_cgroup_v2_quota_of_a_parent_applies(tmp_path):
    """No cgroup namespace: the process sits deep in the host's tree, its pod's limit above it."""
    from service.limits import cgroup_cpu_limit

    root, proc = _tree(tmp_path, "0::/kubepods/pod1/ctr\n", {
        "cpu.max": "max 100000", "kubepods/cpu.max": "max 100000",
        "kubepods/pod1/cpu.max": "150000 100000", "kubepods/pod1/ctr/cpu.max": "max 100000"})
    assert cgroup_cpu_limit(root, proc) == 1.5


def test_cgroup_v1_quota(tmp_path):
    from service.limits import cgroup_cpu_limit

    root, proc = _tree(tmp_path, "4:memory:/x\n2:cpu,cpuacct:/docker/abc\n", {
        "cpu,cpuacct/docker/abc/cpu.cfs_quota_us": "50000", "cpu,cpuacct/docker/abc/cpu.cfs_period_us": "100000",
        "cpu,cpuacct/cpu.cfs_quota_us": "-1", "cpu,cpuacct/cpu.cfs_period_us": "100000"})
    assert cgroup_cpu_limit(root, proc) == 0.5
    root2, proc2 = _tree(tmp_path / "b", "1:cpu:/\n", {"cpu/cpu.cfs_quota_us": "-1", "cpu/cpu.cfs_period_us": "100000"})
    assert cgroup_cpu_limit(root2, proc2) is None


def test_cpu_budget_takes_the_quota_over_the_nodes_cores(tmp_path, monkeypatch):
    """A 2-CPU pod on a 64-core node: 2 threads, not 64; FELIS_TORCH_THREADS wins over both."""
    import os

    from service.limits import cpu_budget

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)))
    root, proc = _tree(tmp_path, "0::/\n", {"cpu.max": "200000 100000"})
    assert cpu_budget(0, root=root, proc_cgroup=proc) == 2
    root2, proc2 = _tree(tmp_path / "b", "0::/\n", {"cpu.max": "150000 100000"})
    assert cpu_budget(0, root=root2, proc_cgroup=proc2) == 2  # 1.5 CPUs: two threads keep it busy
    root3, proc3 = _tree(tmp_path / "c", "0::/\n", {"cpu.max": "max 100000"})
    assert cpu_budget(0, root=root3, proc_cgroup=proc3) == 64
    assert cpu_budget(3, root=root, proc_cgroup=proc) == 3
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0})
    assert cpu_budget(0, root=root, proc_cgroup=proc) == 1  # the quota never adds cores


# --- memory_budget (the worker memory training options are refused against) -----------------------

MEMINFO = "MemTotal:       16318480 kB\nMemFree:         1203456 kB\n"  # 15.6 GiB


def _memory(tmp_path: Path, proc_cgroup: str, files: dict[str, str], meminfo: str | None = MEMINFO) -> int:
    from service.limits import memory_budget

    root, proc = _tree(tmp_path, proc_cgroup, files)
    info = tmp_path / "meminfo"
    if meminfo is not None:
        info.write_text(meminfo)
    return memory_budget(root=root, proc_cgroup=proc, meminfo=info)


def test_memory_budget_is_the_cgroup_v2_limit_of_the_process_or_above_it(tmp_path):
    """A pod's limit sits above its container's cgroup when there is no cgroup namespace."""
    assert _memory(tmp_path / "a", "0::/\n", {"memory.max": "6442450944\n"}) == 6 * (1 << 30)
    assert _memory(tmp_path / "b", "0::/kubepods/pod1/ctr\n", {
        "memory.max": "max", "kubepods/memory.max": "max",
        "kubepods/pod1/memory.max": "4294967296", "kubepods/pod1/ctr/memory.max": "max\n"}) == 4 << 30


def test_memory_budget_reads_cgroup_v1(tmp_path):
    assert _memory(tmp_path / "a", "4:memory:/docker/abc\n2:cpu,cpuacct:/docker/abc\n", {
        "memory/docker/abc/memory.limit_in_bytes": "2147483648",
        "memory/memory.limit_in_bytes": "9223372036854771712"}) == 2 << 30  # the root's: no limit
    assert _memory(tmp_path / "b", "4:memory:/\n", {"memory/memory.limit_in_bytes": "9223372036854771712"}) \
        == 16318480 * 1024


def test_memory_budget_without_a_limit_is_the_machines_memory(tmp_path):
    assert _memory(tmp_path / "a", "0::/\n", {"memory.max": "max\n"}) == 16318480 * 1024
    assert _memory(tmp_path / "b", "0::/\n", {"memory.max": "68719476736"}) == 16318480 * 1024  # never above it
    assert _memory(tmp_path / "c", "", {}, meminfo=None) > 0  # no /proc files at all: what the OS says


def test_the_predict_decode_pool_follows_the_budget(tmp_path):
    """FELIS_TORCH_THREADS (as k8s sets it, = the CPU limit) sizes the decode pool."""
    code = ("from service.serving import predictions; from service.limits import cpu_budget; "
            "print(predictions._DECODE_POOL._max_workers, cpu_budget())")
    for threads in ("1", "3"):
        out = subprocess.run([sys.executable, "-c", code], check=False, cwd=ROOT, capture_output=True, text=True, timeout=120,
                             env=processes.felis_env(FELIS_DATA_DIR=str(tmp_path / "var"), FELIS_TORCH_THREADS=threads))
        assert out.returncode == 0, out.stderr
        assert out.stdout.split() == [threads, threads]


# --- in-flight caps: the middleware alone ------------------------------------------------------------


def _capped_app(release: asyncio.Event):
    """An app whose routes declare their caps, one of them at a path the felis API does not have:
    which requests count comes from the declarations, not from the URL."""
    from fastapi import FastAPI

    from service.api.middleware import Capped, InFlight, InflightLimitMiddleware

    app = FastAPI()

    async def held() -> dict:
        await release.wait()
        return {}

    app.add_api_route("/v1/datasets/{name}/predict", held, methods=["POST"], dependencies=[InFlight(Capped.REQUESTS)])
    app.add_api_route("/elsewhere/{x}/body", held, methods=["PUT"], dependencies=[InFlight(Capped.REQUESTS)])
    app.add_api_route("/v1/trainings/{training_id}/events", held, methods=["GET"],
                      dependencies=[InFlight(Capped.STREAMS)])
    app.add_api_route("/v1/datasets/{name}/images", held, methods=["POST"])  # declares no cap
    app.add_middleware(InflightLimitMiddleware, max_requests=2, max_streams=1)
    return app


def test_the_cap_answers_503_with_retry_after_and_frees_slots():
    release = asyncio.Event()
    app = _capped_app(release)

    async def call(method, path):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            r = await c.request(method, path)
            return r.status_code, r.headers

    async def scenario():
        held = [asyncio.create_task(call(m, p)) for m, p in (("POST", "/v1/datasets/a/predict"),
                                                              ("PUT", "/elsewhere/b/body"))]
        await asyncio.sleep(0.2)
        status, headers = await call("POST", "/v1/datasets/a/predict")
        assert status == 503 and headers["retry-after"] == "1"
        assert headers["content-type"] == "application/json"
        stream = asyncio.create_task(call("GET", "/v1/trainings/t/events"))  # a cap of its own
        await asyncio.sleep(0.2)
        status, headers = await call("GET", "/v1/trainings/u/events")
        assert status == 503 and int(headers["retry-after"]) >= 1
        uncapped = asyncio.create_task(call("POST", "/v1/datasets/a/images"))  # no declaration: no cap
        release.set()
        assert [s for s, _ in await asyncio.gather(*held, stream, uncapped)] == [200, 200, 200, 200]
        assert (await call("POST", "/v1/datasets/a/predict"))[0] == 200  # slots are given back

    asyncio.run(scenario())


def test_the_api_declares_its_caps_on_predict_upload_and_event_streams():
    """Every route that decodes images (predict, upload, and their Custom Vision and /v2
    equivalents) takes a request slot; event streams their own."""
    from service.api.app import create_app
    from service.api.middleware import Capped, capped_routes

    declared = {(sorted(route.methods)[0], route.path_format, cap) for route, cap in capped_routes(create_app().routes)}
    cv_predict = "/customvision/{api_version}/prediction/{projectId}/classify/iterations/{publishedName}"
    cv_images = "/customvision/{api_version}/training/projects/{projectId}/images"
    assert declared == {("POST", "/v1/datasets/{name}/images", Capped.REQUESTS),
                        ("POST", "/v1/datasets/{name}/predict", Capped.REQUESTS),
                        ("GET", "/v1/trainings/{training_id}/events", Capped.STREAMS),
                        ("POST", "/v2/models/{name}/infer", Capped.REQUESTS),
                        ("POST", "/v2/models/{name}/versions/{version}/infer", Capped.REQUESTS),
                        *{("POST", f"{cv_predict}/{tail}", Capped.REQUESTS) for tail in ("image", "image/nostore", "url", "url/nostore")},
                        ("POST", cv_images, Capped.REQUESTS), ("POST", f"{cv_images}/files", Capped.REQUESTS)}


def test_only_uploads_predictions_and_two_json_lists_declare_bodies_over_64_kib():
    """A route takes a body over 64 KiB only where it says so (service.api.middleware.BodyLimit):
    FastAPI parses a JSON body before the key check, so an undeclared route must not take one."""
    from service.api.app import create_app
    from service.api.middleware import _declared

    declared = {(sorted(route.methods)[0], route.path_format, n) for route, n in _declared(create_app().routes, "body_limit")}
    cv_predict = "/customvision/{api_version}/prediction/{projectId}/classify/iterations/{publishedName}"
    cv_images = "/customvision/{api_version}/training/projects/{projectId}/images"
    assert declared == {("POST", "/v1/datasets/{name}/images", 0), ("POST", "/v1/datasets/{name}/predict", 0),
                        ("POST", "/v1/datasets/{name}/images/labels", 256 * 1024),
                        ("POST", "/v1/datasets/{name}/images/known", 1024 * 1024),
                        ("POST", "/v2/models/{name}/infer", 0), ("POST", "/v2/models/{name}/versions/{version}/infer", 0),
                        *{("POST", f"{cv_predict}/{tail}", 0) for tail in ("image", "image/nostore", "url", "url/nostore")},
                        ("POST", cv_images, 0), ("POST", f"{cv_images}/files", 0)}


# --- in-flight caps: a real server, real concurrent connections -------------------------------------


def _multipart(url: str, files: list, data: dict | None = None) -> tuple[bytes, str]:
    request = httpx.Request("POST", url, files=files, data=data)
    return request.read(), request.headers["content-type"]


class _Held:
    """A request on its own connection whose body is sent all but its last bytes: the server is
    working on it (it holds a slot) until finish()."""

    def __init__(self, port: int, path: str, body: bytes, content_type: str):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        self.rest = body[-16:]
        head = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: {content_type}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
        self.sock.sendall(head + body[:-16])

    def early(self) -> bytes:
        """Whatever the server answered before the body was complete (for failure messages)."""
        self.sock.setblocking(False)
        try:
            return self.sock.recv(65536)
        except BlockingIOError:
            return b""
        finally:
            self.sock.settimeout(30)

    def finish(self) -> int:
        self.sock.sendall(self.rest)
        data = b""
        while b"\r\n" not in data:
            chunk = self.sock.recv(65536)
            if not chunk:
                break
            data += chunk
        self.sock.close()
        return int(data.split(b" ", 2)[1])


def _open_stream(port: int, training_id: str) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.sendall(f"GET /v1/trainings/{training_id}/events HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode())
    data = b""
    while b"data:" not in data:
        chunk = sock.recv(65536)
        assert chunk, data
        data += chunk
    assert data.startswith(b"HTTP/1.1 200"), data[:200]
    return sock


@pytest.fixture(scope="module")
def capped(tmp_path_factory):
    """`felis api` with room for 2 uploads/predictions and 2 event streams."""
    tmp = tmp_path_factory.mktemp("capped")
    proc, base = start_felis("api", tmp, FELIS_MAX_INFLIGHT_REQUESTS="2", FELIS_MAX_EVENT_STREAMS="2",
                             FELIS_MIN_IMAGES_PER_LABEL="1", FELIS_WORKER_METRICS_PORT="0")
    try:
        yield base, int(base.rsplit(":", 1)[1])
    finally:
        proc.stop()


def test_past_the_cap_requests_get_503_and_the_first_ones_succeed(capped):
    base, port = capped
    name = f"cap{uuid.uuid4().hex[:6]}"
    with httpx.Client(base_url=base, timeout=60) as c:
        assert c.post("/v1/datasets", json={"name": name}).status_code == 201
        cats = asset_images("train", "cat")
        held = []
        for p in cats[:2]:
            body, ctype = _multipart(f"{base}/v1/datasets/{name}/images", [("files", (p.name, p.read_bytes(), "image/jpeg"))],
                                     {"label": "cat"})
            held.append(_Held(port, f"/v1/datasets/{name}/images", body, ctype))
        # let the server read both held requests' headers before anything else comes in (a request
        # that arrived in between would take a slot for the few ms it takes)
        time.sleep(0.5)
        assert c.get("/healthz").status_code == 200
        assert [h.early() for h in held] == [b"", b""]  # both are in, waiting for their last bytes
        r = c.post(f"/v1/datasets/{name}/predict", files=[("files", ("x.jpg", cats[3].read_bytes(), "image/jpeg"))])
        assert r.status_code == 503, r.text
        assert r.json()["error"]["code"] == "server_busy" and int(r.headers["Retry-After"]) >= 1
        r = c.post(f"/v1/datasets/{name}/images", data={"label": "cat"},
                   files=[("files", ("y.jpg", cats[4].read_bytes(), "image/jpeg"))])
        assert r.status_code == 503  # uploads and predictions share the cap
        # the other APIs' clients get the refusal in their own error form
        r = c.post(f"/v2/models/{name}/infer", json={"inputs": []})
        assert r.status_code == 503 and r.json() == {"error": r.json()["error"]}, r.text
        assert r.json()["error"].startswith("server_busy: ") and int(r.headers["Retry-After"]) >= 1
        r = c.post(f"/customvision/v3.1/prediction/{uuid.uuid4()}/classify/iterations/prod/image", content=b"x")
        assert r.status_code == 503 and set(r.json()) == {"code", "message"}, r.text
        assert r.json()["code"] == "TooManyRequests" and int(r.headers["Retry-After"]) >= 1
        assert c.get(f"/v1/datasets/{name}").status_code == 200  # everything else goes on
        assert [h.finish() for h in held] == [201, 201]
        r = c.post(f"/v1/datasets/{name}/images", data={"label": "cat"},
                   files=[("files", ("y.jpg", cats[4].read_bytes(), "image/jpeg"))])
        assert r.status_code == 201, r.text  # the slots are free again
        assert c.get(f"/v1/datasets/{name}").json()["image_count"] == 3


def test_past_the_stream_cap_streams_get_503(capped):
    base, port = capped
    name = f"ev{uuid.uuid4().hex[:6]}"
    with httpx.Client(base_url=base, timeout=60) as c:
        c.post("/v1/datasets", json={"name": name})
        for label, p in (("cat", asset_images("train", "cat")[0]), ("noncat", asset_images("train", "noncat")[0])):
            r = c.post(f"/v1/datasets/{name}/images", data={"label": label}, files=[("files", (p.name, p.read_bytes(), "image/jpeg"))])
            assert r.status_code == 201, r.text
        r = c.post(f"/v1/datasets/{name}/trainings", json={})
        assert r.status_code == 202, r.text
        tid = r.json()["id"]  # no worker: it stays queued, its streams stay open
        streams = [_open_stream(port, tid), _open_stream(port, tid)]
        with c.stream("GET", f"/v1/trainings/{tid}/events") as r:
            assert r.status_code == 503
            assert json.loads(r.read())["error"]["code"] == "too_many_streams"
            assert int(r.headers["Retry-After"]) >= 1
        assert c.get(f"/v1/trainings/{tid}").status_code == 200  # polling the training still works
        streams.pop().close()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:  # the server notices the closed stream within a poll
            with c.stream("GET", f"/v1/trainings/{tid}/events") as s:
                if s.status_code == 200:
                    break
            time.sleep(0.2)
        else:
            pytest.fail("a closed stream's slot was never given back")
        for s in streams:
            s.close()


# --- event streams: one look per training, whatever the number of streams ---------------------------


_training, _update = training_row, update_training


def test_streams_of_one_training_share_one_poll(felis_env, monkeypatch):
    from service.api.app import create_app
    from service.api.routes import events

    monkeypatch.setattr(events, "POLL_SECONDS", 0.05)
    looks = []
    real = events._snapshot
    monkeypatch.setattr(events, "_snapshot", lambda tid: looks.append(tid) or real(tid))
    tid = _training("queued")
    seen: list[list[str]] = []
    first_events = threading.Semaphore(0)
    with TestClient(create_app(), base_url="http://127.0.0.1:8000") as c:
        def follow() -> None:
            statuses = []
            with c.stream("GET", f"/v1/trainings/{tid}/events") as r:
                for line in r.iter_lines():
                    if line.startswith("data:"):
                        statuses.append(json.loads(line[5:])["status"])
                        if len(statuses) == 1:
                            first_events.release()
            seen.append(statuses)

        threads = [threading.Thread(target=follow) for _ in range(5)]
        for t in threads:
            t.start()
        for _ in threads:  # every stream has sent its first event (a sleep was not enough on a loaded machine)
            assert first_events.acquire(timeout=30)
        _update(tid, status="running", progress={"phase": "training", "epoch": 1})
        time.sleep(0.7)
        looks.clear()
        t0 = time.monotonic()
        time.sleep(1.0)
        polls, elapsed = len(looks), time.monotonic() - t0
        _update(tid, status="succeeded", progress={"phase": "done"})
        for t in threads:
            t.join(30)
    assert seen == [["queued", "running", "succeeded"]] * 5
    # one poller: about elapsed / POLL_SECONDS looks (five pollers would make five times as many)
    assert 0 < polls <= elapsed / 0.05 + 3, polls
