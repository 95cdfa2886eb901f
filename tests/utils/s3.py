"""A real S3-compatible server for tests: moto's server mode as a subprocess on a free loopback port.

Nothing here talks to AWS: the endpoint is 127.0.0.1, the credentials are dummies set in the
environment (the store reads them through boto3's standard chain), and the instance metadata
service is switched off so that a test without credentials fails at once instead of probing it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx

from tests.utils.processes import free_port

REGION = "us-east-1"

# What boto3 needs, and nothing from the developer's own ~/.aws.
AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "felis-test",
    "AWS_SECRET_ACCESS_KEY": "felis-test-secret",
    "AWS_DEFAULT_REGION": REGION,
    "AWS_REGION": REGION,
    "AWS_CONFIG_FILE": os.devnull,
    "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
    "AWS_EC2_METADATA_DISABLED": "true",
}
AWS_UNSET = ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN",
             "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_ROLE_ARN")


def aws_env(base: dict[str, str] | None = None) -> dict[str, str]:
    """``base`` (default: os.environ) with the test credentials and no other AWS configuration."""
    env = {k: v for k, v in (os.environ if base is None else base).items() if k not in AWS_UNSET}
    env.update(AWS_ENV)
    return env


def bucket_name() -> str:
    return f"felis-test-{uuid.uuid4().hex[:12]}"


class MotoServer:
    """``python -m moto.server`` on 127.0.0.1:<free port>; started by :func:`start_moto`."""

    def __init__(self, log: Path):
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.log_path = log
        self._log = open(log, "ab")  # noqa: SIM115 (open while the server runs; stop() closes it)
        self.popen = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            env=aws_env(), stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.popen.poll() is not None:
                raise RuntimeError(f"moto exited with {self.popen.returncode}:\n{self.tail()}")
            try:
                if httpx.get(f"{self.endpoint}/moto-api/", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"moto not answering on {self.endpoint}:\n{self.tail()}")

    def client(self, **kw):
        """A plain boto3 client on this server, to look at the bucket behind the store's back."""
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name=REGION,
                            aws_access_key_id=AWS_ENV["AWS_ACCESS_KEY_ID"],
                            aws_secret_access_key=AWS_ENV["AWS_SECRET_ACCESS_KEY"], **kw)

    def create_bucket(self, name: str | None = None) -> str:
        name = name or bucket_name()
        self.client().create_bucket(Bucket=name)
        return name

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        return sorted(obj["Key"] for page in pages for obj in page.get("Contents", []))

    def pause(self) -> None:
        """SIGSTOP: the port still accepts connections (the kernel's backlog) but nothing answers."""
        os.kill(self.popen.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.kill(self.popen.pid, signal.SIGCONT)

    def stop(self) -> None:
        if self.popen.poll() is None:
            try:
                os.killpg(self.popen.pid, signal.SIGCONT)
                self.popen.terminate()
                self.popen.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait(10)
            except ProcessLookupError:
                pass
        self._log.close()

    def kill(self) -> None:
        """SIGKILL, as a crashed storage server: connections are refused from now on."""
        try:
            os.killpg(self.popen.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.popen.wait(10)

    def tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


def start_moto(folder: Path) -> MotoServer:
    """A moto server that answers, its log in ``folder``; the caller stops it."""
    folder.mkdir(parents=True, exist_ok=True)
    server = MotoServer(folder / "moto.log")
    try:
        server.wait_ready()
    except BaseException:
        server.kill()
        server.stop()
        raise
    return server
