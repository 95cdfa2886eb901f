"""Real felis processes for end-to-end tests: `felis up`, or separate API and worker processes."""

from __future__ import annotations

import itertools
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


MACHINE_REDIS = "redis://127.0.0.1:6379"
_redis_turn = itertools.count()


def redis_database() -> str:
    """The URL of a flushed database of the machine's Redis, for one fixture's broker. Numbers 1-14
    are dealt out in turn (0 and 15 are other tests'); under pytest-xdist each worker deals from a
    slice of its own, so two fixtures alive at once, in one worker or two, never share one."""
    import redis

    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    worker = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw"))
    per_worker = 14 // workers
    if per_worker < 2:
        raise RuntimeError(f"{workers} test workers: the Redis databases 1-14 cannot be shared out")
    url = f"{MACHINE_REDIS}/{1 + worker * per_worker + next(_redis_turn) % per_worker}"
    redis.Redis.from_url(url).flushdb()
    return url


def felis_env(**overrides: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FELIS_") or k == "FELIS_DATASETS"}
    env.update(overrides)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def migrate(env: dict[str, str]) -> None:
    """`felis migrate`, production's own deployment step (its processes never migrate by themselves)."""
    done = subprocess.run([sys.executable, "-m", "service.cli", "migrate"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr


class Proc:
    def __init__(self, args: list[str], env: dict[str, str], log: Path):
        self.args, self.env, self.log_path = args, env, log
        self._log = open(log, "ab")
        self.popen = subprocess.Popen([sys.executable, "-m", "service.cli", *args], cwd=ROOT, env=env,
                                      stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int | None:
        if self.popen.poll() is None:
            self.popen.send_signal(sig)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait(10)
        self._log.close()
        return self.popen.returncode

    def kill_group(self) -> None:
        """SIGKILL the process and every child it forked (a worker and its pool), as a crash would."""
        try:
            os.killpg(self.popen.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.popen.wait(10)

    def tail(self, n: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


def wait_ready(base_url: str, procs: list[Proc], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for p in procs:
            if p.popen.poll() is not None:
                raise RuntimeError(f"{p.args} exited with {p.popen.returncode}:\n{p.tail()}")
        try:
            if httpx.get(f"{base_url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise TimeoutError(f"felis at {base_url} not ready:\n" + "\n".join(p.tail() for p in procs))


def start_felis(command: str, tmp: Path, **env: str) -> tuple[Proc, str]:
    """`felis up` or `felis api` on a free port with its data under tmp/var, once it is ready:
    (the process, its base URL)."""
    port = free_port()
    proc = Proc([command, "--port", str(port)], felis_env(FELIS_DATA_DIR=str(tmp / "var"), **env),
                tmp / f"{command}-{port}.log")
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(base, [proc])
    except BaseException:
        proc.stop()
        raise
    return proc, base


def create_postgres_database() -> tuple[str, callable]:
    """A fresh PostgreSQL database on the local server, and a function that drops it."""
    import psycopg

    name = f"felis_test_{uuid.uuid4().hex[:10]}"
    admin = "postgresql://postgres@127.0.0.1:5432/postgres"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')

    def drop() -> None:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    return f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}", drop


def wait_training(client: httpx.Client, training_id: str, timeout: float = 600) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        body = client.get(f"/v1/trainings/{training_id}").json()
        if body["status"] in ("succeeded", "failed", "cancelled"):
            return body
        time.sleep(0.5)
    raise TimeoutError(f"training {training_id} still {body['status']}: {body.get('progress')}")


def api_pid(procs: list[Proc]) -> int:
    """The process serving HTTP: an `api` Proc itself, or the `api` child of `felis up`."""
    for p in procs:
        if p.args[0] == "api":
            return p.popen.pid
    up = procs[0].popen.pid
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            cmdline = (stat.parent / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if int(fields[1]) == up and b"api" in cmdline:
            return int(stat.parent.name)
    raise LookupError("no api process found")


def rss_mb(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(status.split("VmRSS:")[1].split()[0]) / 1024


def has_torch_loaded(pid: int) -> bool:
    return "libtorch" in Path(f"/proc/{pid}/maps").read_text()
