"""bench/serve.py without servers: its HTTP client, its statistics and its RESULTS.md writer."""

from __future__ import annotations

import asyncio
import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def serve():
    spec = importlib.util.spec_from_file_location("bench_serve", ROOT / "bench" / "serve.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_serve"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("bench_serve", None)


async def _server(responses: list[bytes]) -> tuple[asyncio.AbstractServer, int, list[bytes]]:
    """A keep-alive server that answers each request with the next canned response."""
    seen: list[bytes] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while responses:
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(next(line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")))
            seen.append(head + await reader.readexactly(length))
            writer.write(responses.pop(0))
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1], seen


def test_connection_reads_content_length_and_chunked_bodies_on_one_connection(serve):
    async def run():
        server, port, seen = await _server([
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n",
            b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 2\r\n\r\n{}",
        ])
        conn = serve.Connection("127.0.0.1", port)
        photo = serve.Photo(Path("x.jpg"), "cat", (500, 375), b"\xff\xd8jpeg")
        out = [await conn.request(serve.felis_request(f"127.0.0.1:{port}", photo)) for _ in range(3)]
        conn.close()
        server.close()
        return out, seen

    out, seen = asyncio.run(run())
    assert out == [(200, b"hello"), (200, b"abcde"), (503, b"{}")]
    assert b'name="files"; filename="x.jpg"' in seen[0] and b"\xff\xd8jpeg" in seen[0]


def test_requests_carry_the_photo_bytes(serve):
    photo = serve.Photo(Path("a.jpg"), "cat", (500, 375), b"\xff\xd8" + bytes(range(256)))
    raw = serve.torchserve_request("h:1", "felis", photo)
    head, body = raw.split(b"\r\n\r\n", 1)
    assert head.startswith(b"POST /predictions/felis HTTP/1.1") and body == photo.data
    assert f"Content-Length: {len(photo.data)}".encode() in head
    raw = serve.felis_request("h:1", photo)
    head, body = raw.split(b"\r\n\r\n", 1)
    assert f"Content-Length: {len(body)}".encode() in head
    assert body.endswith(f"--{serve.BOUNDARY}--\r\n".encode())


def test_top_labels(serve):
    assert serve.felis_top(b'{"predictions": [{"label": "cat", "probabilities": {"cat": 0.9}}]}') == "cat"
    assert serve.torchserve_top(b'{"cat": 0.2, "noncat": 0.8}') == "noncat"


def _run(serve, title, c1, c500, c32, failures=0, rss=300.0):
    def phase(name, conc, ms, img_s):
        p = serve.PhaseResult(name, conc, latencies_ms=[ms] * 10, ok=10, failures=failures, correct=9,
                              seconds=10 / img_s)
        return p
    phases = {"c1": phase("c1", 1, c1, 1000 / c1), "c1_500x375": phase("c1_500x375", 1, c500, 1000 / c500),
              "c32": phase("c32", 32, 200, c32)}
    return serve.ServerRun(title, phases, rss, rss, "note")


def test_targets_are_judged_against_torchserve_as_its_users_run_it(serve):
    runs = [_run(serve, "felis", 10, 9, 150), _run(serve, "TorchServe", 100, 90, 20),
            _run(serve, "TorchServe b32", 80, 80, 60)]
    results = serve.check_targets(runs)
    assert [ok for _, _, ok in results] == [True, None, True, True, True, True], results
    assert results[1][1].startswith("2.50x")  # the strongest configuration: reported, not judged
    runs[1] = _run(serve, "TorchServe", 100, 90, 60)  # 150 < 3 x 60
    assert [ok for _, _, ok in serve.check_targets(runs)][0] is False
    assert serve.check_targets([runs[0], runs[2]])[0][2] is False  # no stock run: not met
    runs[0] = _run(serve, "felis", 10, 13, 150, failures=1, rss=500)
    assert [ok for _, _, ok in serve.check_targets(runs)][2:] == [True, False, False, False]
    text = serve.table(runs)
    assert text.splitlines()[0].startswith("|  | felis | TorchServe | TorchServe b32 | felis / TorchServe |")
    assert "2.50x" in text  # c=32 throughput ratio 150 / 60


def test_results_section_is_replaced_and_other_sections_kept(serve, tmp_path):
    path = tmp_path / "RESULTS.md"
    serve.write_results(path, "first")
    assert path.read_text().count("## Serving") == 1 and "first" in path.read_text()
    path.write_text(path.read_text() + "\n## Training\n\nkept\n")
    serve.write_results(path, "second")
    text = path.read_text()
    assert "first" not in text and "second" in text and text.rstrip().endswith("kept")
    path.write_text("# Benchmarks\n\n## Training\n\nkept\n\n## Serving\n\nhand-written notes\n")
    serve.write_results(path, "third")
    text = path.read_text()
    assert "hand-written notes" in text and "third" in text and text.index("third") > text.index("notes")
