"""GPU check for issues 7 and 17: is felis fast on a CUDA card? One command a call of the device tool.

    python bench/gpu_check.py [--datasets DIR] [--json OUT]
    python bench/gpu_check.py --dry-run-cpu     # every phase on CPU, tiny sizes, torch features as on CUDA (tests/bench/test_gpu_check.py)
    python bench/gpu_check.py --phases finetune # some phases only (the fine-tune phase needs no photos)
    python bench/gpu_check.py --phases warmup,scale,predict --deadline 480   # issue 17: CIFAR-10 and a few photos/test only

Phases, each bounded in time; a watchdog prints what was measured and exits 3 at --deadline seconds:
  environment  the card (name, capability, memory), torch / CUDA / cuDNN versions, CPU threads
  warm-up      the worker's one-time start in this process: CUDA context, then a tiny training ("first CUDA steps");
               from photos/train, or from CIFAR-10 when only that was sent
  photos       models.train.train exactly as the worker calls it (default TrainConfig, device="cuda", pHashes
               precomputed as the service does at upload): cold (empty MemoryFeatureCache) then warm (filled);
               then cold with precision fp32 (features from torch on the GPU instead of INT8 ONNX Runtime on the CPU);
               the cold model scored on photos/test through its exported graph (Predictor.from_onnx), as served
  task         service.domain.pipeline.run_training, what the worker's Celery task runs, in this warm process: photos/train
               uploaded through the service's ingest into a temporary embedded store, then trained cold and warm;
               timed from the task's start to its return (blob reads, training, checkpoint + ONNX writes, version row)
  fine-tune    EfficientNet-Lite0, 224 px, built as models/finetune.py does (build_classifier + load_pretrained),
               uint8 images resident on the GPU, bf16 autocast, channels_last, cudnn.benchmark, AdamW:
               a lean step loop (eager), models.finetune.train_network as shipped (the worker's loop), then
               the lean loop under torch.compile; steady img/s after warm-up steps
  scale        issue 17: CIFAR-10's 50,000 training images (cifar10/cifar10-train.tar.gz under --datasets, cat / other)
               through uploads.ingest into a temporary embedded store; both extractors timed on 5,000 of them
               (INT8 ONNX Runtime on the CPU cores, fp32 torch on the GPU); then run_training cold with the faster, and warm
  predict      the scale phase's model at 256 requests in flight through the service's MicroBatcher (decode threads as
               the API's): its weights in torch on the GPU, then its exported graph in ONNX Runtime on the CPU cores;
               photos/test when sent, else CIFAR-10 images
Goals (issue 7): photos task <= 10 s after the warm-up (train() and the whole worker task); fine-tuning >= 5,000 img/s steady; photos test accuracy
>= 99.0 % (bench/RESULTS.md target). Issue 17: the 50,000-image cold task <= 60 s; predict img/s and p50 reported.
Exit 0: every goal met; 1: a goal missed or a phase failed; 2: no CUDA device; 3: deadline reached.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import platform
import sys
import threading
import time
import traceback
from dataclasses import dataclass, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from models.runtime import cpu_count, tune_process, use_bf16  # noqa: E402

PHOTOS_GOAL_S = 10.0  # issue 7: the photos training, task time after the worker's warm-up
FINETUNE_GOAL_IMG_S = 5000.0  # issue 7: EfficientNet-Lite0 fine-tuning, steady
ACCURACY_GOAL = 0.99  # bench/RESULTS.md: photos test accuracy target
PHASES = ("warmup", "task", "photos", "finetune", "scale", "predict")


@dataclass
class Sizes:
    """How big each phase is: the real check on a GPU, or a tiny CPU dry run of the same code."""

    warmup_images: int  # per label, for the warm-up training
    train_images: int | None  # per label from photos/train (None: all 600 + 600)
    test_images: int | None  # per label from photos/test (None: all)
    finetune_size: int  # pixels per side
    finetune_batch: int  # images per step (halved on out-of-memory)
    finetune_batches: int  # resident images = batches x batch
    warmup_steps: int  # steps before timing (cudnn.benchmark autotuning, allocator)
    measure_s: float  # seconds of steady steps per fine-tune measurement
    compile_backend: str  # torch.compile backend
    compile_min_left_s: float  # skip compiling when less time than this is left before the deadline
    deadline_s: float  # seconds from the start: the watchdog ends the run here
    scale_images: int = 50_000  # CIFAR-10 training images for the scale phase (a tenth of each class)
    probe_images: int = 5_000  # images per extractor when choosing where features run
    predict_concurrency: int = 256  # requests in flight in the predict phase
    predict_batch: int = 64  # the micro-batcher's max_batch on the GPU
    predict_seconds: float = 10.0  # measured seconds per predict configuration (after 2 s of warm-up)


GPU = Sizes(warmup_images=8, train_images=None, test_images=None, finetune_size=224, finetune_batch=256, finetune_batches=4,
            warmup_steps=10, measure_s=20.0, compile_backend="inductor", compile_min_left_s=90.0, deadline_s=290.0)
DRY = Sizes(warmup_images=4, train_images=20, test_images=10, finetune_size=64, finetune_batch=8, finetune_batches=2,
            warmup_steps=2, measure_s=2.0, compile_backend="aot_eager",  # dynamo + AOTAutograd, no C++ build on 2 cores
            compile_min_left_s=10.0, deadline_s=150.0, scale_images=300, probe_images=40, predict_concurrency=8,
            predict_batch=4, predict_seconds=1.0)


def say(*args) -> None:
    print(*args, flush=True)


class Report:
    """Everything measured so far; printed as a table at the end or when the watchdog fires."""

    def __init__(self, dry_run: bool):
        self.dry_run = dry_run
        self.data: dict = {"dry_run": dry_run, "environment": {}, "phases": {}}
        self.errors: list[str] = []
        self.phase = "environment"
        self.artifacts: dict = {}  # what one phase hands the next (the scale phase's model for predict)
        self.lock = threading.Lock()

    def error(self, phase: str, e: BaseException) -> None:
        msg = f"{type(e).__name__}: {e}"
        self.errors.append(f"{phase}: {msg}")
        self.data["phases"].setdefault(phase, {})["error"] = msg
        say(f"  {phase} FAILED: {msg}")
        traceback.print_exc(file=sys.stdout)

    def goals(self) -> list[dict]:
        p = self.data["phases"]
        rows = [  # (label, phase, key, unit, target, higher is better, counts for the exit code)
            ("first CUDA steps (context + tiny training)", "warmup", "total_s", "s", None, False, False),
            ("photos train(), cold features", "photos", "cold_s", "s", PHOTOS_GOAL_S, False, True),
            ("photos train(), warm feature cache", "photos", "warm_s", "s", PHOTOS_GOAL_S, False, False),
            ("photos test accuracy (cold model)", "photos", "test_accuracy", "", ACCURACY_GOAL, True, True),
            ("photos worker task (run_training), cold", "task", "cold_s", "s", PHOTOS_GOAL_S, False, True),
            ("photos worker task (run_training), warm", "task", "warm_s", "s", PHOTOS_GOAL_S, False, False),
            ("fine-tune Lite0, lean loop, eager", "finetune", "eager_img_s", "img/s", FINETUNE_GOAL_IMG_S, True, True),
            ("fine-tune Lite0, train_network as shipped", "finetune", "train_network_img_s", "img/s", FINETUNE_GOAL_IMG_S, True, False),
            ("fine-tune Lite0, lean loop, torch.compile", "finetune", "compiled_img_s", "img/s", FINETUNE_GOAL_IMG_S, True, False),
            ("scale: ingest (upload path), images/s", "scale", "ingest_img_s", "img/s", None, True, False),
            ("scale: features INT8, ONNX Runtime on CPU cores", "scale", "int8_img_s", "img/s", None, True, False),
            ("scale: features fp32, torch on the GPU", "scale", "fp32_img_s", "img/s", None, True, False),
            ("scale: cold worker task (issue 17)", "scale", "cold_task_s", "s", SCALE_GOAL_S, False, True),
            ("scale: warm worker task (features cached)", "scale", "warm_task_s", "s", None, False, False),
            ("predict: torch on the GPU, img/s", "predict", "gpu_img_s", "img/s", None, True, False),
            ("predict: torch on the GPU, p50", "predict", "gpu_p50_ms", "ms", None, False, False),
            ("predict: exported graph, ONNX Runtime on CPU, img/s", "predict", "onnx_cpu_img_s", "img/s", None, True, False),
            ("predict: exported graph, ONNX Runtime on CPU, p50", "predict", "onnx_cpu_p50_ms", "ms", None, False, False),
        ]
        out = []
        for label, phase, key, unit, target, higher, counts in rows:
            value = p.get(phase, {}).get(key)
            if "skipped" in p.get(phase, {}):
                verdict = "skipped"
            elif value is None:
                verdict = "not run"
            elif target is None:
                verdict = "info"
            elif self.dry_run:
                verdict = "n/a (dry run)"
            else:
                verdict = "PASS" if (value >= target if higher else value <= target) else "FAIL"
            out.append({"goal": label, "value": value, "unit": unit, "target": target, "higher_is_better": higher,
                        "verdict": verdict, "counts": counts})
        return out

    def summary(self, json_path: Path | None, note: str = "") -> int:
        with self.lock:
            goals = self.goals()
            self.data["goals"], self.data["errors"] = goals, self.errors
            env = self.data["environment"]
            say(f"\n== summary: {env.get('card', 'CPU dry run' if self.dry_run else 'no GPU')}, torch {env.get('torch')}"
                + (f" ({note})" if note else ""))
            say(f"{'goal':46s} {'measured':>14s} {'target':>16s}  verdict")
            for g in goals:
                v, t, u = g["value"], g["target"], g["unit"]
                fmt = (lambda x: f"{100 * x:.2f} %") if u == "" else (lambda x: f"{x:,.1f} {u}" if u in ("s", "ms") else f"{x:,.0f} {u}")
                target = "-" if t is None else ("<= " if not g["higher_is_better"] else ">= ") + fmt(t)
                say(f"{g['goal']:46s} {fmt(v) if v is not None else '-':>14s} {target:>16s}  {g['verdict']}")
            for e in self.errors:
                say(f"error in {e}")
            failed = any(g["verdict"] == "FAIL" and g["counts"] for g in goals)
            missing = any(g["verdict"] == "not run" and g["counts"] for g in goals) and not self.dry_run
            if json_path:
                json_path.write_text(json.dumps(self.data, indent=1, default=str))
                say(f"wrote {json_path}")
            return 1 if failed or missing or self.errors else 0


# ---------------------------------------------------------------- environment


def environment(report: Report) -> None:
    env = report.data["environment"]
    env.update(python=platform.python_version(), torch=torch.__version__, cuda=torch.version.cuda,
               cudnn=torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
               cpu_threads=cpu_count(), cuda_available=torch.cuda.is_available(), host=platform.node())
    t = time.perf_counter()
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)  # the process's first CUDA call: driver initialisation
        report.data["phases"]["warmup"] = {"cuda_init_s": time.perf_counter() - t}
        env.update(card=torch.cuda.get_device_name(0), capability=".".join(map(str, torch.cuda.get_device_capability(0))),
                   memory_gib=round(props.total_memory / 2**30, 1), multiprocessors=props.multi_processor_count,
                   devices=torch.cuda.device_count(), bf16=use_bf16(torch.device("cuda")))
    say("== environment")
    for k, v in env.items():
        say(f"  {k}: {v}")


# ---------------------------------------------------------------- photos: the worker's training path


def _bench_train():
    """bench/train.py as a module (its load_folder builds Samples exactly as that benchmark does)."""
    spec = importlib.util.spec_from_file_location("bench_train", ROOT / "bench" / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _subset(samples: list, per_label: int | None, last: bool = False) -> list:
    """per_label samples of each label, spread over the sorted list (all prefixes), or all."""
    if per_label is None:
        return samples
    out = []
    for label in sorted({s.label for s in samples}):
        mine = [s for s in samples if s.label == label]
        picks = mine[::-1] if last else mine
        out += picks[:: max(1, len(mine) // per_label)][:per_label]
    return out


def _train(samples, device: str, cache, **options):
    from models.train import TrainConfig, train

    t = time.perf_counter()
    result = train(samples, TrainConfig(**options), device=device, feature_cache=cache)
    return result, time.perf_counter() - t


def warmup(report: Report, device: str, photos: Path, sizes: Sizes) -> None:
    """The worker's one-time start: CUDA context, then a tiny training (cuDNN, kernels, ONNX export)."""
    report.phase = "warmup"
    say("\n== warm-up (first CUDA steps of this process)")
    out = report.data["phases"].setdefault("warmup", {})
    t = time.perf_counter()
    torch.zeros(1, device=device).add_(1)
    if device == "cuda":
        torch.cuda.synchronize()
    out["context_s"] = time.perf_counter() - t
    say(f"  CUDA driver initialisation {out.get('cuda_init_s', 0):.1f} s, context + first kernel {out['context_s']:.1f} s")
    from models.images import perceptual_hash

    if (photos / "train").is_dir():
        samples = _subset(_bench_train().load_folder(photos / "train"), sizes.warmup_images, last=True)
    else:  # a call that carries CIFAR-10 alone (the device tool sends at most 64 MiB)
        import hashlib

        from models.train import Sample

        items = _cifar(photos.parent / "cifar10" / "cifar10-train.tar.gz", 10 * sizes.warmup_images)
        cats = [i for i in items if i[1] == "cat"]
        items = cats + [i for i in items if i[1] != "cat"][: len(cats)]
        samples = [Sample(image_id=name, sha256=hashlib.sha256(data).hexdigest(), label=label, load=lambda d=data: d)
                   for name, label, data in items]
    for s in samples:
        s.phash = perceptual_hash(s.load())
    result, out["training_s"] = _train(samples, device, None)
    out["total_s"] = out.get("cuda_init_s", 0) + out["context_s"] + out["training_s"]
    say(f"  first training ({len(samples)} images): {out['training_s']:.1f} s | "
        + " ".join(f"{k} {v:.2f}s" for k, v in result.timings.items()))


def photos_phase(report: Report, device: str, photos: Path, sizes: Sizes) -> None:
    """The photos task twice through models.train.train: cold, then with the feature cache filled."""
    from models.features import MemoryFeatureCache
    from models.images import perceptual_hash
    from models.predictor import Predictor

    report.phase = "photos"
    out = report.data["phases"].setdefault("photos", {})
    bench = _bench_train()
    samples = _subset(bench.load_folder(photos / "train"), sizes.train_images)
    t = time.perf_counter()
    for s in samples:  # the service hashes at upload, so the worker's task never does
        s.phash = perceptual_hash(s.load())
    out.update(n_train=len(samples), phash_s=time.perf_counter() - t)
    say(f"\n== photos: {len(samples)} training images (pHashes precomputed in {out['phash_s']:.1f} s, as at upload)")
    cache = MemoryFeatureCache()
    # default: INT8 features in ONNX Runtime on the CPU cores (the graph predict serves); fp32: torch features
    # on the GPU under bf16 autocast, the model served in float32
    for run, options in (("cold", {}), ("warm", {}), ("fp32_cold", {"precision": "fp32"})):
        result, wall = _train(samples, device, cache, **options)
        m = result.metrics
        out[f"{run}_s"], out[f"{run}_timings"] = wall, result.timings
        out[f"{run}_validation_accuracy"], out[f"{run}_features_computed"] = m["accuracy"], m["features_computed"]
        say(f"  {run}: {wall:.1f} s (goal <= {PHOTOS_GOAL_S:.0f} s) | " + " ".join(f"{k} {v:.2f}s" for k, v in result.timings.items()))
        say(f"        validation accuracy {m['accuracy']:.4f} (n={m['n_val']}), features computed {m['features_computed']}, "
            f"extractor {m['feature_extractor']}")
        if run == "cold":
            test = [s for s in _subset(bench.load_folder(photos / "test"), sizes.test_images) if s.label in m["labels"]]
            t = time.perf_counter()
            # the served graph (INT8, ONNX Runtime on CPU); threads: keep this process's count
            pred = Predictor.from_onnx(result.onnx, threads=torch.get_num_threads())
            answers = [a for i in range(0, len(test), 64) for a in pred.predict([s.load() for s in test[i : i + 64]])]
            correct = sum(max(a, key=a.get) == s.label for a, s in zip(answers, test))
            out.update(test_accuracy=correct / len(test), n_test=len(test), test_predict_s=time.perf_counter() - t)
            say(f"  test ({len(test)} images, the exported graph in ONNX Runtime): accuracy {out['test_accuracy']:.4f} "
                f"({len(test) - correct} errors) in {out['test_predict_s']:.1f} s incl. decoding")


@contextlib.contextmanager
def _embedded_store(device: str, prefix: str, **env: str):
    """A temporary embedded felis (SQLite, local blobs) for the service's own code in this process:
    (settings, store, folder); every FELIS_ variable but FELIS_DATASETS replaced, the caches
    (settings, engine, store) reset on the way in and out."""
    import tempfile

    from service.config import get_settings
    from service.store.blobs import get_store
    from service.store.db import init_db, reset_caches

    def fresh_caches() -> None:  # settings, engine and store follow the environment
        get_settings.cache_clear()
        reset_caches()
        get_store.cache_clear()

    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        for key in [k for k in os.environ if k.startswith("FELIS_") and k != "FELIS_DATASETS"]:
            del os.environ[key]
        os.environ.update(FELIS_DATA_DIR=tmp, FELIS_DEVICE=device, **env)
        fresh_caches()
        try:
            init_db()
            yield get_settings(), get_store(), tmp
        finally:
            fresh_caches()


def _task(dataset: str, options: dict, settings, store, device: str, run: str) -> tuple[float, dict, tuple]:
    """One train request run by pipeline.run_training in this process, as the worker's task:
    (seconds from the task's start to its return, the version's metrics, (checkpoint key, ONNX key))."""
    from service.domain import trainings
    from service.domain.pipeline import run_training
    from service.store.db import session_scope
    from service.store.tables import ModelVersion, Training

    with session_scope() as s:
        training_id = trainings.request(s, dataset, options, settings).id
    t = time.perf_counter()
    state = run_training(training_id, settings=settings, store=store, device=device, worker_name="gpu-check")
    wall = time.perf_counter() - t
    with session_scope() as s:
        training = s.get(Training, training_id)
        version = s.query(ModelVersion).filter_by(training_id=training_id).one_or_none()
        error = training.error
        metrics = dict(version.metrics) if version else {}
        keys = (version.checkpoint_key, version.onnx_key) if version else (None, None)
    if state != "succeeded":
        raise RuntimeError(f"{run} training ended {state}: {error}")
    return wall, metrics, keys


def task_phase(report: Report, device: str, photos: Path, sizes: Sizes) -> None:
    """The worker's task itself: service.domain.pipeline.run_training (what worker.tasks.train runs) in this warm process.

    Embedded mode in a temporary folder: photos/train uploaded through the service's own ingest (validation, dedup,
    pHash, local blobs, SQLite), then two train requests with default options: cold (features computed and stored
    in the metadata store) and warm (features read back). Each is timed from run_training's start to its return:
    blob reads, training, checkpoint and ONNX writes, the version row: the task time of issue 7's goal.
    """
    report.phase = "task"
    out = report.data["phases"].setdefault("task", {})
    with _embedded_store(device, "felis-gpu-check-") as (settings, store, tmp):
        from service.domain import datasets, uploads
        from service.store.db import session_scope

        bench = _bench_train()
        files = _subset(bench.load_folder(photos / "train"), sizes.train_images)
        t = time.perf_counter()
        with session_scope() as s:
            ds = datasets.create(s, "photos")
            for label in sorted({f.label for f in files}):
                mine = [(f.image_id, f.load) for f in files if f.label == label]
                uploads.ingest(s, store, ds, uploads.files_candidates(mine, label), settings)
        out.update(n_images=len(files), upload_s=time.perf_counter() - t)
        say(f"\n== task: service.domain.pipeline.run_training, embedded store in {tmp}; {len(files)} images uploaded "
            f"through uploads.ingest in {out['upload_s']:.1f} s")
        for run in ("cold", "warm"):
            wall, metrics, _ = _task("photos", {}, settings, store, device, run)
            out[f"{run}_s"] = wall
            out[f"{run}_validation_accuracy"] = metrics.get("accuracy")
            out[f"{run}_features_computed"] = metrics.get("features_computed")
            say(f"  {run}: {wall:.1f} s (goal <= {PHOTOS_GOAL_S:.0f} s), validation accuracy {metrics.get('accuracy', 0):.4f}, "
                f"features computed {metrics.get('features_computed')}, precision {metrics.get('precision', '?')}")


# ---------------------------------------------------------------- scale (issue 17): 50,000 images, then predict on the GPU

CIFAR_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
SCALE_GOAL_S = 60.0  # issue 17: the 50,000-image cold training, task time on one H200 host


def _cifar(archive: Path, n: int) -> list[tuple[str, str, bytes]]:
    """(name, label, JPEG bytes) of n CIFAR-10 training images, a tenth of each class (the first in the
    archive's order), labelled `cat` and `other` as bench/scale.py does; read into memory, never unpacked."""
    import tarfile

    per, taken, out = n // len(CIFAR_CLASSES), {c: 0 for c in CIFAR_CLASSES}, []
    with tarfile.open(archive) as tar:
        for member in tar:
            parts = member.name.split("/")
            if not member.isfile() or len(parts) < 3 or parts[-2] not in taken or not parts[-1].endswith(".jpg"):
                continue
            cls = parts[-2]
            if taken[cls] < per:
                taken[cls] += 1
                out.append((f"{cls}-{parts[-1]}", "cat" if cls == "cat" else "other", tar.extractfile(member).read()))
    return out


def _probe(extractor_precision: str, device: str, items: list[tuple[str, str, bytes]], warm: int) -> dict:
    """Features of `items` through the extractor a default linear training with this precision uses
    (the process's warm one), into an in-memory cache: build + first `warm` images, then the rest timed."""
    import hashlib

    from models.features import MemoryFeatureCache
    from models.train import TrainConfig, extract_features, feature_extractor

    shas = [hashlib.sha256(data).hexdigest() for _, _, data in items]
    loads = [(lambda d=data: d) for _, _, data in items]
    cache = MemoryFeatureCache()
    t = time.perf_counter()
    extractor = feature_extractor(TrainConfig(precision=extractor_precision), device=device)
    extract_features(extractor, shas[:warm], loads[:warm], cache)
    first = time.perf_counter() - t
    t = time.perf_counter()
    n = extract_features(extractor, shas[warm:], loads[warm:], cache)
    dt = time.perf_counter() - t
    return {"img_s": n / dt, "images": n, "seconds": dt, "build_and_first_s": first}


def scale_phase(report: Report, device: str, datasets: Path, sizes: Sizes) -> None:
    """Issue 17 on one GPU host: CIFAR-10's 50,000 training images uploaded through the service's ingest
    into a temporary embedded store, both extractors timed on a sample (INT8 ONNX Runtime on the CPU cores,
    fp32 torch on the GPU), then the worker's task (pipeline.run_training) cold with the faster one and
    warm again. One worker holds the GPU, so the features run in the task itself (FELIS_FEATURE_SHARD_IMAGES=0;
    with shards they would be the same work as tasks one after another on this host)."""

    import service.domain.pipeline as pipeline

    report.phase = "scale"
    out = report.data["phases"].setdefault("scale", {})
    archive = datasets / "cifar10" / "cifar10-train.tar.gz"
    t = time.perf_counter()
    items = _cifar(archive, sizes.scale_images)
    out.update(n_images=len(items), read_s=time.perf_counter() - t)
    say(f"\n== scale: {len(items)} CIFAR-10 training images (cat / other) read from {archive.name} in {out['read_s']:.1f} s")

    probe = items[:: max(1, len(items) // sizes.probe_images)][: sizes.probe_images]
    warm = max(1, len(probe) // 10)
    for precision in ("int8", "fp32"):  # fp32 last: the warm extractor the training then reuses when it wins
        r = _probe(precision, device, probe, warm)
        out[f"{precision}_features"], out[f"{precision}_img_s"] = r, r["img_s"]
        where = "ONNX Runtime on the CPU cores" if precision == "int8" else f"torch on {device}"
        say(f"  features {precision} ({where}): {r['img_s']:,.0f} img/s over {r['images']} images "
            f"(build + first {warm}: {r['build_and_first_s']:.1f} s)")
    best = max(("int8", "fp32"), key=lambda p: out[f"{p}_img_s"])
    out["precision"] = best
    say(f"  -> the trainings below use precision {best}")

    with _embedded_store(device, "felis-gpu-scale-", FELIS_FEATURE_SHARD_IMAGES="0") as (settings, store, _):
        from service.domain import datasets as datasets_domain
        from service.domain import uploads
        from service.store.db import session_scope

        t = time.perf_counter()
        with session_scope() as s:
            datasets_domain.create(s, "cifar")
        for label in ("cat", "other"):
            mine = [(name, (lambda d=data: d)) for name, lab, data in items if lab == label]
            for i in range(0, len(mine), 5000):  # a request takes at most FELIS_MAX_FILES_PER_REQUEST files
                with session_scope() as s:
                    ds = datasets_domain.get(s, "cifar")
                    uploads.ingest(s, store, ds, uploads.files_candidates(mine[i : i + 5000], label), settings)
        out["ingest_s"] = time.perf_counter() - t
        out["ingest_img_s"] = len(items) / out["ingest_s"]
        say(f"  uploaded through uploads.ingest in {out['ingest_s']:.1f} s ({out['ingest_img_s']:,.0f} images/s)")

        timings: dict = {}
        real_train = pipeline.train

        def timed_train(*args, **kwargs):  # the task's train() call, its per-phase seconds kept
            result = real_train(*args, **kwargs)
            timings.clear()
            timings.update(result.timings)
            return result

        pipeline.train = timed_train
        try:
            for run in ("cold", "warm"):
                wall, metrics, keys = _task("cifar", {"precision": best}, settings, store, device, run)
                out[f"{run}_task_s"], out[f"{run}_timings"] = wall, dict(timings)
                out[f"{run}_validation_accuracy"] = metrics.get("accuracy")
                out[f"{run}_features_computed"] = metrics.get("features_computed")
                out[f"{run}_other_than_features_s"] = wall - timings.get("features", 0.0)
                say(f"  {run} task: {wall:.1f} s" + (f" (goal <= {SCALE_GOAL_S:.0f} s)" if run == "cold" else "")
                    + f", validation accuracy {metrics.get('accuracy', 0):.4f}, features computed {metrics.get('features_computed')} | "
                    + " ".join(f"{k} {v:.2f}s" for k, v in timings.items()))
            report.artifacts["checkpoint"] = store.get(keys[0])
            report.artifacts["onnx"] = store.get(keys[1]) if keys[1] else None
            report.artifacts["cifar"] = [data for _, _, data in items[:: max(1, len(items) // 300)]]
        finally:
            pipeline.train = real_train


async def _drive(predictor, images: list[bytes], concurrency: int, max_batch: int, seconds: float, warmup_s: float) -> dict:
    """The API's predict path without HTTP (service.serving.predictions._predict_batched): each of
    `concurrency` clients sends one image, waits for its answer, sends the next; decoding on a pool of
    one thread a core, then the service's MicroBatcher. Latency: from submitting to the answer."""
    import asyncio
    import statistics
    from concurrent.futures import ThreadPoolExecutor

    from service.serving.batching import MicroBatcher

    batcher = MicroBatcher(predictor.infer_scored, max_batch, 0.002, parallel=predictor.concurrent_runs)
    pool = ThreadPoolExecutor(cpu_count(), thread_name_prefix="decode")
    loop = asyncio.get_running_loop()
    latencies: list[float] = []
    start = time.perf_counter()
    measure, end = start + warmup_s, start + warmup_s + seconds

    async def client(i: int) -> None:
        k = i
        while (t0 := time.perf_counter()) < end:
            data = images[k % len(images)]
            k += concurrency
            with batcher.expecting(1):
                x = await loop.run_in_executor(pool, predictor.preprocess, data)
                (fut,) = batcher.enqueue([x])
            await fut
            t1 = time.perf_counter()
            if t0 >= measure and t1 <= end:
                latencies.append(t1 - t0)

    try:
        await asyncio.gather(*(client(i) for i in range(concurrency)))
    finally:
        batcher.close()
        pool.shutdown(wait=False, cancel_futures=True)
    latencies.sort()
    q = statistics.quantiles(latencies, n=100) if len(latencies) > 1 else latencies * 99
    return {"img_s": len(latencies) / seconds, "p50_ms": 1000 * statistics.median(latencies), "p99_ms": 1000 * q[98],
            "requests": len(latencies), "concurrency": concurrency, "max_batch": max_batch, "seconds": seconds,
            "decode_threads": cpu_count()}


def predict_phase(report: Report, device: str, datasets: Path, sizes: Sizes) -> None:
    """Predict at c=256 with the scale phase's model: its weights in torch on the GPU (the service's
    micro-batcher, max_batch predict_batch), then its exported graph in ONNX Runtime on the CPU cores as
    the API serves it (max_batch 4, one single-thread session a core), on the same images: photos/test
    when it is there (the serving bench's load), else CIFAR-10 images."""
    import asyncio

    from models.checkpoint import load_checkpoint
    from models.predictor import Predictor

    report.phase = "predict"
    out = report.data["phases"].setdefault("predict", {})
    if "checkpoint" not in report.artifacts:
        raise RuntimeError("the predict phase serves the scale phase's model: run it with --phases ...,scale,predict")
    test = datasets / "photos" / "test"
    if test.is_dir():
        images, source = [p.read_bytes() for p in sorted(test.glob("*/*")) if p.suffix.lower() in (".jpg", ".jpeg", ".png")], "photos/test"
    else:
        images, source = report.artifacts["cifar"], "CIFAR-10 training images"
    out.update(images=len(images), source=source)
    c = sizes.predict_concurrency
    say(f"\n== predict: the scale phase's model, {len(images)} images of {source}, {c} requests in flight, "
        f"{sizes.predict_seconds:.0f} s measured after 2 s")
    runs = [("gpu", lambda: Predictor.from_checkpoint(load_checkpoint(report.artifacts["checkpoint"]), backend="torch", device=device),
             sizes.predict_batch)]
    if report.artifacts.get("onnx"):
        runs.append(("onnx_cpu", lambda: Predictor.from_onnx(report.artifacts["onnx"], threads=cpu_count(), shared_cores=True), 4))
    for name, build, max_batch in runs:
        report.phase = f"predict/{name}"
        predictor = build()
        r = asyncio.run(_drive(predictor, images, c, max_batch, sizes.predict_seconds, 2.0))
        out[name], out[f"{name}_img_s"], out[f"{name}_p50_ms"] = r, r["img_s"], r["p50_ms"]
        say(f"  {name} ({predictor.backend}, max_batch {max_batch}): {r['img_s']:,.0f} img/s, p50 {r['p50_ms']:.1f} ms, "
            f"p99 {r['p99_ms']:.1f} ms ({r['requests']} requests)")


# ---------------------------------------------------------------- fine-tuning throughput


def _lite0(size: int, device: torch.device) -> torch.nn.Module:
    """EfficientNet-Lite0 + average pooling + 2-class head with ImageNet weights, as models.fit_finetune builds it."""
    from models import networks

    net = networks.build_classifier({"name": "efficientnet_lite0", "image_size": size, "pooling": "avg", "num_classes": 2})
    networks.load_pretrained(net.backbone, "efficientnet_lite0", None)
    return net.to(device=device, memory_format=torch.channels_last).train()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _batches(x: torch.Tensor, y: torch.Tensor, bs: int):
    """Endless full batches of resident uint8 images, reshuffled per pass, random horizontal flips, all on the device."""
    while True:
        order = torch.randperm(len(x), device=x.device)
        for i in range(len(x) // bs):
            idx = order[i * bs : (i + 1) * bs]
            xb = x[idx]
            flip = torch.rand(bs, device=x.device) < 0.5
            yield torch.where(flip.view(bs, 1, 1, 1), xb.flip(3), xb), y[idx]


def _lean_step(model, opt, norm, device: torch.device):
    bf16 = use_bf16(device)  # the rule train_network uses

    def step(xb, yb):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = F.cross_entropy(model(norm(xb).contiguous(memory_format=torch.channels_last)).float(), yb, label_smoothing=0.1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.detach()

    return step


def _steady(step, batches, bs: int, warmup_steps: int, seconds: float, device: torch.device) -> dict:
    """Warm-up steps (timed), then steps for `seconds`, synchronising only every few steps."""
    t = time.perf_counter()
    for _ in range(warmup_steps):
        loss = step(*next(batches))
    _sync(device)
    first = time.perf_counter() - t
    n, t, chunk = 0, time.perf_counter(), 5 if device.type == "cuda" else 1  # CPU steps are synchronous anyway
    while True:
        for _ in range(chunk):
            loss = step(*next(batches))
        n += chunk
        _sync(device)
        dt = time.perf_counter() - t
        if dt >= seconds:
            return {"img_s": n * bs / dt, "steps": n, "seconds": dt, "warmup_s": first, "loss": float(loss)}


def finetune_phase(report: Report, device: torch.device, sizes: Sizes, started: float, compile_mode: str) -> None:
    from models.finetune import FinetuneParams, train_network
    from models.networks import default_preprocessing, normalizer

    report.phase = "finetune"
    out = report.data["phases"].setdefault("finetune", {})
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    size, bs = sizes.finetune_size, sizes.finetune_batch
    prep = default_preprocessing("efficientnet_lite0", size)
    norm = normalizer(prep, device)
    say(f"\n== fine-tune: EfficientNet-Lite0, {size} px, bf16 autocast {use_bf16(device)}, channels_last, "
        f"cudnn.benchmark {torch.backends.cudnn.benchmark}, AdamW, random uint8 images resident on {device}")
    net = _lite0(size, device)
    opt = torch.optim.AdamW(net.parameters(), lr=5e-4, weight_decay=0.05)  # as train_network: foreach, not fused
    gen = torch.Generator(device=device).manual_seed(0)
    while True:  # the largest batch that fits, from sizes.finetune_batch down
        try:
            x = torch.randint(0, 256, (bs * sizes.finetune_batches, 3, size, size), dtype=torch.uint8, device=device, generator=gen)
            y = torch.randint(0, 2, (len(x),), device=device, generator=gen)
            step = _lean_step(net, opt, norm, device)
            r = _steady(step, _batches(x, y, bs), bs, sizes.warmup_steps, sizes.measure_s, device)
            break
        except torch.cuda.OutOfMemoryError:
            x = y = None
            torch.cuda.empty_cache()
            if bs <= 16:
                raise
            bs //= 2
            say(f"  out of memory: batch {bs * 2} -> {bs}")
    out.update(batch=bs, resident_images=len(x), eager_img_s=r["img_s"], eager=r)
    if device.type == "cuda":
        out["peak_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    say(f"  lean loop, eager, batch {bs}: {r['img_s']:,.0f} img/s steady ({r['steps']} steps in {r['seconds']:.1f} s; "
        f"first {sizes.warmup_steps} steps {r['warmup_s']:.1f} s) — goal >= {FINETUNE_GOAL_IMG_S:,.0f}")

    # the worker's own loop: crop+flip augmentation, OneCycle, fresh network. It reads the loss back
    # once per epoch (no per-step host sync), so time whole epochs: an epoch-end event comes after
    # that read-back, i.e. after every step of the epoch has finished on the device.
    report.phase = "finetune/train_network"
    stamps: list[tuple[float, int]] = []

    def progress(p: dict) -> None:
        if "loss" in p and "step" not in p:
            stamps.append((time.perf_counter(), p["epoch"]))

    params = FinetuneParams(epochs=1000, learning_rate=5e-4, weight_decay=0.05, batch_size=bs, augmentation="crop+flip",
                            label_smoothing=0.1, time_budget_s=sizes.measure_s * 0.75)
    try:
        empty = x[:0]
        t0 = time.perf_counter()
        train_network(_lite0(size, device), x, y, empty, y[:0], prep, params, device, 0, progress, lambda: None)
        later = [t for t, epoch in stamps if epoch > 1]  # epoch 1 holds cudnn autotuning of new shapes
        steady = len(later) >= 2
        if steady:
            rate = (len(later) - 1) * len(x) / (later[-1] - later[0])
        elif stamps:
            rate = len(stamps) * len(x) / (stamps[-1][0] - t0)
        if stamps:
            out.update(train_network_img_s=rate, train_network={"epochs": len(stamps), "images_per_epoch": len(x), "steady": steady})
            say(f"  models.finetune.train_network as shipped (crop+flip, batch {bs}): {rate:,.0f} img/s "
                + (f"steady ({len(later) - 1} epochs of {len(x)} images after epoch 1)" if steady
                   else f"(NOT steady: {len(stamps)} epoch(s) incl. the first)"))
        else:
            say("  train_network: no epoch finished in its budget, no figure")
    except Exception as e:  # noqa: BLE001 -- reported, the compiled run still goes
        report.error("finetune/train_network", e)

    # torch.compile of the same network, the step around it eager (AdamW foreach)
    report.phase = "finetune/compile"
    left = sizes.deadline_s - (time.perf_counter() - started)
    mode = compile_mode if sizes.compile_backend == "inductor" else None
    out["compile_mode"], out["compile_backend"] = mode, sizes.compile_backend
    if left < sizes.compile_min_left_s + sizes.measure_s:
        out["compile_skipped"] = f"only {left:.0f} s left before the deadline"
        say(f"  torch.compile skipped: {out['compile_skipped']}")
        return
    try:
        compiled = torch.compile(net, backend=sizes.compile_backend, mode=mode)
        step = _lean_step(compiled, opt, norm, device)
        batches = _batches(x, y, bs)
        t = time.perf_counter()
        step(*next(batches))
        _sync(device)
        out["compile_s"] = time.perf_counter() - t
        say(f"  torch.compile ({sizes.compile_backend}, mode {mode}): first step {out['compile_s']:.1f} s")
        r = _steady(step, batches, bs, sizes.warmup_steps, sizes.measure_s * 0.75, device)
        out.update(compiled_img_s=r["img_s"], compiled=r)
        say(f"  lean loop, compiled, batch {bs}: {r['img_s']:,.0f} img/s steady ({r['steps']} steps in {r['seconds']:.1f} s)")
    except Exception as e:  # noqa: BLE001 -- a compile failure is a finding, not a crash
        out["compile_error"] = f"{type(e).__name__}: {str(e)[:500]}"
        say(f"  torch.compile failed: {out['compile_error']}")


# ---------------------------------------------------------------- main


def _watchdog(report: Report, seconds: float, deadline: float, json_path: Path | None) -> threading.Timer:
    def fire():
        say(f"\nDEADLINE: {deadline:.0f} s reached during phase {report.phase!r}; stopping with what was measured")
        report.errors.append(f"{report.phase}: deadline of {deadline:.0f} s reached")
        report.summary(json_path, note="deadline reached")
        os._exit(3)

    timer = threading.Timer(seconds, fire)
    timer.daemon = True
    timer.start()
    return timer


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    default_datasets = Path(os.environ.get("FELIS_DATASETS", ROOT.parent / "shared" / "datasets"))
    ap.add_argument("--datasets", type=Path, default=default_datasets, help=f"folder holding photos/ (default {default_datasets})")
    ap.add_argument("--json", type=Path, help="write every figure here")
    ap.add_argument("--dry-run-cpu", action="store_true", help="run every phase on CPU with tiny sizes (tests the script)")
    ap.add_argument("--compile-mode", default="default", help="torch.compile mode on CUDA (e.g. max-autotune-no-cudagraphs: slower to compile)")
    ap.add_argument("--deadline", type=float, help="seconds before the watchdog stops the run (default 290 on GPU, 150 dry run)")
    ap.add_argument("--phases", default=",".join(PHASES), help=f"comma-separated subset of {','.join(PHASES)} (default: all)")
    ap.add_argument("--seconds", type=float, help="steady seconds per fine-tune measurement (default 20 on GPU)")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads, as the worker's torch_threads (0: one per core; 1 in a dry run)")
    args = ap.parse_args(argv)
    phases = [p.strip() for p in args.phases.split(",") if p.strip()]
    if unknown := set(phases) - set(PHASES):
        ap.error(f"unknown phase(s) {sorted(unknown)}: choose from {', '.join(PHASES)}")

    started = time.perf_counter()
    tune_process(args.threads or (1 if args.dry_run_cpu else 0))  # as the worker, once per process; 1 thread: robust on a shared 2-core VM
    report = Report(args.dry_run_cpu)
    environment(report)
    if not args.dry_run_cpu and not torch.cuda.is_available():
        print("no CUDA device: this check needs a GPU (use --dry-run-cpu to test the script on CPU)", file=sys.stderr, flush=True)
        return 2
    sizes = DRY if args.dry_run_cpu else GPU
    if args.deadline:
        sizes = replace(sizes, deadline_s=args.deadline)
    if args.seconds:
        sizes = replace(sizes, measure_s=args.seconds)
    device = "cpu" if args.dry_run_cpu else "cuda"
    if args.dry_run_cpu:  # extract features with torch, as on CUDA, not with ONNX Runtime (the CPU default)
        import models.features

        models.features.has_onnxruntime = lambda: False
    photos = args.datasets / "photos"
    say(f"\nsizes: {sizes}\nphotos: {photos}")
    watchdog = _watchdog(report, sizes.deadline_s - (time.perf_counter() - started), sizes.deadline_s, args.json)

    for name, run in (("warmup", lambda: warmup(report, device, photos, sizes)),
                      ("task", lambda: task_phase(report, device, photos, sizes)),  # before photos: its last run (fp32) replaces the warm INT8 extractor
                      ("photos", lambda: photos_phase(report, device, photos, sizes)),
                      ("finetune", lambda: finetune_phase(report, torch.device(device), sizes, started, args.compile_mode)),
                      ("scale", lambda: scale_phase(report, device, args.datasets, sizes)),
                      ("predict", lambda: predict_phase(report, device, args.datasets, sizes))):
        if name not in phases:
            report.data["phases"].setdefault(name, {})["skipped"] = "not in --phases"
            continue
        try:
            cifar = args.datasets / "cifar10" / "cifar10-train.tar.gz"
            if name in ("photos", "task") and not (photos / "train").is_dir():
                raise FileNotFoundError(f"{photos / 'train'} not found (--datasets)")
            if (name == "scale" or name == "warmup" and not (photos / "train").is_dir()) and not cifar.is_file():
                raise FileNotFoundError(f"{cifar} not found (--datasets)")
            run()
        except Exception as e:  # noqa: BLE001 -- the later phases still run
            report.error(name, e)
    watchdog.cancel()
    report.data["total_s"] = time.perf_counter() - started
    say(f"\ntotal {report.data['total_s']:.0f} s")
    return report.summary(args.json)


if __name__ == "__main__":
    sys.exit(main())
