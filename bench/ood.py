"""Open-set ("is this like my training images?") scores on a linear version's frozen features (issue 15).

    python bench/ood.py [--cache /tmp/felis-ood] [--folds 5] [--only "k=5 avg"]

What a user measures: train cats vs dogs on the kaggle_ files of photos/train, then predict the
kaggle_ files of photos/test (in distribution) and the imagenet_ files of photos/test that show
something else (out of distribution; see OOD_EXCLUDED). Features come from felis's own extractor,
the one a default linear training runs (models.features.warm_extractor with the resolved default
TrainConfig: EfficientNet-Lite0, INT8, 288 px, avgmax pooling, 2560 values); they are computed
once and cached as npz under --cache (never in the project).

Each method is fitted on the training features only and its threshold is set so that 1% of the
TRAINING images' leave-one-out (or out-of-fold) scores lie above it; then, per method:
  test   AUROC, % in-distribution flagged, % OOD flagged on photos/test (200 kaggle_ vs 41 imagenet_)
  cv     the same over 5 folds of photos/train: fit on 4/5 of the kaggle_ files, score the held-out
         1/5 (in distribution) and 1/5 of the 177 OOD imagenet_ train files; AUROC: mean (min) of
         the folds, flagged shares: pooled
  cat-breeds%  catbreeds_ test photos (cats from another source, not scored) flagged
  bytes  what the version would store beyond what it has today; us/img: numpy scoring time per
         image at batch 1 and 32 (median of 200 runs, this process's BLAS threads)
Then the chosen method (models.ood with its defaults): the photos it flags and misses, and its
size and cost with an index at the cap.

Target (issue 15): AUROC >= 0.99, <= 2% in-distribution flagged, >= 95% OOD flagged.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
DATASETS = Path(os.environ.get("FELIS_DATASETS", ROOT.parent / "shared" / "datasets"))

# imagenet_ files are named imagenet_<wnid>_<class>.JPEG. ImageNet's class indices follow the
# sorted wnids, so classes 151..293 -- the dogs (151-268), wolves, wild dogs, hyenas and foxes
# (269-280), house cats (281-285) and wild cats (286-293) -- are exactly the wnids from n02085620
# (Chihuahua) to n02130308 (cheetah). A cats-vs-dogs version SHOULD take those for its own, so they
# are neither in nor out of distribution here: left out. In photos/ that range holds 32 dog
# breeds and one wild dog (the dhole); no wolf, fox, hyena or cat class is present.
OOD_EXCLUDED_WNIDS = ("n02085620", "n02130308")  # inclusive range of wnids left out
OOD_EXCLUDED = {  # the files that range covers, written out (checked against the range at start-up)
    "train": """n02085782_Japanese_spaniel n02085936_Maltese_dog n02088466_bloodhound n02091134_whippet
        n02091467_Norwegian_elkhound n02093256_Staffordshire_bullterrier n02094433_Yorkshire_terrier
        n02095570_Lakeland_terrier n02096051_Airedale n02096177_cairn n02098286_West_Highland_white_terrier
        n02098413_Lhasa n02099429_curly-coated_retriever n02100735_English_setter n02102480_Sussex_spaniel
        n02102973_Irish_water_spaniel n02104029_kuvasz n02105505_komondor n02110627_affenpinscher
        n02110958_pug n02111129_Leonberg n02113978_Mexican_hairless n02115913_dhole""".split(),
    "test": """n02085620_Chihuahua n02089867_Walker_hound n02089973_English_foxhound n02095889_Sealyham_terrier
        n02096437_Dandie_Dinmont n02099267_flat-coated_retriever n02102040_English_springer
        n02106166_Border_collie n02107908_Appenzeller""".split(),
}


def _wnid(path: Path) -> str:
    return re.match(r"imagenet_(n\d{8})_", path.name).group(1)


def photo_sets() -> dict[str, list[Path]]:
    """kaggle_train / kaggle_test (in distribution, labels cat | dog), imagenet_train / imagenet_test
    (out of distribution, OOD_EXCLUDED removed), catbreeds_test (cats from another source: shown, not scored)."""
    root = DATASETS / "photos"
    files = lambda split, pattern: sorted(p for label in ("cat", "noncat") for p in (root / split / label).glob(pattern))  # noqa: E731
    sets = {f"kaggle_{s}": files(s, "kaggle_*") for s in ("train", "test")}
    lo, hi = OOD_EXCLUDED_WNIDS
    for split in ("train", "test"):
        every = files(split, "imagenet_*")
        excluded = sorted(p.name[len("imagenet_"):].rsplit(".", 1)[0] for p in every if lo <= _wnid(p) <= hi)
        assert excluded == sorted(OOD_EXCLUDED[split]), f"{split}: the wnid range and the written list disagree: {excluded}"
        sets[f"imagenet_{split}"] = [p for p in every if not lo <= _wnid(p) <= hi]
    sets["catbreeds_test"] = files("test", "catbreeds_*")
    return sets


def kaggle_label(path: Path) -> int:
    """0 cat, 1 dog (the labels' sorted order, as models.train numbers them)."""
    return 0 if path.name.startswith("kaggle_cat.") else 1


def load_features(cache_dir: Path) -> tuple[dict[str, np.ndarray], str]:
    """{set name: (N, 2560) float32} in photo_sets() order, computed once, then read from cache_dir."""
    import torch

    from models import networks
    from models.config import TrainConfig
    from models.features import warm_extractor

    sets = photo_sets()
    cfg = TrainConfig().resolved()  # what a default training resolves to: linear, int8, 288 px, avgmax
    arch = {"name": cfg.architecture, "image_size": cfg.image_size, "pooling": cfg.pooling, "num_classes": 2}
    prep = networks.default_preprocessing(cfg.architecture, cfg.image_size, cfg.resize, cfg.crop_fraction)
    names = "\n".join(f"{k}:{p.name}" for k, v in sets.items() for p in v)
    key = hashlib.sha256(f"{cfg.to_dict()}\n{names}".encode()).hexdigest()[:16]
    path = cache_dir / f"features-{key}.npz"
    if path.exists():
        data = np.load(path)
        return {k: data[k] for k in sets}, str(data["extractor_id"])
    extractor = warm_extractor(arch, prep, torch.device("cpu"), None, batch_size=cfg.batch_size, precision=cfg.precision)
    out, t = {}, time.perf_counter()
    for name, paths in sets.items():
        out[name] = extractor.extract([p.read_bytes for p in paths])
        print(f"  features {name}: {len(paths)} images, {time.perf_counter() - t:.0f} s", flush=True)
    cache_dir.mkdir(parents=True, exist_ok=True)
    np.savez(path, extractor_id=extractor.extractor_id, **out)
    return out, extractor.extractor_id


# --- methods: fit(X, y) on training features -> Fitted(score, training scores, stored bytes) ---------------

class Fitted:
    def __init__(self, score, train_scores: np.ndarray | None, nbytes: int, threshold: float | None = None):
        self.score = score  # (N, 2560) features -> (N,) scores, higher = less like the training images
        self.nbytes = int(nbytes)  # what the version would store beyond what it has today
        # flagged above the 99th percentile of the training images' leave-one-out / out-of-fold scores
        self.threshold = threshold if threshold is not None else float(np.quantile(train_scores, 0.99))


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _avg(x: np.ndarray) -> np.ndarray:
    """The average-pooled half of avgmax features (the other half is the max-pooled one)."""
    return x[:, : x.shape[1] // 2]


def _oof(fit_scorer, X: np.ndarray, y: np.ndarray, folds: int = 5, seed: int = 0) -> np.ndarray:
    """Out-of-fold training scores for methods without an exact leave-one-out."""
    fold, out = _folds(y, folds, seed), None
    for f in range(folds):
        part = fit_scorer(X[fold != f], y[fold != f])(X[fold == f])
        out = np.zeros((len(X), *part.shape[1:])) if out is None else out
        out[fold == f] = part
    return out


def _folds(y: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Stratified fold id per row (rows of each label dealt round-robin in a random order)."""
    rng, fold = np.random.default_rng(seed), np.zeros(len(y), np.int64)
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        fold[idx] = np.arange(len(idx)) % k
    return fold


def knn(k: int = 1, part: str = "avg", max_index: int = 2048):
    """models.ood: cosine kNN over a capped, int8 sample of the training features (what would ship)."""
    from models.ood import fit_ood

    def fit(X, y):
        index = fit_ood(X, y, max_index=max_index, seed=0, k=k, dims=X.shape[1] // 2 if part == "avg" else None)
        return Fitted(index.score, None, index.nbytes, index.threshold)  # index.threshold: 1% flagged

    return fit


def knn_numpy(k: int = 1, part: str = "avg", cap: int | None = None, select: str = "random", pca: int | None = None,
              dtype=np.float32):
    """Cosine kNN variants the shipped code does not take: float16/float32 storage, PCA, k-center,
    k-means centroids. Training scores: exact leave-one-out (rows that are not in the index are
    held out already), out-of-fold for k-means (its centroids are not training rows)."""
    feat = _avg if part == "avg" else (lambda x: x)

    def build(X, y):
        Z = _unit(feat(X))
        P = None
        if pca:
            mu = Z.mean(0)
            P = np.linalg.svd(Z - mu, full_matrices=False)[2][:pca].astype(np.float32)  # uncentred projection: measured better
        embed = (lambda A: _unit(A @ P.T)) if P is not None else (lambda A: A)
        E = embed(Z)
        m = len(E) if cap is None else min(cap, len(E))
        if select == "random":
            idx = np.sort(np.random.default_rng(0).permutation(len(E))[:m])
            V = E[idx]
        elif select == "kcenter":  # farthest-point: each pick the training row farthest from those picked
            idx, dist = [0], 1 - E @ E[0]
            for _ in range(m - 1):
                idx.append(int(dist.argmax()))
                dist = np.minimum(dist, 1 - E @ E[idx[-1]])
            idx = np.array(idx)
            V = E[idx]
        else:  # kmeans: spherical k-means, 20 rounds
            idx, V = None, E[np.random.default_rng(0).permutation(len(E))[:m]].copy()
            for _ in range(20):
                a = (E @ V.T).argmax(1)
                V = _unit(np.stack([E[a == j].mean(0) if (a == j).any() else V[j] for j in range(m)]))
        V = V.astype(dtype)
        Vf = V.astype(np.float32)
        score = lambda A: 1 - np.sort(embed(_unit(feat(A))) @ Vf.T, axis=1)[:, -k]  # noqa: E731
        return score, E, idx, Vf, V.nbytes + (P.astype(dtype).nbytes if P is not None else 0)

    def fit(X, y):
        score, E, idx, Vf, nbytes = build(X, y)
        if idx is None:
            train = _oof(lambda a, b: build(a, b)[0], X, y)
        else:
            S = E @ Vf.T
            S[idx, np.arange(len(idx))] = -np.inf  # an index member is not its own neighbour
            train = 1 - np.sort(S, axis=1)[:, -k]
        return Fitted(score, train, nbytes)

    return fit


def prototypes(X, y):
    """Cosine distance to the nearest label mean (of unit average-pooled features); exact leave-one-out."""
    Z = _unit(_avg(X))
    labels = np.unique(y)
    sums = np.stack([Z[y == c].sum(0) for c in labels])
    counts = np.array([(y == c).sum() for c in labels])
    P = _unit(sums / counts[:, None])
    own = np.searchsorted(labels, y)
    loo = []
    for i, z in enumerate(Z):
        s = sums.copy()
        s[own[i]] -= z
        loo.append(1 - (_unit(s) @ z).max())
    return Fitted(lambda A: 1 - (_unit(_avg(A)) @ P.T).max(1), loo, P.astype(np.float32).nbytes)


def mahalanobis_pca(dims: int = 256, part: str = "raw"):
    """Mahalanobis distance on the top `dims` principal components (one Gaussian over all labels)."""
    feat = _avg if part == "avg" else (lambda x: x)

    def scorer(X, y):
        Z = feat(X)
        mu = Z.mean(0)
        _, s, Vt = np.linalg.svd(Z - mu, full_matrices=False)
        P, var = Vt[:dims], s[:dims] ** 2 / (len(Z) - 1)
        scorer.nbytes = (mu.size + P.size + var.size) * 4
        return lambda A: (((feat(A) - mu) @ P.T) ** 2 / var).sum(1)

    def fit(X, y):
        return Fitted(scorer(X, y), _oof(scorer, X, y), scorer.nbytes)

    return fit


def mahalanobis_classes(shrink: float = 0.1):
    """Class-conditional Mahalanobis (Lee et al. 2018: label means, one shared covariance), on unit
    average-pooled features, covariance shrunk towards its mean variance; distance to the nearest mean."""
    def scorer(X, y):
        Z = _unit(_avg(X))
        labels = np.unique(y)
        mus = np.stack([Z[y == c].mean(0) for c in labels])
        R = Z - mus[np.searchsorted(labels, y)]
        C = R.T @ R / len(Z)
        C = (1 - shrink) * C + shrink * np.trace(C) / len(C) * np.eye(len(C))
        prec = np.linalg.inv(C).astype(np.float32)
        scorer.nbytes = prec.nbytes + mus.astype(np.float32).nbytes

        def score(A):
            D = (_unit(_avg(A))[:, None, :] - mus[None]).reshape(-1, len(prec)).astype(np.float32)  # (N * K, d)
            return ((D @ prec) * D).sum(1).reshape(len(A), len(mus)).min(1)

        return score

    def fit(X, y):
        return Fitted(scorer(X, y), _oof(scorer, X, y), scorer.nbytes)

    return fit


class Head:
    """The version's own head as users have it today (linear.fit; l2 and T by 5-fold CV on the
    whole training set, as models.train chooses them); its out-of-fold logits give the training
    scores. With two labels the max softmax probability and the energy rank images alike: the
    L2-penalised softmax head has W_cat = -W_dog, so both are functions of |logit difference|."""

    def __init__(self, X: np.ndarray, y: np.ndarray):
        self.X, self.y, self.l2, self.temperature = X, y, None, None

    def _choose(self):  # on first use: the cross-validation is the slow part of the bench
        from models import calibrate, linear

        if self.l2 is None:
            cv = linear.cross_val_logits(self.X, self.y, 2, _folds(self.y, 5, 0))
            temps = {l2: calibrate.fit_temperature(z, self.y) for l2, z in cv.items()}
            self.l2 = min(cv, key=lambda l2: calibrate.log_loss(cv[l2], self.y, temps[l2]))
            self.temperature = temps[self.l2]

    def fit(self, kind: str):
        from models import linear

        def logits_fn(X, y):
            self._choose()
            head = linear.fit(X, y, 2, self.l2)
            return lambda A: head.logits(A) / self.temperature

        def to_score(z):  # z = logits / T
            top = z.max(1)
            sum_exp = np.exp(z - top[:, None]).sum(1)
            if kind == "msp":  # 1 - the largest calibrated probability
                return 1 - 1 / sum_exp
            return -self.temperature * (top + np.log(sum_exp))  # energy: -T logsumexp(logits / T)

        def fit(X, y):
            z = logits_fn(X, y)
            return Fitted(lambda A: to_score(z(A)), to_score(_oof(logits_fn, X, y)), 0)

        return fit


# --- measuring ------------------------------------------------------------------------------------------

def methods(head: Head) -> dict:
    """name -> fit(X, y). The first block is the family models.ood implements (int8, capped)."""
    return {
        "knn k=1 avg (models.ood)": knn(1, "avg"),
        "knn k=5 avg (models.ood)": knn(5, "avg"),
        "knn k=1 avgmax (models.ood)": knn(1, "avgmax"),
        "knn k=5 avgmax (models.ood)": knn(5, "avgmax"),
        "knn k=1 avg cap 256 (models.ood)": knn(1, "avg", max_index=256),
        "knn k=5 avg cap 256 (models.ood)": knn(5, "avg", max_index=256),
        "knn k=1 avg cap 128 (models.ood)": knn(1, "avg", max_index=128),
        "knn k=1 avg float32 all": knn_numpy(1, "avg"),
        "knn k=1 avg float16 pca 256": knn_numpy(1, "avg", pca=256, dtype=np.float16),
        "knn k=1 avg float16 pca 128": knn_numpy(1, "avg", pca=128, dtype=np.float16),
        "knn k=1 avg cap 256 k-center": knn_numpy(1, "avg", cap=256, select="kcenter"),
        "knn k=1 avg 256 k-means": knn_numpy(1, "avg", cap=256, select="kmeans"),
        "prototypes avg": prototypes,
        "mahalanobis pca 256 avgmax": mahalanobis_pca(256, "raw"),
        "mahalanobis pca 256 avg": mahalanobis_pca(256, "avg"),
        "mahalanobis labels avg shrink 0.1": mahalanobis_classes(0.1),
        "head: max softmax (today)": head.fit("msp"),
        "head: energy": head.fit("energy"),
    }


def rates(fitted: Fitted, inside: np.ndarray, outside: np.ndarray) -> tuple[float, float, float]:
    """(AUROC, share of in-distribution flagged, share of OOD flagged) at the fitted threshold."""
    from models.evaluate import roc_auc

    si, so = fitted.score(inside), fitted.score(outside)
    auc = roc_auc(np.concatenate([si, so]), np.r_[np.zeros(len(si), bool), np.ones(len(so), bool)])
    return auc, float((si > fitted.threshold).mean()), float((so > fitted.threshold).mean())


def cross_validate(fit, X: np.ndarray, y: np.ndarray, ood: np.ndarray, folds: int) -> tuple[float, float, float, float]:
    """Fit on folds-1 parts of X, score the held-out part and one part of the OOD set: (mean AUROC,
    min AUROC, pooled share of in-distribution flagged, pooled share of OOD flagged)."""
    fold, ood_fold = _folds(y, folds, 1), np.random.default_rng(1).permutation(len(ood)) % folds
    aucs, flagged_in, flagged_out = [], 0.0, 0.0
    for f in range(folds):
        auc, fi, fo = rates(fit(X[fold != f], y[fold != f]), X[fold == f], ood[ood_fold == f])
        aucs.append(auc)
        flagged_in += fi * (fold == f).sum()
        flagged_out += fo * (ood_fold == f).sum()
    return float(np.mean(aucs)), float(np.min(aucs)), flagged_in / len(X), flagged_out / len(ood)


def per_image_us(fitted: Fitted, X: np.ndarray, batch: int, repeats: int = 200) -> float:
    """Median microseconds per image to score a batch (numpy, this process's BLAS threads)."""
    x = np.ascontiguousarray(X[:batch])
    for _ in range(5):
        fitted.score(x)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fitted.score(x)
        times.append(time.perf_counter() - t)
    return float(np.median(times)) / batch * 1e6


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return f"{line.split(':', 1)[1].strip()}, {os.cpu_count()} cores visible"
    return "unknown CPU"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", type=Path, default=Path("/tmp/felis-ood"))
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--only", default="", help="run only the methods whose name contains this")
    args = ap.parse_args()
    from models.runtime import tune_process

    tune_process(0)
    sets = photo_sets()
    feats, extractor_id = load_features(args.cache)
    X, y = feats["kaggle_train"], np.array([kaggle_label(p) for p in sets["kaggle_train"]])
    print(f"features: {extractor_id}")
    print(f"in distribution: {len(X)} kaggle_ train ({np.bincount(y).tolist()} cat/dog), {len(feats['kaggle_test'])} test; "
          f"OOD: {len(feats['imagenet_train'])} imagenet_ train, {len(feats['imagenet_test'])} test "
          f"(wnids {OOD_EXCLUDED_WNIDS[0]}..{OOD_EXCLUDED_WNIDS[1]} left out); threshold: 1% of training scores flagged")
    print(f"machine: {cpu_name()}\n")
    head = Head(X, y)
    cols = "test AUROC  ID%   OOD%  | cv AUROC (min)   ID%   OOD%  | cat-breeds% |     bytes | us/img @1  @32"
    print(f"{'method':34s} {cols}")
    rows = {}
    for name, fit in methods(head).items():
        if args.only not in name:
            continue
        fitted = fit(X, y)
        auc, fi, fo = rates(fitted, feats["kaggle_test"], feats["imagenet_test"])
        cv_auc, cv_min, cv_i, cv_o = cross_validate(fit, X, y, feats["imagenet_train"], args.folds)
        breeds = float((fitted.score(feats["catbreeds_test"]) > fitted.threshold).mean())
        t1, t32 = per_image_us(fitted, feats["kaggle_test"], 1), per_image_us(fitted, feats["kaggle_test"], 32)
        rows[name] = (auc, fi, fo, cv_auc, cv_i, cv_o)
        print(f"{name:34s}   {auc:.4f} {100 * fi:4.1f} {100 * fo:6.1f}  |  {cv_auc:.4f} ({cv_min:.4f}) {100 * cv_i:4.1f} {100 * cv_o:6.1f}  |"
              f"  {100 * breeds:6.1f}     | {fitted.nbytes:9,d} | {t1:8.0f} {t32:5.0f}", flush=True)
    if head.l2 is not None:
        print(f"(head: l2 {head.l2}, temperature {head.temperature:.3f})")
    chosen = "knn k=5 avg (models.ood)"
    if chosen not in rows:
        return 0
    chosen_details(feats, sets, X, y)
    auc, fi, fo, cv_auc, cv_i, cv_o = rows[chosen]
    ok = min(auc, cv_auc) >= 0.99 and max(fi, cv_i) <= 0.02 and min(fo, cv_o) >= 0.95
    print(f"\nchosen: {chosen}: test AUROC {auc:.4f}, {100 * fi:.1f}% in-distribution and {100 * fo:.1f}% OOD flagged; "
          f"cv {cv_auc:.4f}, {100 * cv_i:.1f}% / {100 * cv_o:.1f}%")
    print("PASS" if ok else "FAIL", "(target: AUROC >= 0.99, <= 2% in-distribution flagged, >= 95% OOD flagged; test and cv)")
    return 0 if ok else 1


def chosen_details(feats: dict, sets: dict, X: np.ndarray, y: np.ndarray) -> None:
    """What models.ood's defaults flag and miss on photos/, and their cost with a full index."""
    from models.ood import fit_ood

    index = fit_ood(X, y, max_index=2048, seed=0, dims=X.shape[1] // 2)
    print(f"\nmodels.ood defaults (k={index.k}, dims={index.dims}): threshold {index.threshold:.4f}; "
          f"threshold_for(0.05) {index.threshold_for(0.05):.4f}, (0.001) {index.threshold_for(0.001):.4f}")
    for name, want in (("kaggle_test", False), ("imagenet_test", True), ("imagenet_train", True), ("catbreeds_test", False)):
        s = index.score(feats[name])
        odd = [f"{p.name} ({v:.3f})" for p, v in zip(sets[name], s) if (v > index.threshold) != want]
        print(f"  {name}: {'missed' if want else 'flagged'} {len(odd)}/{len(s)}: {', '.join(odd) or '-'}")
    rng = np.random.default_rng(0)  # an index at the cap: 2,048 vectors from 4,000 jittered copies of the 800
    many = np.repeat(X, 5, axis=0) * rng.uniform(0.8, 1.2, (len(X) * 5, X.shape[1])).astype(np.float32)
    t = time.perf_counter()
    full = fit_ood(many, np.repeat(y, 5), max_index=2048, seed=0, dims=X.shape[1] // 2)
    fit_s = time.perf_counter() - t
    fitted = Fitted(full.score, None, full.nbytes, full.threshold)
    print(f"  at the cap ({len(full.codes)} vectors): stored {full.nbytes:,d} bytes, {full.vectors.nbytes:,d} as float32 in memory; "
          f"fit on {len(many)} images {fit_s:.1f} s; scoring {per_image_us(fitted, feats['kaggle_test'], 1):.0f} us/image alone, "
          f"{per_image_us(fitted, feats['kaggle_test'], 32):.0f} in a batch of 32")

if __name__ == "__main__":
    sys.exit(main())
