"""An S3-compatible server for the S3 store's tests: one moto server per session, a bucket per test."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.utils.s3 import AWS_ENV, AWS_UNSET, MotoServer, start_moto


@pytest.fixture(scope="session")
def moto_server(tmp_path_factory) -> Iterator[MotoServer]:
    server = start_moto(tmp_path_factory.mktemp("moto"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def aws_credentials(monkeypatch) -> None:
    """The dummy credentials in the environment, where boto3's default chain finds them."""
    for key in AWS_UNSET:
        monkeypatch.delenv(key, raising=False)
    for key, value in AWS_ENV.items():
        monkeypatch.setenv(key, value)


@pytest.fixture
def s3_bucket(moto_server, aws_credentials) -> str:
    """A fresh, empty bucket on the session's moto server."""
    return moto_server.create_bucket()
