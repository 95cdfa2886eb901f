"""Hostile input against a real felis: each attack of the security issue, the answer it gets, and
the API process's peak memory while it ran.

    python bench/hostile.py [--only predict_pixel_bombs,zip_member_flood] [--out table.md]

Sets up once (`felis up` under a temporary folder, a dataset `pets` of real photos from
../shared/datasets/cifar-cat, a small trained model), then for every attack starts a fresh
`felis api` on that data (so the peak resident memory, VmHWM in /proc/<pid>/status, is the
attack's own), warms it with one good prediction, runs the attack and reads the peak again.
Prints a Markdown table: attack, the answer expected, the answer measured, the API's peak RSS
(and its growth over the warm process). Exits non-zero when an answer differs from the one
expected or a 5xx comes back. This is a measurement, not a test: CI runs the tests that pin
each answer (named in bench/RELIABILITY.md).
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import io
import json
import os
import platform
import random
import secrets
import socket
import struct
import sys
import tempfile
import time
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
DATASETS = Path(os.environ.get("FELIS_DATASETS", ROOT.parent / "shared" / "datasets"))

from tests.utils.processes import Proc, felis_env, free_port, wait_ready, wait_training  # noqa: E402

ADMIN = "felis_bench_" + secrets.token_hex(24)


def _machine() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{os.cpu_count()} x {line.split(':', 1)[1].strip()}"
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _vm(pid: int, field: str) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _png(width: int, height: int) -> bytes:
    """A valid, tiny PNG of huge dimensions (one grey level: the pixels compress to nothing), made
    row by row so this script never holds the decoded image either."""
    raw = zlib.compressobj(9)
    row = b"\x00" + b"\x80" * width
    body = b"".join(raw.compress(row) for _ in range(height)) + raw.flush()

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", body) + chunk(b"IEND", b""))


def _noisy_pngs(n: int, side: int) -> list[bytes]:
    """n distinct PNGs of random noise (they do not compress, nor dedupe): about 3 x side^2 bytes each."""
    from PIL import Image

    rng = random.Random(0)
    return [_encode(Image.frombytes("RGB", (side, side), rng.randbytes(side * side * 3))) for _ in range(n)]


def _encode(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG", compress_level=1)
    return buf.getvalue()


def _zip_of_entries(count: int, prefix: str = "cat/") -> bytes:
    """A zip whose central directory lists `count` empty entries (about 100 bytes each in all)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        for i in range(count):
            zf.writestr(f"{prefix}{i}", b"")
    return buf.getvalue()


def _zip_bomb() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("cat/bomb.png", b"\0" * (20 * 1024 * 1024))  # under FELIS_MAX_FILE_BYTES: the ratio refuses it
    return buf.getvalue()


@dataclass
class Answer:
    status: int
    code: str | None
    note: str = ""

    def __str__(self) -> str:
        return f"{self.status} `{self.code}`" + (f" ({self.note})" if self.note else "") if self.code else str(self.status)


def _answer(r: httpx.Response, note: str = "") -> Answer:
    code = None
    try:
        body = r.json()
        code = (body.get("error") or {}).get("code") if isinstance(body, dict) else None
        if code is None and isinstance(body, dict) and "predictions" in body:
            codes = sorted({(p.get("error") or {}).get("code") or "ok" for p in body["predictions"]})
            code = "per file: " + ", ".join(codes)
        if isinstance(body, dict) and "results" in body:  # an upload's report: the reason per file
            codes = sorted({r.get("reason") or r.get("status") for r in body["results"]})
            code = (f"{code}`, per file `" if code else "per file: ") + ", ".join(codes)
    except (json.JSONDecodeError, UnicodeDecodeError):
        pass
    return Answer(r.status_code, code, note)


@dataclass
class Attack:
    name: str
    what: str
    expected: str
    run: Callable[[httpx.Client, dict], Answer]
    ok: Callable[[Answer], bool]
    env: dict | None = None  # extra settings of the API for this attack (stated in the table)


def _many(c: httpx.Client, n: int, fn: Callable[[], httpx.Response]) -> list[httpx.Response]:
    with cf.ThreadPoolExecutor(n) as pool:
        return list(pool.map(lambda _: fn(), range(n)))


def _worst(rs: list[httpx.Response], note: str = "") -> Answer:
    """The most severe answer among concurrent ones (5xx first), with the spread in the note."""
    answers = [_answer(r) for r in rs]
    counts: dict[str, int] = {}
    for a in answers:
        counts[f"{a.status} {a.code}"] = counts.get(f"{a.status} {a.code}", 0) + 1
    worst = max(answers, key=lambda a: (a.status >= 500, a.status))
    spread = ", ".join(f"{k}: {v}" for k, v in sorted(counts.items()))
    return Answer(worst.status, worst.code, (note + "; " if note else "") + spread)


def attacks(assets: dict) -> list[Attack]:
    pixel_bomb = _png(12000, 12000)
    big_files = assets["noisy"]

    def predict_pixel_bombs(c, a):
        files = [("files", (f"bomb{i}.png", pixel_bomb, "image/png")) for i in range(16)]
        rs = _many(c, 4, lambda: c.post("/v1/datasets/pets/predict", files=files))
        return _worst(rs, f"4 requests x 16 PNGs of 12000x12000 px ({len(pixel_bomb) // 1024} KB each)")

    def predict_oversized_parts(c, a):
        blob = random.Random(1).randbytes(30 * 1024 * 1024)
        files = [("files", (f"big{i}.jpg", blob, "image/jpeg")) for i in range(8)]
        rs = _many(c, 2, lambda: c.post("/v1/datasets/pets/predict", files=files))
        return _worst(rs, "2 requests x 8 parts of 30 MiB")

    def upload_oversized_loose_file(c, a):
        blob = random.Random(2).randbytes(200 * 1024 * 1024)
        r = c.post("/v1/datasets/pets/images", data={"label": "cat"}, files=[("files", ("huge.jpg", blob, "image/jpeg"))])
        return _answer(r, "one 200 MiB part")

    def upload_many_big_files(c, a):
        files = [("files", (f"noise{i}.png", b, "image/png")) for i, b in enumerate(big_files)]
        mb = sum(len(b) for b in big_files) / 2**20
        r = c.post("/v1/datasets/pets/images", data={"label": "noise"}, files=files)
        return _answer(r, f"{len(files)} distinct PNGs, {mb:.0f} MiB in one request")

    def zip_member_flood(c, a):
        body = assets["flood"]
        r = c.post("/v1/datasets/pets/images", files={"archive": ("flood.zip", body, "application/zip")})
        return _answer(r, f"{assets['flood_entries']:,} central-directory entries, {len(body) / 2**20:.0f} MiB")

    def zip_junk_flood(c, a):
        body = assets["junk"]
        r = c.post("/v1/datasets/pets/images", files={"archive": ("junk.zip", body, "application/zip")})
        return _answer(r, f"{assets['junk_entries']:,} entries under __MACOSX/")

    def zip_bomb(c, a):
        r = c.post("/v1/datasets/pets/images", files={"archive": ("bomb.zip", assets["bomb"], "application/zip")})
        return _answer(r, f"20 MiB of zeros in {len(assets['bomb']) // 1024} KB")

    def body_over_limit(c, a):
        def chunks():  # one file part that never ends
            yield (b'--x\r\nContent-Disposition: form-data; name="files"; filename="a.jpg"\r\n'
                   b"Content-Type: image/jpeg\r\n\r\n")
            block = b"\xff" * (1 << 20)
            for _ in range(600):
                yield block
        r = c.post("/v1/datasets/pets/images", content=chunks(),
                   headers={"Content-Type": "multipart/form-data; boundary=x"})
        return _answer(r, "a 600 MiB file part, chunked, no Content-Length")

    def near_duplicates_wide(c, a):
        return _answer(c.get("/v1/datasets/pets/images/near-duplicates", params={"max_distance": 32}))

    def training_too_big(c, a):
        r = c.post("/v1/datasets/pets/trainings", json={"architecture": "efficientnet_lite0", "mode": "finetune",
                                                         "image_size": 1024, "batch_size": 1024})
        return _answer(r)

    def training_queue_flood(c, a):
        # the worker is not running in this API-only process: trainings stay queued
        rs = [c.post("/v1/datasets/pets/trainings", json={"architecture": "simple_cnn", "epochs": 1}) for _ in range(5)]
        for r in rs:
            if r.status_code == 202:
                c.post(f"/v1/trainings/{r.json()['id']}/cancel")
        return Answer(rs[-1].status_code, _answer(rs[-1]).code, "5 requests: " + ", ".join(str(r.status_code) for r in rs))

    def bad_key_flood(c, a):
        statuses = [httpx.get(f"{a['base']}/v1/datasets", headers={"Authorization": f"Bearer felis_wrong{i}"}).status_code
                    for i in range(40)]
        last = httpx.get(f"{a['base']}/v1/datasets", headers={"Authorization": "Bearer felis_wrong"})
        return _answer(last, f"40 bad keys from one address: {statuses.count(401)} x 401, {statuses.count(429)} x 429")

    def stream_flood(c, a):
        # a training that stays queued (no worker runs beside this API), so its streams stay open
        tid = c.post("/v1/datasets/pets/trainings", json={"architecture": "simple_cnn", "epochs": 1}).json()["id"]
        socks = []
        for _ in range(40):
            s = socket.create_connection(("127.0.0.1", a["port"]))
            s.sendall(f"GET /v1/trainings/{tid}/events HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {ADMIN}\r\n\r\n"
                      .encode())
            socks.append(s)
        time.sleep(2)
        r = c.get(f"/v1/trainings/{tid}/events", timeout=10)
        for s in socks:
            s.close()
        c.post(f"/v1/trainings/{tid}/cancel")
        return _answer(r, "40 open streams, then one more")

    def cross_site_post(c, a):
        r = c.post("/v1/datasets", json={"name": "evil"}, headers={"Origin": "https://evil.example", "Sec-Fetch-Site": "cross-site"})
        return _answer(r)

    def foreign_host(c, a):
        r = httpx.get(f"{a['base']}/v1/datasets", headers={"Host": "rebind.evil.example", "Authorization": f"Bearer {ADMIN}"})
        return _answer(r, "embedded mode")

    def predict_key_deletes(c, a):
        r = httpx.delete(f"{a['base']}/v1/datasets/pets", headers={"Authorization": f"Bearer {a['predict_key']}"})
        return _answer(r)

    def predict_key_reads_images(c, a):
        r = httpx.get(f"{a['base']}/v1/datasets/pets/images", headers={"Authorization": f"Bearer {a['predict_key']}"})
        return _answer(r)

    def code_is(*codes: str, status: int | None = None) -> Callable[[Answer], bool]:
        return lambda ans: (ans.code or "") in codes and (status is None or ans.status == status)

    def per_file(code: str) -> Callable[[Answer], bool]:
        return lambda ans: ans.status < 500 and code in (ans.code or "")

    return [
        Attack("predict_pixel_bombs", "predict: PNGs of 12000x12000 px", "4xx, `image_too_large` per file",
               predict_pixel_bombs, per_file("image_too_large")),
        Attack("predict_oversized_parts", "predict: parts over FELIS_MAX_FILE_BYTES", "4xx, `file_too_large` per file",
               predict_oversized_parts, per_file("file_too_large")),
        Attack("upload_oversized_loose_file", "upload: one loose file of 200 MiB", "422, `file_too_large`",
               upload_oversized_loose_file, per_file("file_too_large")),
        Attack("upload_many_big_files", "upload: many big distinct images in one request", "201, all stored",
               upload_many_big_files, lambda ans: ans.status == 201,
               env={"FELIS_MAX_REQUEST_BYTES": str(1 << 30)}),
        Attack("zip_member_flood", "zip: a central directory of a million entries", "413, `too_many_archive_members`",
               zip_member_flood, code_is("too_many_archive_members")),
        Attack("zip_junk_flood", "zip: entries that never become images (__MACOSX)", "413, `too_many_archive_members`",
               zip_junk_flood, code_is("too_many_archive_members")),
        Attack("zip_bomb", "zip: a member that inflates 1000x", "422, `compression_ratio_too_high`",
               zip_bomb, per_file("compression_ratio_too_high")),
        Attack("body_over_limit", "a chunked body past FELIS_MAX_REQUEST_BYTES", "413, `request_too_large`",
               body_over_limit, code_is("request_too_large")),
        Attack("near_duplicates_wide", "near-duplicates with max_distance=32", "422, `validation_error`",
               near_duplicates_wide, lambda ans: ans.status == 422),
        Attack("training_too_big", "training: image_size 1024, batch_size 1024", "422, `training_memory_exceeded`",
               training_too_big, code_is("training_memory_exceeded")),
        Attack("training_queue_flood", "training: 5 requests on one dataset", "the 4th on: 429, `too_many_trainings`",
               training_queue_flood, code_is("too_many_trainings", status=429)),
        Attack("bad_key_flood", "40 bad keys from one address", "429 `rate_limited` after the burst",
               bad_key_flood, code_is("rate_limited")),
        Attack("stream_flood", "41 event streams of a queued training on one process", "503, `too_many_streams`",
               stream_flood, code_is("too_many_streams")),
        Attack("cross_site_post", "a POST from another site's page", "403, `cross_site_request`",
               cross_site_post, lambda ans: ans.status == 403),
        Attack("foreign_host", "a Host header of another name (DNS rebinding)", "403",
               foreign_host, lambda ans: ans.status in (400, 403), env={"FELIS_API_KEYS_REQUIRED": "false"}),
        Attack("predict_key_deletes", "a predict key deletes a dataset", "403, `insufficient_scope`",
               predict_key_deletes, code_is("insufficient_scope")),
        Attack("predict_key_reads_images", "a predict key lists training images", "403, `insufficient_scope`",
               predict_key_reads_images, code_is("insufficient_scope")),
    ]


def setup(tmp: Path) -> dict:
    """A data folder with dataset pets (real photos), a trained small model and a predict key."""
    port = free_port()
    env = felis_env(FELIS_DATA_DIR=str(tmp / "var"), FELIS_API_KEYS_REQUIRED="true", FELIS_BOOTSTRAP_ADMIN_KEY=ADMIN)
    up = Proc(["up", "--port", str(port)], env, tmp / "up.log")
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(base, [up])
        with httpx.Client(base_url=base, timeout=120, headers={"Authorization": f"Bearer {ADMIN}"}) as c:
            c.post("/v1/datasets", json={"name": "pets"}).raise_for_status()
            for label in ("cat", "noncat"):
                files = sorted((DATASETS / "cifar-cat" / "train" / label).iterdir())[:60]
                c.post("/v1/datasets/pets/images", data={"label": label},
                       files=[("files", (p.name, p.read_bytes(), "image/jpeg")) for p in files]).raise_for_status()
            tid = c.post("/v1/datasets/pets/trainings", json={"architecture": "simple_cnn", "epochs": 2}).json()["id"]
            done = wait_training(c, tid)
            if done["status"] != "succeeded":
                raise SystemExit(f"the set-up training did not succeed: {done}\n{up.tail()}")
            predict_key = c.post("/v1/keys", json={"scopes": ["predict"], "name": "bench"}).json()["key"]
    finally:
        up.stop()
    return {"env": env, "training_id": tid, "predict_key": predict_key,
            "sample": (DATASETS / "cifar-cat" / "test" / "cat").iterdir().__next__().read_bytes()}


def run_one(attack: Attack, ctx: dict, tmp: Path) -> tuple[Answer, float, float]:
    port = free_port()
    env = dict(ctx["env"], **(attack.env or {}))
    api = Proc(["api", "--port", str(port)], env, tmp / f"api-{attack.name}.log")
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(base, [api])
        with httpx.Client(base_url=base, timeout=300, headers={"Authorization": f"Bearer {ADMIN}"}) as c:
            c.post("/v1/datasets/pets/predict", files=[("files", ("warm.jpg", ctx["sample"], "image/jpeg"))]).raise_for_status()
            warm = _vm(api.popen.pid, "VmHWM")
            try:
                answer = attack.run(c, {**ctx, "base": base, "port": port})
            except httpx.HTTPError as e:
                answer = Answer(0, None, f"connection failed: {type(e).__name__}")
            alive = api.popen.poll() is None
            peak = _vm(api.popen.pid, "VmHWM") if alive else float("nan")
            if not alive:
                answer.note += "; the API process died"
    finally:
        api.stop()
    return answer, warm, peak


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="", help="comma-separated attack names")
    ap.add_argument("--out", type=Path, help="also write the table here")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="felis-hostile-") as tmp_name:
        tmp = Path(tmp_name)
        t = time.monotonic()
        ctx = setup(tmp)
        flood_entries, junk_entries = 1_000_000, 200_000
        assets = {"noisy": _noisy_pngs(48, 1600), "flood": _zip_of_entries(flood_entries), "flood_entries": flood_entries,
                  "junk": _zip_of_entries(junk_entries, "__MACOSX/cat/._"), "junk_entries": junk_entries,
                  "bomb": _zip_bomb()}
        print(f"# set up in {time.monotonic() - t:.0f} s on {_machine()}", file=sys.stderr)
        chosen = [a for a in attacks(assets) if not args.only or a.name in args.only.split(",")]
        rows, failed = [], 0
        for attack in chosen:
            answer, warm, peak = run_one(attack, ctx, tmp)
            # no 5xx but the 503 a cap answers by design (with Retry-After)
            good = attack.ok(answer) and answer.status != 0 and (answer.status < 500 or attack.expected.startswith("503"))
            failed += not good
            settings = ", ".join(f"{k}={v}" for k, v in (attack.env or {}).items())
            rows.append(f"| {attack.what}{f' ({settings})' if settings else ''} | {attack.expected} | {answer}"
                        f"{'' if good else ' **unexpected**'} | {peak:.0f} MB (+{peak - warm:.0f}) |")
            print(rows[-1], file=sys.stderr)
    table = "\n".join([f"Machine: {_machine()}; date {time.strftime('%Y-%m-%d')}; API peak RSS is VmHWM of a fresh "
                       "`felis api` after one warm-up prediction (in brackets: the growth the attack caused).", "",
                       "| attack | expected | measured | API peak RSS |", "|---|---|---|---|", *rows])
    print(table)
    if args.out:
        args.out.write_text(table + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
