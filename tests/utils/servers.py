"""Servers a fault test owns: a Redis and a PostgreSQL cluster of its own, on their own ports and
folders, that it can SIGKILL and restart (never the machine's shared ones)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from tests.utils.processes import free_port


class RedisServer:
    """redis-server with the append-only file as production runs it (``appendfsync everysec``)."""

    def __init__(self, folder: Path, fsync: str = "everysec"):
        self.folder, self.fsync, self.port = folder, fsync, free_port()
        folder.mkdir(parents=True, exist_ok=True)
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            ["redis-server", "--bind", "127.0.0.1", "--port", str(self.port), "--appendonly", "yes",
             "--appendfsync", self.fsync, "--save", "", "--dir", str(self.folder),
             "--logfile", str(self.folder / "redis.log")], start_new_session=True)
        import redis

        for _ in range(200):
            try:
                if redis.Redis(port=self.port, socket_connect_timeout=0.5).ping():
                    return
            except redis.RedisError:
                time.sleep(0.05)
        raise TimeoutError("redis did not start")

    def kill(self) -> None:
        """SIGKILL: what a crash or an OOM kill does (writes of the last second may be lost)."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        self.kill()


class PostgresCluster:
    """A PostgreSQL cluster of the test's own: initdb as the postgres user (it refuses root) in a
    folder that user owns, on a free port; restart() is a crash (immediate shutdown) and a start."""

    def __init__(self):
        bindir = sorted(Path("/usr/lib/postgresql").glob("*/bin"))[-1]
        self.initdb, self.pg_ctl = str(bindir / "initdb"), str(bindir / "pg_ctl")
        self.folder = Path(tempfile.mkdtemp(prefix="felis-pg-"))
        shutil.chown(self.folder, "postgres", "postgres")
        self.data = self.folder / "data"
        self.port = free_port()
        self._as_postgres(self.initdb, "-D", str(self.data), "-A", "trust", "-U", "postgres", "--no-sync")

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def _as_postgres(self, *args: str) -> None:
        subprocess.run(["runuser", "-u", "postgres", "--", *args], check=True, capture_output=True, timeout=120)

    def start(self) -> None:
        self._as_postgres(self.pg_ctl, "-D", str(self.data), "-l", str(self.folder / "log"), "-w", "-t", "60",
                          "-o", f"-p {self.port} -k {self.folder} -c listen_addresses=127.0.0.1 -c fsync=off", "start")

    def crash(self) -> None:
        """Stop at once, as a crash or a failover does: every connection is cut."""
        self._as_postgres(self.pg_ctl, "-D", str(self.data), "-m", "immediate", "-w", "stop")

    def stop(self) -> None:
        try:
            self._as_postgres(self.pg_ctl, "-D", str(self.data), "-m", "immediate", "-w", "stop")
        except subprocess.CalledProcessError:
            pass
        shutil.rmtree(self.folder, ignore_errors=True)


def available() -> dict[str, bool]:
    return {"redis": bool(shutil.which("redis-server")),
            "postgres": bool(list(Path("/usr/lib/postgresql").glob("*/bin/initdb"))) and os.geteuid() == 0}
