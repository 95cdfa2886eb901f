"""felis against TorchServe: the same trained weights, the same real JPEGs, one run, side by side.

    .venv/bin/python bench/serve.py                      # train a model in a temporary felis, then measure
    .venv/bin/python bench/serve.py --data-dir /tmp/fb   # the same, keeping felis's data; a second run reuses the model
    .venv/bin/python bench/serve.py --checkpoint v1.pt   # serve a downloaded felis checkpoint instead of training
    .venv/bin/python bench/serve.py --oip --torchserve none  # felis's /v1 predict against its /v2 (KServe v2) infer
    .venv/bin/python bench/serve.py --torchserve none --peers litserve,bentoml,pytriton --rounds 2 --seconds 10

Peers (issue 17): LitServe, BentoML and NVIDIA PyTriton (Triton's C++ HTTP front end and dynamic
batcher), each a small server under bench/peers/ run by its own venv under --peer-venvs
(/tmp/peer-venvs/<name>, never in the repo; install commands in bench/peers/README.md), on the
felis INT8 ONNX graph downloaded from the felis under test (`?format=onnx`) and felis's own
preprocessing (models.predictor, imported from the repo; no torch). Versions pinned there:
litserve 0.2.19 (+ python-multipart 0.0.34), bentoml 1.4.40, nvidia-pytriton 0.7.0 (numpy 1.26.4:
it requires numpy < 2), each with onnxruntime 1.32.0 and pillow 13.0.0 (numpy 2.4.6 where allowed),
Python 3.11.7. Rounds are interleaved (felis, each peer, felis, ...), one server running at a time.

Steps:
1. A trained felis version: trained here through felis's own HTTP API (`felis up` in a temporary
   data dir, upload ../shared/datasets/photos/train as a zip, train with default options, download
   the checkpoint), or an existing one (`--data-dir`, `--checkpoint`).
2. A TorchServe archive of the same weights: `models.checkpoint.build_network(ckpt)`, eager
   (a model file plus state_dict) or TorchScript, TorchServe's stock image classifier handler
   (bench/torchserve/handler.py only caps its top-5 at the number of labels).
3. One server at a time on the machine: felis's API (`felis api`), then TorchServe in each
   configuration asked for. Each gets the same phases from one load driver: concurrency 1 over all
   test photos, concurrency 1 over the 500x375 ones, concurrency 32 over all; a warm-up, then
   `--seconds` measured.
4. A side-by-side table (p50/p99 latency, img/s, failures, ratios, server CPU and memory), and with
   `--write-results` the "Serving" section of bench/RESULTS.md.

The driver shares the cores with the server it measures, so it is kept light: one process, one
asyncio loop, keep-alive HTTP/1.1 connections written by hand over prebuilt request bytes (no HTTP
library on the hot path). Its own CPU use and every other process's are printed per phase.

Exits non-zero when a server fails to start, a phase has failed requests, or a target is missed
(`--no-targets` prints the targets without judging them).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import io
import itertools
import json
import os
import platform
import random
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.utils.processes import Proc, felis_env, free_port, wait_ready  # noqa: E402  (shared with the e2e tests)

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
DATASETS = Path(os.environ.get("FELIS_DATASETS", ROOT.parent / "shared" / "datasets")).resolve()
PHOTOS = DATASETS / "photos"
DATASET = "bench"  # felis dataset name
TS_MODEL = "felis"  # TorchServe model name
BOUNDARY = "felisbenchboundary7d3f"
SIZE_500x375 = (500, 375)

PEER_TARGETS = {  # issue 17: felis against the best of LitServe, BentoML, PyTriton, same round
    "c32_ratio": 1.3,  # felis img/s at c=32 over the best peer's
    "c1_p50_ratio": 1.0,  # felis c=1 p50 (all test photos) over the best (lowest) peer's
}

TARGETS = {  # issue 3, this 2-core machine, one run
    "c32_ratio": 3.0,  # felis img/s over TorchServe img/s at concurrency 32 (stock TorchServe, as its users run it)
    "c32_img_s": 120.0,  # felis img/s at concurrency 32, end to end over HTTP
    "c1_500x375_p50_ms": 12.0,  # felis p50 at concurrency 1 on 500x375 JPEGs
    "felis_rss_mb": 400.0,  # felis API process resident memory after the load
}


# --------------------------------------------------------------------------------------------
# processes


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class StartFailed(RuntimeError):
    pass


def _tail(path: Path, n: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


class Felis(Proc):
    """`felis up` (API + worker, for training) or `felis api` (serving), in a data dir of our choosing:
    the e2e tests' process wrapper, with the bench's environment."""

    def __init__(self, command: str, data_dir: Path, log: Path, extra_env: dict[str, str] | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = felis_env(
            FELIS_DATA_DIR=str(data_dir),
            # one load driver is one caller: felis's per-caller limit (6000/min) would cap it at 100 req/s
            FELIS_RATE_LIMIT_PREDICT_PER_MINUTE="0",
            FELIS_RATE_LIMIT_UPLOAD_PER_MINUTE="0",
            **(extra_env or {}),
        )
        super().__init__([command, "--port", str(self.port)], env, log)

    def wait_ready(self, timeout: float = 120) -> None:
        try:
            wait_ready(self.url, [self], timeout)
        except (RuntimeError, TimeoutError) as e:
            raise StartFailed(str(e)) from None


@dataclass
class TorchServeConfig:
    name: str  # short key used on the command line and in the table
    title: str
    workers: int | None  # None: TorchServe's default (one per CPU)
    batch_size: int = 1
    max_batch_delay_ms: int = 100  # TorchServe's default; only used when batch_size > 1
    malloc_tuned: bool = False  # glibc malloc keeps freed memory, as felis's models.runtime.tune_process does


TORCHSERVE_CONFIGS = {
    # as its users run it: defaults (a worker per CPU, no batching), the stock handler
    "stock": TorchServeConfig("stock", "TorchServe", workers=None),
    # the batching users turn on for throughput, with felis's batch limits (32 images, 2 ms wait)
    "batch32": TorchServeConfig("batch32", "TorchServe b32", workers=1, batch_size=32, max_batch_delay_ms=2),
    # the same, plus the malloc setting that makes eager PyTorch 2-4x faster on this VM
    "tuned": TorchServeConfig("tuned", "TorchServe b32+malloc", workers=1, batch_size=32, max_batch_delay_ms=2,
                              malloc_tuned=True),
}


class TorchServe:
    """`torchserve --start` with its pid file, logs and temp files in our own folder, stopped by `--stop`."""

    def __init__(self, workdir: Path, store: Path, mar: str, cfg: TorchServeConfig, repo_on_path: bool):
        self.cfg = cfg
        self.dir = workdir / f"ts-{cfg.name}"
        (self.dir / "tmp").mkdir(parents=True, exist_ok=True)
        (self.dir / "logs").mkdir(exist_ok=True)
        self.port, mport, xport = free_port(), free_port(), free_port()
        self.url, self.management = f"http://127.0.0.1:{self.port}", f"http://127.0.0.1:{mport}"
        props = [
            f"inference_address=http://127.0.0.1:{self.port}",
            f"management_address=http://127.0.0.1:{mport}",
            f"metrics_address=http://127.0.0.1:{xport}",
            "disable_token_authorization=true",
        ]
        if cfg.workers is not None:
            props.append(f"default_workers_per_model={cfg.workers}")
        (self.dir / "config.properties").write_text("\n".join(props) + "\n")
        self.env = dict(os.environ)
        self.env.update({
            "TMPDIR": str(self.dir / "tmp"),  # TorchServe's pid file lives in tempfile.gettempdir()
            "TEMP": str(self.dir / "tmp"),
            "LOG_LOCATION": str(self.dir / "logs"),
            "METRICS_LOCATION": str(self.dir / "logs"),
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        })
        if cfg.malloc_tuned:  # the environment form of mallopt(M_MMAP_MAX, 0) and mallopt(M_TRIM_THRESHOLD, 1 GiB)
            self.env.update({"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(1 << 30)})
        if repo_on_path:  # the eager model file imports felis's models package
            self.env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
        self.log_path = self.dir / "console.log"
        self._log = open(self.log_path, "ab")
        cmd = [_torchserve_exe(), "--start", "--ncs", "--model-store", str(store), "--models", f"{TS_MODEL}={mar}",
               "--ts-config", str(self.dir / "config.properties"), "--disable-token-auth"]
        subprocess.run(cmd, cwd=self.dir, env=self.env, stdout=self._log, stderr=subprocess.STDOUT, check=True,
                       timeout=60)
        self.java_pid: int | None = None

    def _read_pid(self) -> int | None:
        try:
            return int((self.dir / "tmp" / ".model_server.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def wait_ready(self, timeout: float = 240) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.java_pid = self.java_pid or self._read_pid()
            if self.java_pid is not None and not _alive(self.java_pid):
                raise StartFailed(f"TorchServe exited:\n{_tail(self.dir / 'logs' / 'ts_log.log')}")
            try:
                r = httpx.get(f"{self.management}/models/{TS_MODEL}", timeout=2)
                if r.status_code == 200:
                    workers = r.json()[0]["workers"]
                    if workers and all(w["status"] == "READY" for w in workers):
                        self.workers = len(workers)
                        return
            except (httpx.HTTPError, ValueError, KeyError, IndexError):
                pass
            time.sleep(0.5)
        raise StartFailed(f"TorchServe's model was not READY within {timeout:.0f} s:\n"
                          f"{_tail(self.dir / 'logs' / 'model_log.log')}")

    @property
    def pids(self) -> list[int]:
        return _tree(self.java_pid) if self.java_pid else []

    def stop(self) -> None:
        pids = self.pids
        try:
            subprocess.run([_torchserve_exe(), "--stop"], cwd=self.dir, env=self.env, stdout=self._log,
                           stderr=subprocess.STDOUT, timeout=60)
        except (subprocess.SubprocessError, OSError):
            pass
        deadline = time.monotonic() + 30
        while any(_alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.2)
        for p in pids:  # whatever --stop left behind
            if _alive(p):
                try:
                    os.kill(p, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        self._log.close()


def _torchserve_exe() -> str:
    exe = Path(sys.executable).parent / "torchserve"
    return str(exe) if exe.exists() else (shutil.which("torchserve") or "torchserve")


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _tree(pid: int) -> list[int]:
    """pid and all its descendants (from /proc: no psutil in felis's venv)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    if not _alive(pid):
        return []
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def _cpu_seconds(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime
        except (OSError, IndexError, ValueError):
            pass
    return total


def _busy_seconds() -> float:
    """CPU time the whole machine spent not idle (all cores), from /proc/stat."""
    with open("/proc/stat") as f:
        vals = [int(x) for x in f.readline().split()[1:]]
    idle = vals[3] + (vals[4] if len(vals) > 4 else 0)  # idle + iowait
    return (sum(vals[:8]) - idle) / os.sysconf("SC_CLK_TCK")  # user..steal, without guest (counted in user)


def _rss_mb(pids: list[int]) -> tuple[float, float]:
    """(VmRSS, VmHWM) summed over pids, MiB."""
    rss = hwm = 0.0
    for pid in pids:
        try:
            text = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        for key, dest in (("VmRSS", "rss"), ("VmHWM", "hwm")):
            m = re.search(rf"^{key}:\s+(\d+) kB", text, re.M)
            if m and dest == "rss":
                rss += int(m.group(1)) / 1024
            elif m:
                hwm += int(m.group(1)) / 1024
    return rss, hwm


def _busy_pct(window: float = 3.0) -> float:
    """CPU the whole machine used over `window` seconds, % of one core."""
    b0 = _busy_seconds()
    time.sleep(window)
    return 100 * (_busy_seconds() - b0) / window


def _wait_quiet(max_busy: float, timeout: float) -> float:
    """Wait (at most `timeout` s) until the machine, our servers idle, uses at most max_busy % of a core;
    return the last reading. The load average lags by minutes, so it is reported but not used."""
    deadline = time.monotonic() + timeout
    busy = _busy_pct()
    if busy > max_busy:
        _log(f"the machine is busy ({busy:.0f}% of a core, load average {os.getloadavg()[0]:.2f}): "
             f"waiting up to {timeout:.0f} s for it to drop below {max_busy:.0f}%")
    while busy > max_busy and time.monotonic() < deadline:
        time.sleep(5)
        busy = _busy_pct()
    if busy > max_busy:
        _log(f"still {busy:.0f}% of a core busy: measuring anyway (see 'other processes' CPU')")
    return busy


# --------------------------------------------------------------------------------------------
# a trained felis version


def _zip_folder(folder: Path) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:  # JPEGs do not compress
        for label_dir in sorted(p for p in folder.iterdir() if p.is_dir()):
            for f in sorted(label_dir.iterdir()):
                if f.is_file():
                    z.write(f, f"{label_dir.name}/{f.name}")
    return buf.getvalue()


def _default_version(url: str) -> int | None:
    r = httpx.get(f"{url}/v1/datasets/{DATASET}/models", timeout=30)
    if r.status_code != 200:
        return None
    rows = [m for m in r.json()["data"] if m.get("default")]
    return rows[0]["version"] if rows else None


def train_in_felis(data_dir: Path, workdir: Path, options: dict, timeout: float) -> bytes:
    """The checkpoint of the dataset's default version, trained first (with `options`) if there is none."""
    felis = Felis("up", data_dir, workdir / "felis-up.log")
    try:
        felis.wait_ready()
        version = _default_version(felis.url)
        if version is None:
            with httpx.Client(base_url=felis.url, timeout=600) as c:
                r = c.post("/v1/datasets", json={"name": DATASET})
                if r.status_code not in (201, 409):
                    raise RuntimeError(f"create dataset: {r.status_code} {r.text[:300]}")
                if c.get(f"/v1/datasets/{DATASET}").json().get("image_count", 0) == 0:
                    _log(f"uploading {PHOTOS / 'train'} as a zip")
                    r = c.post(f"/v1/datasets/{DATASET}/images",
                               files={"archive": ("train.zip", _zip_folder(PHOTOS / "train"), "application/zip")})
                    if r.status_code not in (201, 207):
                        raise RuntimeError(f"upload: {r.status_code} {r.text[:300]}")
                    _log(f"uploaded: {r.json().get('created')} images")
                r = c.post(f"/v1/datasets/{DATASET}/trainings", json=options)
                if r.status_code != 202:
                    raise RuntimeError(f"train: {r.status_code} {r.text[:300]}")
                training = r.json()["id"]
                _log(f"training {training} with options {json.dumps(options)}")
                deadline, last, last_at = time.monotonic() + timeout, None, 0.0
                while True:
                    t = c.get(f"/v1/trainings/{training}").json()
                    progress = {k: v for k, v in (t.get("progress") or {}).items() if k != "updated_at"}
                    phase = (t["status"], progress.get("phase"))
                    if phase != last or time.monotonic() - last_at > 30:  # a line per phase, or every 30 s
                        _log(f"  {t['status']}: {json.dumps(progress)[:160]}")
                        last, last_at = phase, time.monotonic()
                    if t["status"] in ("succeeded", "failed", "cancelled"):
                        break
                    if time.monotonic() > deadline or felis.popen.poll() is not None:
                        raise RuntimeError(f"training did not finish within {timeout:.0f} s:\n{felis.tail(40)}")
                    time.sleep(2)
                if t["status"] != "succeeded":
                    raise RuntimeError(f"training {t['status']}: {t.get('error')}")
                version = t["model_version"]
        r = httpx.get(f"{felis.url}/v1/datasets/{DATASET}/models/{version}/download", timeout=120)
        r.raise_for_status()
        _log(f"felis version {version}: checkpoint {len(r.content) / 1e6:.1f} MB")
        return r.content
    finally:
        felis.stop()


# --------------------------------------------------------------------------------------------
# the same weights as a TorchServe archive

_EAGER_MODEL_FILE = '''"""felis's network for TorchServe's eager mode (written by bench/serve.py).

TorchServe imports this file from the unpacked archive, calls FelisNetwork() and loads the
archive's state_dict into it. The network is rebuilt from the felis checkpoint packed beside
this file, by felis's own models.checkpoint.build_network.
"""

import os

from torch import nn


class FelisNetwork(nn.Module):
    def __init__(self):
        super().__init__()
        from models.checkpoint import build_network, load_checkpoint

        with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "felis-checkpoint.pt"), "rb") as f:
            self.net = build_network(load_checkpoint(f))

    def forward(self, x):
        return self.net(x)
'''


def build_archive(ckpt_bytes: bytes, workdir: Path, fmt: str, configs: list[TorchServeConfig]) -> tuple[Path, dict, list]:
    """TorchServe model archives (one per config), the same weights as felis; returns the store,
    {config name: mar file name} and the labels."""
    import torch

    from models.checkpoint import build_network, load_checkpoint

    ckpt = load_checkpoint(ckpt_bytes)
    labels = list(ckpt["labels"])
    net = build_network(ckpt).eval()
    src = workdir / "archive-src"
    src.mkdir(exist_ok=True)
    (src / "index_to_name.json").write_text(json.dumps({str(i): name for i, name in enumerate(labels)}))
    extra = [src / "index_to_name.json"]
    if fmt == "eager":
        (src / "felis-checkpoint.pt").write_bytes(ckpt_bytes)
        (src / "model.py").write_text(_EAGER_MODEL_FILE)
        torch.save({f"net.{k}": v for k, v in net.state_dict().items()}, src / "model.pth")
        model_args = ["--model-file", str(src / "model.py"), "--serialized-file", str(src / "model.pth")]
        extra.append(src / "felis-checkpoint.pt")
    else:  # TorchScript, traced at the stock handler's 224x224 crop
        with torch.inference_mode():
            traced = torch.jit.trace(net, torch.zeros(1, 3, 224, 224))
        traced.save(str(src / "model.pt"))
        model_args = ["--serialized-file", str(src / "model.pt")]
    store = workdir / "model-store"
    store.mkdir(exist_ok=True)
    mars = {}
    archiver = Path(sys.executable).parent / "torch-model-archiver"
    for cfg in configs:
        name = f"{TS_MODEL}-{cfg.name}"
        args = [str(archiver if archiver.exists() else "torch-model-archiver"), "--model-name", name,
                "--version", "1.0", *model_args, "--handler", str(BENCH / "torchserve" / "handler.py"),
                "--extra-files", ",".join(str(p) for p in extra), "--export-path", str(store), "--force"]
        if cfg.batch_size > 1:
            yaml = src / f"model-config-{cfg.name}.yaml"
            yaml.write_text(f"batchSize: {cfg.batch_size}\nmaxBatchDelay: {cfg.max_batch_delay_ms}\n"
                            f"minWorkers: {cfg.workers or 1}\nmaxWorkers: {cfg.workers or 1}\nresponseTimeout: 120\n")
            args += ["--config-file", str(yaml)]
        subprocess.run(args, check=True, cwd=workdir)
        mars[cfg.name] = f"{name}.mar"
    return store, mars, labels


# --------------------------------------------------------------------------------------------
# the load driver


@dataclass
class Photo:
    path: Path
    label: str
    size: tuple[int, int]
    data: bytes


def load_photos() -> list[Photo]:
    from PIL import Image

    photos = []
    for label_dir in sorted((PHOTOS / "test").iterdir()):
        for f in sorted(label_dir.iterdir()):
            with Image.open(f) as im:
                size = im.size
            photos.append(Photo(f, label_dir.name, size, f.read_bytes()))
    random.Random(0).shuffle(photos)  # one fixed order, the same for every server
    return photos


def felis_request(host: str, photo: Photo) -> bytes:
    body = (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"{photo.path.name}\"\r\n"
            f"Content-Type: image/jpeg\r\n\r\n").encode() + photo.data + f"\r\n--{BOUNDARY}--\r\n".encode()
    head = (f"POST /v1/datasets/{DATASET}/predict HTTP/1.1\r\nHost: {host}\r\n"
            f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\nContent-Length: {len(body)}\r\n\r\n")
    return head.encode() + body


def torchserve_request(host: str, model: str, photo: Photo) -> bytes:
    head = (f"POST /predictions/{model} HTTP/1.1\r\nHost: {host}\r\nContent-Type: image/jpeg\r\n"
            f"Content-Length: {len(photo.data)}\r\n\r\n")
    return head.encode() + photo.data


def oip_request(host: str, photo: Photo) -> bytes:
    """POST /v2/models/{name}/infer as tritonclient sends it: the binary tensor data extension (one
    BYTES element: a 4-byte little-endian length, the file), no outputs named so all come back binary."""
    data = len(photo.data).to_bytes(4, "little") + photo.data
    head = json.dumps({"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES",
                                   "parameters": {"binary_data_size": len(data)}}],
                       "parameters": {"binary_data_output": True}}).encode()
    request = (f"POST /v2/models/{DATASET}/infer HTTP/1.1\r\nHost: {host}\r\n"
               f"Inference-Header-Content-Length: {len(head)}\r\nContent-Length: {len(head) + len(data)}\r\n\r\n")
    return request.encode() + head + data


def oip_top(body: bytes) -> str:
    """The `label` output of a binary OIP answer (its JSON header first, then each output's bytes)."""
    head, offset = json.JSONDecoder().raw_decode(body.decode("latin-1"))  # the header is ASCII JSON
    for out in head["outputs"]:
        size = out["parameters"]["binary_data_size"]
        if out["name"] == "label":
            n = int.from_bytes(body[offset:offset + 4], "little")
            return body[offset + 4:offset + 4 + n].decode()
        offset += size
    raise ValueError("no label output")


def felis_top(body: bytes) -> str:
    return json.loads(body)["predictions"][0]["label"]


def torchserve_top(body: bytes) -> str:
    probs = json.loads(body)
    return max(probs, key=probs.__getitem__)


class Connection:
    """One keep-alive HTTP/1.1 connection: write prebuilt request bytes, read one response."""

    def __init__(self, host: str, port: int):
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def request(self, raw: bytes) -> tuple[int, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        assert self.reader is not None
        self.writer.write(raw)
        head = await self.reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        headers = {}
        for line in lines[1:]:
            key, _, value = line.partition(":")
            headers[key.strip().lower()] = value.strip().lower()
        if "content-length" in headers:
            body = await self.reader.readexactly(int(headers["content-length"]))
        elif headers.get("transfer-encoding") == "chunked":
            chunks = []
            while True:
                size = int((await self.reader.readuntil(b"\r\n")).split(b";")[0], 16)
                chunks.append(await self.reader.readexactly(size + 2))
                if size == 0:
                    break
            body = b"".join(c[:-2] for c in chunks)
        else:
            body = await self.reader.read()
            self.close()
        if headers.get("connection") == "close":
            self.close()
        return status, body

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


@dataclass
class Target:
    name: str
    port: int
    requests: list[bytes]  # one per photo, prebuilt
    top: object  # body -> top label
    pids: object  # () -> server pids, for CPU and memory


@dataclass
class PhaseResult:
    name: str
    concurrency: int
    latencies_ms: list[float] = field(default_factory=list)
    ok: int = 0
    failures: int = 0
    correct: int = 0
    seconds: float = 0.0
    driver_cpu_pct: float = 0.0  # of one core
    server_cpu_ms_per_img: float = 0.0
    others_cpu_pct: float = 0.0  # every other process on the machine, % of one core
    errors: list[str] = field(default_factory=list)

    @property
    def img_s(self) -> float:
        return self.ok / self.seconds if self.seconds else 0.0

    def pct(self, q: float) -> float:
        return float(np.percentile(self.latencies_ms, q)) if self.latencies_ms else float("nan")


async def _run_phase(target: Target, photos: list[Photo], indices: list[int], name: str, concurrency: int,
                     warmup: float, seconds: float, drain: float = 60) -> PhaseResult:
    """`concurrency` closed-loop users for warmup + seconds. Counted: the requests that complete inside the
    measured window; requests still in flight at its end are awaited (at most `drain` s) but not counted."""
    res = PhaseResult(name, concurrency, seconds=seconds)
    counter = itertools.count()
    loop = asyncio.get_running_loop()
    measure_from = loop.time() + warmup
    stop_at = measure_from + seconds
    marks: dict[str, tuple[float, float, float]] = {}

    def mark(key: str) -> None:  # CPU time of the driver, of the server, of the whole machine
        marks[key] = (time.process_time(), _cpu_seconds(target.pids()), _busy_seconds())

    loop.call_at(measure_from, mark, "from")
    loop.call_at(stop_at, mark, "to")

    async def user() -> None:
        conn = Connection("127.0.0.1", target.port)
        try:
            while loop.time() < stop_at:
                i = indices[next(counter) % len(indices)]
                t0 = loop.time()
                try:
                    status, body = await conn.request(target.requests[i])
                    ok = status == 200
                    top = target.top(body) if ok else None
                    error = None if ok else f"HTTP {status}: {body[:200]!r}"
                except Exception as e:  # a failed request; the connection is reopened
                    conn.close()
                    ok, top, error = False, None, f"{type(e).__name__}: {e}"
                t1 = loop.time()
                if error and len(res.errors) < 5:
                    res.errors.append(error)
                if not measure_from <= t1 <= stop_at:
                    continue
                if ok:
                    res.ok += 1
                    res.latencies_ms.append((t1 - t0) * 1000)
                    res.correct += top == photos[i].label
                else:
                    res.failures += 1
        finally:
            conn.close()

    users = asyncio.gather(*(user() for _ in range(concurrency)))
    try:
        await asyncio.wait_for(users, timeout=warmup + seconds + drain)
    except TimeoutError:
        _log(f"  {target.name} {name}: requests still in flight {drain:.0f} s after the phase; abandoned")
    (d0, s0, b0), (d1, s1, b1) = marks["from"], marks["to"]
    res.driver_cpu_pct = 100 * (d1 - d0) / seconds
    res.server_cpu_ms_per_img = 1000 * (s1 - s0) / max(1, res.ok)
    res.others_cpu_pct = max(0.0, 100 * ((b1 - b0) - (d1 - d0) - (s1 - s0)) / seconds)
    return res


def measure(target: Target, photos: list[Photo], args: argparse.Namespace) -> dict[str, PhaseResult]:
    """The three phases against one server. A phase during which other processes used more than
    --max-others % of a core is measured again (after waiting for a quiet machine), up to --retries times."""
    everything = list(range(len(photos)))
    size_500 = [i for i, p in enumerate(photos) if p.size == SIZE_500x375]
    phases = [("c1", everything, 1), ("c1_500x375", size_500, 1), ("c32", everything, 32)]
    out = {}
    for name, indices, conc in phases:
        for attempt in range(args.retries + 1):
            r = asyncio.run(_run_phase(target, photos, indices, name, conc, args.warmup, args.seconds))
            _log(f"  {target.name} {name}: p50 {r.pct(50):.1f} ms, p99 {r.pct(99):.1f} ms, {r.img_s:.1f} img/s, "
                 f"{r.failures} failed, driver {r.driver_cpu_pct:.0f}% of a core, others {r.others_cpu_pct:.0f}%")
            for e in r.errors:
                _log(f"    {e}")
            if r.others_cpu_pct <= args.max_others or attempt == args.retries:
                break
            _log(f"  other processes used {r.others_cpu_pct:.0f}% of a core: measuring {name} again")
            _wait_quiet(args.max_others, args.quiet_timeout)
        out[name] = r
    return out


# --------------------------------------------------------------------------------------------
# peers (issue 17): other serving frameworks on felis's own graph and preprocessing


@dataclass
class PeerConfig:
    name: str  # --peers key
    title: str
    script: str  # under bench/peers/
    ready_path: str  # GET: 200 once the model answers
    knobs: str  # recorded beside the figures
    max_batch: int = 32
    delay_ms: float = 2.0
    threads: int = 2  # ONNX Runtime intra-op threads: felis's budget on this 2-vCPU machine
    workers: int = 1
    server: str = ""  # which peer (venv folder, script's family) when the key names a variant; "" = name
    documented: bool = True  # its docs' recommended setup; False: tuned by us, reported, not a target

    @property
    def kind(self) -> str:
        return self.server or self.name


PEERS = {
    "litserve": PeerConfig("litserve", "LitServe", "litserve_server.py", "/health",
                           "LitServe 0.2.19, LitAPI(max_batch_size=32, batch_timeout=0.002 s), "
                           "workers_per_device=1, accelerator cpu, ORT 2 intra-op threads; multipart field 'content'"),
    "bentoml": PeerConfig("bentoml", "BentoML", "bentoml_service.py", "/readyz",
                          "BentoML 1.4.40, @bentoml.service(workers=1, resources cpu 2), "
                          "@bentoml.api(batchable=True, max_batch_size=32, max_latency_ms=1000) (adaptive "
                          "batching: the window is chosen by its dispatcher), ORT 2 intra-op threads; "
                          "multipart field 'images' (pathlib.Path: felis decodes the bytes)"),
    "pytriton": PeerConfig("pytriton", "PyTriton", "pytriton_server.py", "/v2/models/felis/ready",
                           "nvidia-pytriton 0.7.0 (Triton server in its wheel), ModelConfig(max_batch_size=32, "
                           "batcher=DynamicBatcher(max_queue_delay_microseconds=2000)), 1 model instance, @batch, "
                           "ORT 2 intra-op threads; KServe v2 infer, binary tensor data (as tritonclient sends)"),
    # felis's own threading given to LitServe: a one-thread session on each core (two inference
    # worker processes, each with its model); reported beside the targets, which are the documented setups
    "litserve-2x1": PeerConfig("litserve-2x1", "LitServe 2x1 (tuned)", "litserve_server.py", "/health",
                               "LitServe 0.2.19 as above, but workers_per_device=2 (two inference processes, "
                               "a model each), ORT 1 intra-op thread each: felis's threading, tuned by us",
                               threads=1, workers=2, server="litserve", documented=False),
}


def parse_peers(value: str) -> list[PeerConfig]:
    """`--peers litserve,bentoml,pytriton` (or 'none' / '') -> their configs, in the order given."""
    names = [n.strip() for n in value.split(",") if n.strip() and n.strip() != "none"]
    unknown = [n for n in names if n not in PEERS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown peer(s) {', '.join(unknown)}; choose from {', '.join(PEERS)}")
    if len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"a peer named twice in {value!r}")
    return [PEERS[n] for n in names]


def peer_command(cfg: PeerConfig, venv: Path, model: Path, port: int) -> tuple[list[str], dict[str, str]]:
    """The command line and extra environment that start a peer from bench/peers/ in its venv."""
    py = venv / "bin" / "python"
    env = {"PYTHONUNBUFFERED": "1"}
    if cfg.kind == "bentoml":  # `bentoml serve` takes no script arguments: the service reads its settings here
        env.update({"FELIS_PEER_MODEL": str(model), "FELIS_PEER_MAX_BATCH": str(cfg.max_batch),
                    "FELIS_PEER_MAX_LATENCY_MS": "1000", "FELIS_PEER_THREADS": str(cfg.threads),
                    "FELIS_PEER_WORKERS": str(cfg.workers)})
        return [str(venv / "bin" / "bentoml"), "serve", "bentoml_service:Felis", "--host", "127.0.0.1",
                "--port", str(port)], env
    cmd = [str(py), cfg.script, "--model", str(model), "--port", str(port), "--max-batch", str(cfg.max_batch),
           "--delay-ms", str(cfg.delay_ms), "--threads", str(cfg.threads), "--workers", str(cfg.workers)]
    if cfg.kind == "pytriton":
        # Triton's Python-backend stub for 3.11 links libpython3.11.so.1.0; without this it finds the
        # system's (Debian 3.11.2) and runs the venv's 3.11.7 stdlib on it: "'_thread.RLock' object has no
        # attribute '_recursion_count'" when the model loads. The venv's own interpreter's library fixes it.
        base = Path(os.path.realpath(py)).parent.parent / "lib"
        env["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [str(base), os.environ.get("LD_LIBRARY_PATH")]))
        cmd += ["--grpc-port", str(free_port()), "--metrics-port", str(free_port())]
    return cmd, env


class Peer:
    """A peer server in its own session (process group), stopped with the whole group."""

    def __init__(self, cfg: PeerConfig, venv: Path, model: Path, workdir: Path):
        self.cfg, self.port = cfg, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd, extra = peer_command(cfg, venv, model, self.port)
        env = dict(os.environ)
        env.update(extra)
        self.log_path = workdir / f"peer-{cfg.name}.log"
        self._log = open(self.log_path, "ab")
        self.popen = subprocess.Popen(cmd, cwd=BENCH / "peers", env=env, stdout=self._log, stderr=subprocess.STDOUT,
                                      start_new_session=True)

    def wait_ready(self, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.popen.poll() is not None:
                raise StartFailed(f"{self.cfg.title} exited ({self.popen.returncode}):\n{_tail(self.log_path)}")
            try:
                if httpx.get(self.url + self.cfg.ready_path, timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise StartFailed(f"{self.cfg.title} not ready within {timeout:.0f} s:\n{_tail(self.log_path)}")

    @property
    def pids(self) -> list[int]:
        return _tree(self.popen.pid)

    def stop(self) -> None:
        pids = self.pids
        try:
            os.killpg(self.popen.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        deadline = time.monotonic() + 20
        while any(_alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.2)
        for p in pids:  # children that left the group (Triton's stubs) or ignored SIGTERM
            if _alive(p):
                try:
                    os.kill(p, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        self.popen.wait(timeout=10)
        self._log.close()


def multipart_request(host: str, path: str, field_name: str, photo: Photo) -> bytes:
    body = (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"{field_name}\"; filename=\"{photo.path.name}\"\r\n"
            f"Content-Type: image/jpeg\r\n\r\n").encode() + photo.data + f"\r\n--{BOUNDARY}--\r\n".encode()
    head = (f"POST {path} HTTP/1.1\r\nHost: {host}\r\n"
            f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\nContent-Length: {len(body)}\r\n\r\n")
    return head.encode() + body


def pytriton_request(host: str, photo: Photo) -> bytes:
    """KServe v2 infer to Triton as tritonclient (PyTriton's ModelClient) sends it: one BYTES element
    with a batch dimension ([1, 1]) in the binary tensor data extension, the label output binary."""
    data = len(photo.data).to_bytes(4, "little") + photo.data
    head = json.dumps({"inputs": [{"name": "image", "shape": [1, 1], "datatype": "BYTES",
                                   "parameters": {"binary_data_size": len(data)}}],
                       "outputs": [{"name": "label", "parameters": {"binary_data": True}}]}).encode()
    request = (f"POST /v2/models/felis/infer HTTP/1.1\r\nHost: {host}\r\n"
               f"Inference-Header-Content-Length: {len(head)}\r\nContent-Length: {len(head) + len(data)}\r\n\r\n")
    return request.encode() + head + data


def peer_request(cfg: PeerConfig, host: str, photo: Photo) -> bytes:
    """The request each peer's docs show for one image."""
    if cfg.kind == "litserve":
        return multipart_request(host, "/predict", "content", photo)
    if cfg.kind == "bentoml":
        return multipart_request(host, "/predict", "images", photo)
    return pytriton_request(host, photo)


def peer_top(body: bytes) -> str:
    """LitServe answers {"label": ...}; BentoML a batchable API's list of them; PyTriton binary OIP."""
    if body[:1] in (b"{", b"[") and b'"outputs"' not in body[:200]:
        out = json.loads(body)
        return (out[0] if isinstance(out, list) else out)["label"]
    return oip_top(body)


def check_peer_targets(rounds: list[list[ServerRun]]) -> list[tuple[str, str, bool | None]]:
    """Issue 17, per round: felis c=32 img/s >= 1.3x the best documented peer's; felis c=1 p50 <= the best
    documented peer's (a peer tuned by us is reported beside them, not judged)."""
    out = []
    for i, runs in enumerate(rounds, 1):
        felis, peers = runs[0], [r for r in runs[1:] if r.documented]
        if not peers:
            continue
        best = max(peers, key=lambda r: r.phases["c32"].img_s)
        c32 = felis.phases["c32"].img_s
        ratio = c32 / best.phases["c32"].img_s if best.phases["c32"].img_s else float("inf")
        out.append((f"round {i}: felis c=32 >= {PEER_TARGETS['c32_ratio']:.1f}x the best peer ({best.title})",
                    f"{ratio:.2f}x ({c32:.1f} vs {best.phases['c32'].img_s:.1f} img/s)",
                    ratio >= PEER_TARGETS["c32_ratio"]))
        fastest = min(peers, key=lambda r: r.phases["c1"].pct(50))
        p50, q50 = felis.phases["c1"].pct(50), fastest.phases["c1"].pct(50)
        out.append((f"round {i}: felis c=1 p50 <= the best peer's ({fastest.title})",
                    f"{p50:.1f} vs {q50:.1f} ms", p50 <= PEER_TARGETS["c1_p50_ratio"] * q50))
    return out


# --------------------------------------------------------------------------------------------
# report


@dataclass
class ServerRun:
    title: str
    phases: dict[str, PhaseResult]
    rss_mb: float
    hwm_mb: float
    note: str
    documented: bool = True  # a peer in its docs' setup (the targets' peers), or felis


def _fmt(v: float, digits: int = 1) -> str:
    return "n/a" if v != v else f"{v:.{digits}f}"


def table(runs: list[ServerRun]) -> str:
    """Metrics down, servers across, then felis's ratio to each TorchServe configuration."""
    others = runs[1:]
    rows = [  # label, value of a run, digits
        ("c=1 p50 latency, ms (all test photos)", lambda r: r.phases["c1"].pct(50), 1),
        ("c=1 p99 latency, ms", lambda r: r.phases["c1"].pct(99), 1),
        ("c=1 throughput, img/s", lambda r: r.phases["c1"].img_s, 1),
        ("c=1 p50 latency, ms (500x375 JPEGs)", lambda r: r.phases["c1_500x375"].pct(50), 1),
        ("c=1 p99 latency, ms (500x375 JPEGs)", lambda r: r.phases["c1_500x375"].pct(99), 1),
        ("c=32 p50 latency, ms", lambda r: r.phases["c32"].pct(50), 1),
        ("c=32 p99 latency, ms", lambda r: r.phases["c32"].pct(99), 1),
        ("c=32 throughput, img/s", lambda r: r.phases["c32"].img_s, 1),
        ("failed requests (all phases)", lambda r: float(sum(p.failures for p in r.phases.values())), 0),
        ("server CPU per image at c=32, ms", lambda r: r.phases["c32"].server_cpu_ms_per_img, 1),
        ("server memory after the load (RSS), MiB", lambda r: r.rss_mb, 0),
        ("top-1 accuracy on the answered test photos, %",
         lambda r: 100 * sum(p.correct for p in r.phases.values()) / max(1, sum(p.ok for p in r.phases.values())), 1),
        ("load driver CPU, % of one core (c=32)", lambda r: r.phases["c32"].driver_cpu_pct, 0),
        ("other processes' CPU, % of one core (c=32)", lambda r: r.phases["c32"].others_cpu_pct, 0),
    ]
    head = ["", *(r.title for r in runs), *(f"felis / {o.title}" for o in others)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, get, digits in rows:
        vals = [get(r) for r in runs]
        cells = [label, *(_fmt(v, digits) for v in vals)]
        for o in vals[1:]:  # felis / other, for the speed and cost rows
            ratio = vals[0] / o if label.startswith(("c=", "server")) and o and o == o else float("nan")
            cells.append("" if ratio != ratio else f"{ratio:.2f}x")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def check_targets(runs: list[ServerRun]) -> list[tuple[str, str, bool | None]]:
    """(target, measured, met); met is None for a figure that is reported, not judged."""
    felis, others = runs[0], [r for r in runs[1:] if not r.title.startswith("felis")]  # TorchServe's runs
    c32 = felis.phases["c32"].img_s
    stock = [o.phases["c32"].img_s for o in others if o.title == TORCHSERVE_CONFIGS["stock"].title]
    best_ts = max((o.phases["c32"].img_s for o in others), default=float("nan"))
    failures = sum(p.failures for r in runs for p in r.phases.values())
    p50 = felis.phases["c1_500x375"].pct(50)
    return [
        # the comparison: TorchServe with its stock handler, as its users run it
        (f"c=32: felis >= {TARGETS['c32_ratio']:.0f}x TorchServe's img/s (stock handler and settings, as its users run it)",
         f"{c32 / stock[0]:.2f}x ({c32:.1f} vs {stock[0]:.1f})" if stock else "no stock TorchServe run",
         bool(stock) and c32 >= TARGETS["c32_ratio"] * stock[0]),
        ("c=32: felis vs the strongest TorchServe configuration here (batching and malloc tuning added by us)",
         f"{c32 / best_ts:.2f}x ({c32:.1f} vs {best_ts:.1f})" if others else "no TorchServe run", None),
        (f"c=32: felis >= {TARGETS['c32_img_s']:.0f} img/s", f"{c32:.1f}", c32 >= TARGETS["c32_img_s"]),
        (f"c=1: felis p50 <= {TARGETS['c1_500x375_p50_ms']:.0f} ms on 500x375 JPEGs", f"{p50:.1f} ms",
         p50 <= TARGETS["c1_500x375_p50_ms"]),
        ("no failed request (any server, any phase)", str(failures), failures == 0),
        (f"felis API RSS after the load < {TARGETS['felis_rss_mb']:.0f} MB", f"{felis.rss_mb:.0f} MiB",
         felis.rss_mb < TARGETS["felis_rss_mb"]),
    ]


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("onnxruntime", "torch", "torchserve", "torch-model-archiver", "fastapi", "uvicorn", "pillow", "numpy"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "not installed"
    try:
        java = subprocess.run(["java", "-version"], capture_output=True, text=True, timeout=30).stderr.splitlines()[0]
        out["java"] = java.split('"')[1] if '"' in java else java
    except (OSError, subprocess.SubprocessError, IndexError):
        out["java"] = "?"
    return out


def _revision() -> str:
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=ROOT, capture_output=True, text=True,
                             timeout=30)
        return out.stdout.strip() or "?"
    except (OSError, subprocess.SubprocessError):
        return "?"


def _machine() -> str:
    model = "?"
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        m = re.search(r"^Model name:\s+(.+)$", out, re.M)
        model = m.group(1).strip() if m else model
    except (OSError, subprocess.SubprocessError):
        pass
    mem = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30)
    return f"{model}, {os.cpu_count()} vCPU, {mem} GiB RAM, {platform.system()} {platform.release()}"


def report(runs: list[ServerRun], args: argparse.Namespace, meta: dict) -> str:
    targets = check_targets(runs)
    lines = [
        f"Run {meta['date']} on {meta['machine']}. Before the first phase other processes used "
        f"{meta['busy_before']:.0f}% of a core (load average {meta['load_before']:.2f}); load average "
        f"{meta['load_after']:.2f} after the last phase.",
        "",
        f"felis at `{meta['revision']}`. Versions: " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()) + ".",
        "",
        f"Command: `{meta['command']}`",
        "",
        f"Model: {meta['model_source']} ({meta['model']}); "
        f"{meta['photos']} test photos, {meta['photos_500']} of them 500x375. "
        f"Each phase: {args.warmup:g} s warm-up, then {args.seconds:g} s measured; one image per request.",
        "",
        "Servers: " + "; ".join(f"**{r.title}**: {r.note}" for r in runs) + ".",
        "",
        table(runs),
        "",
        "Targets (issue 3):",
        "",
        *(f"- {'reported' if ok is None else 'met' if ok else 'MISSED'}: {what}: {value}" for what, value, ok in targets),
    ]
    return "\n".join(lines)


BEGIN, END = "<!-- bench/serve.py: begin -->", "<!-- bench/serve.py: end -->"


def write_results(path: Path, body: str) -> None:
    """Replace the generated part of the "Serving" section; create the section (or the file) if absent."""
    block = f"{BEGIN}\n{body}\n{END}"
    text = path.read_text() if path.exists() else ""
    if BEGIN in text and END in text:
        text = text[:text.index(BEGIN)] + block + text[text.index(END) + len(END):]
    elif "## Serving" in text:
        start = text.index("## Serving")
        nxt = text.find("\n## ", start + 1)
        insert = len(text) if nxt < 0 else nxt
        text = text[:insert].rstrip("\n") + "\n\n" + block + "\n" + text[insert:]
    else:
        text = (text.rstrip("\n") + "\n\n" if text else "# Benchmarks\n\n") + "## Serving\n\n" + block + "\n"
    path.write_text(text)


# --------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=20, help="measured seconds per phase (default 20)")
    p.add_argument("--warmup", type=float, default=3, help="warm-up seconds per phase (default 3)")
    p.add_argument("--checkpoint", type=Path, help="a felis checkpoint file to serve instead of training one")
    p.add_argument("--data-dir", type=Path, help="felis data dir to use and keep (default: a temporary one); "
                   "a dataset 'bench' with a default version there is reused")
    p.add_argument("--felis-env", action="append", default=[], metavar="FELIS_X=V",
                   help="a setting for the measured felis API (repeatable), e.g. FELIS_PREDICT_MAX_WAIT_MS=0")
    p.add_argument("--oip", nargs="?", const="after", choices=("after", "before"),
                   help="also measure felis's Open Inference Protocol route (/v2/models/{name}/infer, binary tensor "
                   "data) on the same process, after /v1 predict (or before: alternate to pair rounds)")
    p.add_argument("--torchserve", default="stock,batch32,tuned",
                   help=f"TorchServe configurations, comma-separated, from {', '.join(TORCHSERVE_CONFIGS)} "
                   "(default: all); 'none' for felis alone")
    p.add_argument("--peers", type=parse_peers, default=[], metavar="NAMES",
                   help=f"other serving frameworks, comma-separated, from {', '.join(PEERS)} (issue 17): measured "
                   "in interleaved rounds with felis instead of the TorchServe comparison")
    p.add_argument("--peer-venvs", type=Path, default=Path("/tmp/peer-venvs"),
                   help="folder of the peers' venvs, one per peer name (default /tmp/peer-venvs)")
    p.add_argument("--rounds", type=int, default=2, help="with --peers: rounds of felis then each peer (default 2)")
    p.add_argument("--torchserve-format", choices=("eager", "torchscript"), default="eager",
                   help="how TorchServe gets the network: eager model file + state_dict (default) or TorchScript")
    p.add_argument("--train-options", default="{}", help="JSON body of the training request (default {}: felis's "
                   "defaults); a --data-dir that already has a version ignores it")
    p.add_argument("--train-timeout", type=float, default=3600)
    p.add_argument("--max-others", type=float, default=20,
                   help="wait until other processes use at most this %% of one core before measuring, and measure "
                   "a phase again when they used more during it (default 20)")
    p.add_argument("--quiet-timeout", type=float, default=300, help="longest wait for a quiet machine, seconds")
    p.add_argument("--retries", type=int, default=2, help="at most this many repeats of a busy phase")
    p.add_argument("--write-results", action="store_true", help="write the Serving section of bench/RESULTS.md")
    p.add_argument("--results", type=Path, default=BENCH / "RESULTS.md")
    p.add_argument("--no-targets", action="store_true", help="report the targets but exit 0 when one is missed")
    p.add_argument("--keep", action="store_true", help="keep the working folder (logs, archives)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.chdir(ROOT)
    extra_env = dict(kv.split("=", 1) for kv in args.felis_env)
    configs = [] if args.torchserve == "none" else [TORCHSERVE_CONFIGS[n] for n in args.torchserve.split(",") if n]
    workdir = Path(tempfile.mkdtemp(prefix="felis-bench-serve-"))
    data_dir = (args.data_dir or workdir / "felis-data").resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    _log(f"working folder {workdir}, felis data {data_dir}")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the finally blocks: stop every server
    running: list = []
    revision = _revision()  # the code the servers run, before anyone commits during the run
    try:
        if args.checkpoint:
            ckpt_bytes = args.checkpoint.read_bytes()
            register_checkpoint(args.checkpoint, data_dir)
        else:
            ckpt_bytes = train_in_felis(data_dir, workdir, json.loads(args.train_options), args.train_timeout)
        (workdir / "felis-checkpoint.pt").write_bytes(ckpt_bytes)
        model_desc = describe_checkpoint(ckpt_bytes)
        store, mars, _ = (build_archive(ckpt_bytes, workdir, args.torchserve_format, configs)
                          if configs else (None, {}, []))
        photos = load_photos()
        if args.peers:
            return peer_rounds(args, argv, data_dir, workdir, photos, extra_env, model_desc, revision, running)
        busy_before = _wait_quiet(args.max_others, args.quiet_timeout)
        load_before = os.getloadavg()[0]
        runs: list[ServerRun] = []

        _log("felis: starting the API")
        felis = Felis("api", data_dir, workdir / "felis-api.log", extra_env)
        running.append(felis)
        felis.wait_ready()
        host = f"127.0.0.1:{felis.port}"
        target = Target("felis", felis.port, [felis_request(host, p) for p in photos], felis_top,
                        lambda: [felis.popen.pid])
        oip_target = Target("felis v2 (OIP)", felis.port, [oip_request(host, p) for p in photos], oip_top,
                            lambda: [felis.popen.pid])
        if args.oip == "before":  # the same process and model: the Open Inference Protocol route first
            oip_phases = measure(oip_target, photos, args)
            oip_rss, oip_hwm = _rss_mb([felis.popen.pid])
        phases = measure(target, photos, args)
        rss, hwm = _rss_mb([felis.popen.pid])
        if args.oip == "after":  # or right after /v1
            oip_phases = measure(oip_target, photos, args)
            oip_rss, oip_hwm = _rss_mb([felis.popen.pid])
        runs.append(ServerRun("felis", phases, rss, hwm,
                              f"`felis api` (1 uvicorn process), ONNX Runtime, micro-batching "
                              f"({' '.join(args.felis_env) or 'FELIS_PREDICT_MAX_BATCH/MAX_WAIT_MS defaults'}), "
                              f"API process VmRSS {rss:.0f} MiB "
                              f"(peak {hwm:.0f} MiB), rate limit off"))
        if args.oip:
            runs.append(ServerRun("felis v2 (OIP)", oip_phases, oip_rss, oip_hwm,
                                  f"the same `felis api` process, measured {args.oip} /v1, POST /v2/models/{{name}}/infer "
                                  f"with the binary tensor data extension (as tritonclient sends it), all outputs binary"))
        felis.stop()
        running.remove(felis)

        for cfg in configs:
            _log(f"TorchServe ({cfg.name}): starting")
            ts = TorchServe(workdir, store, mars[cfg.name], cfg, repo_on_path=args.torchserve_format == "eager")
            running.append(ts)
            ts.wait_ready()
            host = f"127.0.0.1:{ts.port}"
            target = Target(cfg.title, ts.port, [torchserve_request(host, TS_MODEL, p) for p in photos], torchserve_top,
                            lambda ts=ts: ts.pids)
            phases = measure(target, photos, args)
            rss, hwm = _rss_mb(ts.pids)
            workers = f"{ts.workers} worker{'s' if ts.workers > 1 else ''}" + (
                " (default: one per CPU)" if cfg.workers is None else "")
            batching = (f"batch_size {cfg.batch_size}, max_batch_delay {cfg.max_batch_delay_ms} ms"
                        if cfg.batch_size > 1 else "no batching (default batch_size 1)")
            if cfg.malloc_tuned:
                batching += ", MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=1GiB"
            runs.append(ServerRun(cfg.title, phases, rss, hwm,
                                  f"{args.torchserve_format} PyTorch, stock image_classifier handler, {workers}, "
                                  f"{batching}; RSS of the Java frontend plus workers"))
            ts.stop()
            running.remove(ts)

        meta = {
            "model_source": (f"felis checkpoint {args.checkpoint.name}" if args.checkpoint else
                             "felis version trained here with " + (f"options {args.train_options}"
                                                                   if json.loads(args.train_options) else "default options")),
            "date": dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
            "machine": _machine(), "versions": _versions(), "revision": revision, "model": model_desc,
            "load_before": load_before, "load_after": os.getloadavg()[0], "busy_before": busy_before,
            "photos": len(photos), "photos_500": sum(p.size == SIZE_500x375 for p in photos),
            "command": shlex.join([".venv/bin/python", "bench/serve.py", *(argv if argv is not None else sys.argv[1:])]),
        }
        text = report(runs, args, meta)
        print(text)
        if args.write_results:
            write_results(args.results, text)
            _log(f"wrote {args.results}")
        missed = [t for t in check_targets(runs) if t[2] is False]
        return 0 if args.no_targets or not missed else 1
    except StartFailed as e:
        _log(f"a server failed to start: {e}")
        return 2
    finally:
        for server in reversed(running):
            server.stop()
        if args.keep or args.data_dir:
            _log(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


def download_onnx(url: str, dest: Path) -> Path:
    """The served graph of the dataset's default version, from the felis under test."""
    version = _default_version(url)
    r = httpx.get(f"{url}/v1/datasets/{DATASET}/models/{version}/download", params={"format": "onnx"}, timeout=120)
    r.raise_for_status()
    dest.write_bytes(r.content)
    _log(f"felis version {version}: ONNX graph {len(r.content) / 1e6:.1f} MB -> {dest}")
    return dest


def peer_rounds(args, argv, data_dir: Path, workdir: Path, photos: list[Photo], extra_env: dict, model_desc: str,
                revision: str, running: list) -> int:
    """Issue 17: rounds of felis then each peer, one server at a time, the same phases and photos."""
    venvs = {cfg.name: args.peer_venvs / cfg.kind for cfg in args.peers}
    missing = [n for n, v in venvs.items() if not (v / "bin" / "python").exists()]
    if missing:
        raise StartFailed(f"no venv for {', '.join(missing)} under {args.peer_venvs} (see bench/peers/README.md)")
    busy_before = _wait_quiet(args.max_others, args.quiet_timeout)
    load_before = os.getloadavg()[0]
    model = None
    rounds: list[list[ServerRun]] = []
    for rnd in range(1, args.rounds + 1):
        runs: list[ServerRun] = []
        _log(f"round {rnd}: felis")
        felis = Felis("api", data_dir, workdir / "felis-api.log", extra_env)
        running.append(felis)
        felis.wait_ready()
        model = model or download_onnx(felis.url, workdir / "felis.onnx")
        host = f"127.0.0.1:{felis.port}"
        phases = measure(Target("felis", felis.port, [felis_request(host, p) for p in photos], felis_top,
                                lambda: [felis.popen.pid]), photos, args)
        rss, hwm = _rss_mb([felis.popen.pid])
        runs.append(ServerRun("felis", phases, rss, hwm, "`felis api`, defaults, rate limit off"))
        felis.stop()
        running.remove(felis)
        for cfg in args.peers:
            _log(f"round {rnd}: {cfg.title}")
            peer = Peer(cfg, venvs[cfg.name], model, workdir)
            running.append(peer)
            peer.wait_ready()
            host = f"127.0.0.1:{peer.port}"
            phases = measure(Target(cfg.title, peer.port, [peer_request(cfg, host, p) for p in photos], peer_top,
                                    lambda peer=peer: peer.pids), photos, args)
            rss, hwm = _rss_mb(peer.pids)
            runs.append(ServerRun(cfg.title, phases, rss, hwm, cfg.knobs, cfg.documented))
            peer.stop()
            running.remove(peer)
        rounds.append(runs)
    targets = check_peer_targets(rounds)
    lines = [
        f"Run {dt.datetime.now().astimezone().strftime('%Y-%m-%d %H:%M %Z')} on {_machine()}. Before the first "
        f"phase other processes used {busy_before:.0f}% of a core (load average {load_before:.2f}); load average "
        f"{os.getloadavg()[0]:.2f} after the last.",
        "", f"felis at `{revision}`. Command: `{shlex.join(['.venv/bin/python', 'bench/serve.py', *(argv if argv is not None else sys.argv[1:])])}`",
        "", f"Model: {model_desc}. {len(photos)} test photos, {sum(p.size == SIZE_500x375 for p in photos)} of them 500x375; "
        f"each phase {args.warmup:g} s warm-up then {args.seconds:g} s measured, one image per request.",
        "", "Peers: " + "; ".join(f"**{c.title}**: {c.knobs}" for c in args.peers) + ".",
    ]
    for i, runs in enumerate(rounds, 1):
        lines += ["", f"Round {i}:", "", table(runs)]
    lines += ["", "Targets (issue 17):", "",
              *(f"- {'met' if ok else 'MISSED'}: {what}: {value}" for what, value, ok in targets)]
    text = "\n".join(lines)
    print(text)
    (workdir / "peers-report.md").write_text(text)
    missed = [t for t in targets if t[2] is False]
    return 0 if args.no_targets or not missed else 1


def describe_checkpoint(ckpt_bytes: bytes) -> str:
    from models.checkpoint import load_checkpoint

    ckpt = load_checkpoint(ckpt_bytes)
    arch, prep = ckpt["architecture"], ckpt["preprocessing"]
    return (f"{arch['name']} at {arch['image_size']}x{arch['image_size']} px, {ckpt['mode']} mode, "
            f"{arch.get('pooling', 'avg')} pooling, labels {', '.join(ckpt['labels'])}; felis serves it in "
            f"{ckpt.get('precision', 'fp32').upper()} (TorchServe: the float32 weights); felis preprocessing: "
            f"{prep['resize']} {prep['crop_fraction']}, (x - {prep['mean']}) / {prep['std']}")


_REGISTER = """
import sys
from service.domain import datasets, versions
from service.domain.pipeline import import_checkpoint
from service.errors import NotFound
from service.store.blobs import get_store
from service.store.db import init_db, new_session

init_db()
session = new_session()
try:
    try:
        dataset = datasets.get(session, sys.argv[2])
    except NotFound:
        dataset = datasets.create(session, sys.argv[2])
        session.commit()
    version = import_checkpoint(session, get_store(), dataset, open(sys.argv[1], "rb").read())
    versions.promote(session, sys.argv[2], version)
    print(version)
finally:
    session.close()
"""


def register_checkpoint(ckpt_path: Path, data_dir: Path) -> None:
    """Make a downloaded checkpoint the default version of dataset 'bench' in felis's data dir, the way a
    finished training records one (checkpoint and ONNX blobs, a version row), with felis's own functions."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FELIS_")}
    env["FELIS_DATA_DIR"] = str(data_dir)
    out = subprocess.run([sys.executable, "-c", _REGISTER, str(ckpt_path.resolve()), DATASET], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    if out.returncode != 0:
        raise RuntimeError(f"registering {ckpt_path} failed:\n{out.stderr[-3000:]}")
    _log(f"{ckpt_path}: felis version {out.stdout.strip()} of dataset {DATASET!r}")


if __name__ == "__main__":
    sys.exit(main())
