"""Open set through the HTTP API, as a user measures it (issue 15, part 1).

    python bench/ood_api.py [--url http://127.0.0.1:PORT] [--compare-url URL] [--append] [--repeats 300]

Without --url it starts its own `felis up` (embedded mode) in a temporary folder. Then: upload
the kaggle_ files of photos/train as labels cat and dog, train with default options, predict the
kaggle_ files of photos/test (in distribution, 200) and the imagenet_ files of photos/test that
are neither dogs nor cats nor wolves, foxes or wild cats (out of distribution, 41; the exclusion
list is bench/ood.py's), and report:
  AUROC of ood_score (in vs out), % flagged (ood: true) each side, and the in-distribution
  errors of `label` (the top label, as predict answered before) and of `decision` (null for a
  flagged photo, counted as an error). --compare-url: a felis running the code without the
  change (e.g. `git archive` of the commit before, `python -m service.cli up` in it), trained and
  asked the same way: its errors, and how many photos' labels differ between the two.
Then the cost of the graph part that computes ood_score, in ONNX Runtime sessions as the API
makes them (every core, idle threads sleeping), per image at batch 1, 4 (FELIS_PREDICT_MAX_BATCH)
and 32: alone (that part cut out of the version's served graph, fed features: steady even on a
busy machine), and as the served graph (downloaded, ?format=onnx) against itself with that part
cut off, alternated run by run (10th percentile and median of --repeats runs: other load on the
cores shows in the medians).
--append writes the figures to bench/RESULTS.md under a new heading (machine from /proc/cpuinfo).
--storage (no API): how to store the index's vectors in the graph, measured on bench/ood.py's
cached features: int8 + Cast (what export.py ships), int8 + DequantizeLinear, float16 + Cast,
float32; bytes, largest difference from OodIndex.score, median us per run at batch 1, 4, 32.

Target (issue 15): AUROC >= 0.99, <= 2% of in-distribution photos flagged, >= 95% of the others,
accuracy unchanged (at most one more error on the 200 kaggle_ test photos).
"""

from __future__ import annotations

import datetime
import os
import sys
import time
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from _api import arguments, need_photos, post_files, print_results, run_training, start_or_use  # noqa: E402  (bench/_api.py)
from ood import DATASETS, cpu_name, kaggle_label, photo_sets  # noqa: E402  (bench/ood.py)

LABELS = ("cat", "dog")  # kaggle_label's 0 and 1


def through_the_api(base: str) -> dict:
    """Upload, train with defaults, predict both sides; a felis without the change answers no ood fields."""
    from models.evaluate import roc_auc

    sets = photo_sets()
    with httpx.Client(base_url=base, timeout=600) as c:
        name = f"ood-{int(time.time())}"
        c.post("/v1/datasets", json={"name": name}).raise_for_status()
        train = sets["kaggle_train"]
        for label in LABELS:
            paths = [p for p in train if LABELS[kaggle_label(p)] == label]
            post_files(c, f"/v1/datasets/{name}/images", paths, 100, data={"label": label})
        t, train_s = run_training(c, name)
        assert t["status"] == "succeeded", t
        version = t["model_version"]
        detail = c.get(f"/v1/datasets/{name}/models/{version}").json()
        evaluation = c.get(f"/v1/datasets/{name}/models/{version}/evaluation").json().get("ood")
        inside = post_files(c, f"/v1/datasets/{name}/predict", sets["kaggle_test"], 16)
        outside = post_files(c, f"/v1/datasets/{name}/predict", sets["imagenet_test"], 16)
        onnx = c.get(f"/v1/datasets/{name}/models/{version}/download", params={"format": "onnx"}).content
        c.delete(f"/v1/datasets/{name}")
    truth = [LABELS[kaggle_label(p)] for p in sets["kaggle_test"]]
    out = {"train_s": train_s, "labels": [p["label"] for p in inside], "onnx": onnx,
           "errors_label": sum(p["label"] != y for p, y in zip(inside, truth)),
           "errors_decision": sum(p["decision"] != y for p, y in zip(inside, truth))}
    if "ood_score" not in inside[0]:
        return out
    si, so = np.array([p["ood_score"] for p in inside]), np.array([p["ood_score"] for p in outside])
    auc = roc_auc(np.r_[si, so], np.r_[np.zeros(len(si), bool), np.ones(len(so), bool)])
    return {**out, "ood": detail["ood"], "evaluation": evaluation, "auroc": float(auc), "n_in": len(inside), "n_out": len(outside),
            "flagged_in": [p["filename"] for p in inside if p["ood"]], "missed_out": [p["filename"] for p in outside if not p["ood"]]}


def without_ood(onnx: bytes) -> bytes:
    """The same graph with the part that computes ood_score cut off (export.py names it "ood.*")."""
    import onnx as onnx_lib

    model = onnx_lib.load_from_string(onnx)
    g = model.graph
    keep_nodes = [n for n in g.node if not (n.name.startswith("ood.") or "ood_score" in n.output)]
    keep_inits = [i for i in g.initializer if not i.name.startswith("ood.")]
    keep_outputs = [o for o in g.output if o.name != "ood_score"]
    for field, kept in ((g.node, keep_nodes), (g.initializer, keep_inits), (g.output, keep_outputs)):
        del field[:]
        field.extend(kept)
    return model.SerializeToString()


def ood_part(onnx: bytes) -> bytes:
    """The part of the served graph that computes ood_score, alone: input the features it reads."""
    import onnx as onnx_lib
    from onnx import TensorProto, helper

    model = onnx_lib.load_from_string(onnx)
    g = model.graph
    nodes = [n for n in g.node if n.name.startswith("ood.") or "ood_score" in n.output]
    features = nodes[0].input[0]  # the Slice's
    part = helper.make_graph(nodes, "ood", [helper.make_tensor_value_info(features, TensorProto.FLOAT, ["batch", None])],
                             [o for o in g.output if o.name == "ood_score"], [i for i in g.initializer if i.name.startswith("ood.")])
    return helper.make_model(part, opset_imports=model.opset_import, ir_version=model.ir_version).SerializeToString()


def graph_cost(onnx: bytes, repeats: int) -> dict:
    """{"alone": {batch: ms per run of the ood part fed features}, "paired": {batch: ((p10, median)
    with the ood part, (p10, median) without)}}, in ms per run."""
    from models.onnx_session import onnx_session

    threads = len(os.sched_getaffinity(0))
    with_s, without_s = onnx_session(onnx, threads, "never"), onnx_session(without_ood(onnx), threads, "never")
    part = onnx_session(ood_part(onnx), threads, "never")
    size, dim = with_s.get_inputs()[0].shape[2], _features_width(onnx)
    rng = np.random.default_rng(0)
    out: dict = {"alone": {}, "paired": {}}
    for batch in (1, 4, 32):
        x = rng.normal(size=(batch, 3, size, size)).astype(np.float32)
        f = np.abs(rng.normal(size=(batch, dim))).astype(np.float32)
        out["alone"][batch] = _median_ms(lambda f=f: part.run(None, {part.get_inputs()[0].name: f}), repeats * 4)
        times: dict[int, list[float]] = {0: [], 1: []}
        for i in range(max(20, repeats // (8 if batch == 32 else 1)) + 5):
            for which, (s, outputs) in enumerate(((with_s, ["probabilities", "ood_score"]), (without_s, ["probabilities"]))):
                t = time.perf_counter()
                s.run(outputs, {"images": x})
                if i >= 5:
                    times[which].append((time.perf_counter() - t) * 1e3)
        out["paired"][batch] = tuple((float(np.percentile(v, 10)), float(np.median(v))) for v in (times[0], times[1]))
    return out


def _features_width(onnx: bytes) -> int:
    """Columns of the features the ood part slices (the head's Gemm weight is (labels, D))."""
    import onnx as onnx_lib
    from onnx import numpy_helper

    model = onnx_lib.load_from_string(onnx)
    inits = {i.name: i for i in model.graph.initializer}
    if "head.weight" in inits:  # int8 linear graphs (export.append_head)
        return int(numpy_helper.to_array(inits["head.weight"]).shape[1])
    return int(numpy_helper.to_array(inits["ood.ends"])[0])  # at least the columns it uses


def _median_ms(fn, repeats: int) -> float:
    for _ in range(10):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return float(np.median(times)) * 1e3


def report(r: dict, cost: dict, machine: str, base: dict | None) -> str:
    fi, fo = len(r["flagged_in"]) / r["n_in"], 1 - len(r["missed_out"]) / r["n_out"]
    before = base["errors_label"] if base else r["errors_label"]
    ok = r["auroc"] >= 0.99 and fi <= 0.02 and fo >= 0.95 and r["errors_label"] - before <= 1
    ood, ev = r["ood"], r["evaluation"]
    if base:
        differ = sum(a != b for a, b in zip(r["labels"], base["labels"]))
        without = f"without the change (the commit before, trained and asked the same way): {base['errors_label']}; labels that differ: {differ}"
    else:
        without = "(no --compare-url: not measured without the change)"
    lines = [
        f"## Open set through the API (`bench/ood_api.py`, {datetime.date.today()}, {machine})",
        "",
        "Default training on the 800 `kaggle_` photos of `photos/train` (labels cat, dog) through the API "
        f"({r['train_s']:.1f} s request to version); its index: {ood['index_vectors']} vectors of {ood['n_train']} images, "
        f"threshold {ood['threshold']:.4f} ({100 * ood['flagged_fraction']:.0f}% of the training images' leave-one-out scores above it; "
        f"{100 * (ev['validation_flagged'] or 0):.1f}% of the {ev['validation_images']} validation images flagged by an index of "
        "the train split alone). Then predicted through the API:",
        "",
        "| | target | measured |",
        "|---|---|---|",
        f"| AUROC of `ood_score`, {r['n_in']} `kaggle_` test vs {r['n_out']} other `imagenet_` test photos | >= 0.99 | **{r['auroc']:.4f}** |",
        f"| in-distribution flagged (`ood: true`) | <= 2% | **{100 * fi:.1f}%** ({len(r['flagged_in'])}: {', '.join(r['flagged_in']) or '-'}) |",
        f"| out-of-distribution flagged | >= 95% | **{100 * fo:.1f}%** (missed: {', '.join(r['missed_out']) or '-'}) |",
        f"| errors of `label` on the 200 `kaggle_` test photos | at most one more than without | **{r['errors_label']}**; {without} |",
        f"| errors of `decision` (null for a flagged photo, counted as an error) | | {r['errors_decision']} |",
        "",
        f"{'PASS' if ok else 'FAIL'}. Cost of the graph part that computes `ood_score` ({ood['index_vectors']} vectors x "
        "1,280 features), in ONNX Runtime sessions as the API makes them, ms per run: alone (fed features; median), and the "
        "served graph against itself with that part cut off, alternated run by run (10th percentile / median; other load "
        "on the cores shows in the medians):",
        "",
        "| batch | alone | per image | served graph with | without | added per image (10th pct) |",
        "|---|---|---|---|---|---|",
    ]
    for b, alone in cost["alone"].items():
        (w10, w50), (o10, o50) = cost["paired"][b]
        lines.append(f"| {b} | {alone:.3f} | {1e3 * alone / b:.0f} us ({100 * alone / o10:.1f}% of the graph) | {w10:.2f} / {w50:.2f} | "
                     f"{o10:.2f} / {o50:.2f} | {1e3 * (w10 - o10) / b:+.0f} us |")
    lines += ["", "`python bench/ood_api.py [--compare-url URL] [--append]` reproduces it; `bench/ood.py` compares the methods "
              "on cached features.", ""]
    return "\n".join(lines)


def storage_variants(repeats: int) -> str:
    """The ood part built with each way of storing the vectors, on real features (see --storage)."""
    import onnx as onnx_lib
    from onnx import TensorProto, helper, numpy_helper

    from models.export import _add_ood
    from models.onnx_session import onnx_session
    from models.ood import fit_ood
    from ood import load_features

    feats, _ = load_features(Path("/tmp/felis-ood"))
    X, test = feats["kaggle_train"], feats["kaggle_test"]
    y = np.arange(len(X)) % 2
    jittered = np.repeat(X, 3, axis=0) * np.random.default_rng(0).uniform(0.8, 1.2, (3 * len(X), X.shape[1])).astype(np.float32)
    rows = ["| vectors | storage | bytes in the graph | max difference | us/run @1 | @4 | @32 |", "|---|---|---|---|---|---|---|"]
    for data, labels in ((X, y), (jittered, np.repeat(y, 3))):
        index = fit_ood(data, labels, dims=X.shape[1] // 2)
        for storage in ("int8 + Cast", "int8 + DequantizeLinear", "float16 + Cast", "float32"):
            g = helper.make_graph([], "ood", [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", X.shape[1]])], [])
            _add_ood(g, "features", index)
            inits = {i.name: i for i in g.initializer}
            nodes = list(g.node)
            unit = (index.codes.astype(np.float32) / np.linalg.norm(index.codes.astype(np.float32), axis=1, keepdims=True)).T
            if storage != "int8 + Cast":  # replace Cast(codes) x inv_norm by the variant's unit vectors
                cast = next(n for n in nodes if n.op_type == "Cast")
                mul = next(n for n in nodes if n.op_type == "Mul")
                nodes = [n for n in nodes if n is not mul]
                matmul = next(n for n in nodes if n.op_type == "MatMul")
                matmul.output[0] = mul.output[0]
                del inits["ood.codes_t"], inits["ood.inv_norm"]
                if storage == "float32":
                    nodes.remove(cast)
                    inits["ood.codes_f"] = numpy_helper.from_array(np.ascontiguousarray(unit), "ood.codes_f")
                elif storage == "float16 + Cast":
                    inits["ood.codes_t"] = numpy_helper.from_array(np.ascontiguousarray(unit.astype(np.float16)), "ood.codes_t")
                else:
                    i = nodes.index(cast)
                    nodes[i] = helper.make_node("DequantizeLinear", ["ood.codes_t", "ood.scale", "ood.zero"], ["ood.codes_f"], axis=1)
                    inits["ood.codes_t"] = numpy_helper.from_array(np.ascontiguousarray(index.codes.T), "ood.codes_t")
                    inv = 1 / np.linalg.norm(index.codes.astype(np.float32), axis=1)
                    inits["ood.scale"] = numpy_helper.from_array(inv.astype(np.float32), "ood.scale")
                    inits["ood.zero"] = numpy_helper.from_array(np.zeros(len(inv), np.int8), "ood.zero")
            del g.node[:], g.initializer[:]
            g.node.extend(nodes)
            g.initializer.extend(inits.values())
            graph = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8).SerializeToString()
            onnx_lib.checker.check_model(onnx_lib.load_from_string(graph))
            session = onnx_session(graph, len(os.sched_getaffinity(0)), "never")
            diff = np.abs(session.run(None, {"features": test})[0] - index.score(test)).max()
            us = [1e3 * _median_ms(lambda b=b: session.run(None, {"features": test[:b]}), repeats * 2) for b in (1, 4, 32)]
            rows.append(f"| {len(index.codes)} | {storage} | {len(graph):,d} | {diff:.1e} | {us[0]:.0f} | {us[1]:.0f} | {us[2]:.0f} |")
    return "\n".join(rows)


def main() -> int:
    ap = arguments(__doc__)
    ap.add_argument("--compare-url", help="a felis running the code without the change, trained and asked the same way")
    ap.add_argument("--repeats", type=int, default=300)
    ap.add_argument("--storage", action="store_true", help="only compare ways of storing the index in the graph (no API)")
    args = ap.parse_args()
    if args.storage:
        print(storage_variants(args.repeats))
        return 0
    need_photos(DATASETS)
    with start_or_use(args.url, prefix="felis-ood-") as (base, _):
        r = through_the_api(base)
    baseline = through_the_api(args.compare_url) if args.compare_url else None
    cost = graph_cost(r["onnx"], args.repeats)
    print_results(report(r, cost, cpu_name(), baseline), append=args.append)
    return 0


if __name__ == "__main__":
    sys.exit(main())
