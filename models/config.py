"""TrainConfig: every knob of a training run, with units, validation and the resolved defaults.

A config with None fields means "the default for this architecture and mode"; `resolved()`
fills them in. The service validates (`from_dict`) and resolves a request's config once, when the
training is requested; the resolved copy is what the training row, the version row, the
checkpoint and the API show. The None that stay after resolving mean what their comment says
(l2: picked by cross-validation; time_budget_s: no limit; patience: never stop early; the
finetune-only fields in linear mode: unused, and augmentation there 'none').
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

from . import catalog
from .catalog import SIMPLE_CNN_DEFAULTS
from .preprocess import RESIZE_MODES
from .split import MAX_NEAR_DUPLICATE_BITS

AUGMENTATIONS = {True: "crop+flip", False: "none", "crop+flip": "crop+flip", "flip": "flip", "crop": "crop", "none": "none"}
LABEL_ISSUE_POLICIES = ("auto", "drop", "keep")
MAX_L2 = 1e4  # the L2 grid is 0.01..1 on standardised features; far past it every weight is ~0 (and 1e308 overflows float32)
MAX_SEED = 2**32 - 1  # numpy's and most tools' seed range (a seed of 1e26 overflowed torch.manual_seed in the worker)
FINETUNE_DEFAULTS = dict(epochs=6, learning_rate=5e-4, weight_decay=0.05, batch_size=32, label_smoothing=0.1)
FINETUNE_ONLY = ("epochs", "time_budget_s", "learning_rate", "weight_decay", "augmentation", "label_smoothing", "patience")


_TYPES = {"int": int, "float": (int, float), "str": str, "bool": bool, "None": type(None)}


def _type_ok(value, annotation: str) -> bool:
    """isinstance against a 'int | None'-style annotation; bools are not numbers here."""
    allowed = [_TYPES[t.strip()] for t in annotation.split("|")]
    if isinstance(value, bool):
        return bool in allowed
    return isinstance(value, tuple(t for a in allowed for t in (a if isinstance(a, tuple) else (a,))))


class InvalidTrainConfig(ValueError):
    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field, self.message = field, message


@dataclass
class TrainConfig:
    architecture: str = "efficientnet_lite0"  # efficientnet_lite0 | simple_cnn | torchvision name (resnet18, mobilenet_v3_large, ...)
    mode: str = "auto"  # linear: frozen pretrained features + logistic head; finetune: train the whole net; auto: finetune for simple_cnn, else linear
    image_size: int | None = None  # pixels per side; None: 288 (lite0 linear), 224 (other pretrained / finetune), 64 (simple_cnn)
    resize: str = "center_crop"  # center_crop (aspect kept) | squash (whole picture)
    crop_fraction: float | None = None  # central fraction of the side kept; None: 0.875 pretrained (ImageNet eval crop), 1.0 simple_cnn
    width: int | None = None  # simple_cnn: channels of the first conv block (x2 per block); None: simple_cnn default
    pooling: str | None = None  # avg | avgmax (concat of global average and max); None: avgmax for linear, avg for finetune
    epochs: int | None = None  # finetune: passes over the train split; None: 40 simple_cnn, 6 pretrained
    time_budget_s: float | None = None  # finetune: seconds for the epoch loop, best epoch kept; None: no limit
    learning_rate: float | None = None  # finetune: AdamW peak learning rate; None: 3e-3 simple_cnn, 5e-4 pretrained
    weight_decay: float | None = None  # finetune: AdamW decoupled weight decay; None: 5e-4 simple_cnn, 0.05 pretrained
    batch_size: int | None = None  # images per step / per feature batch; None: 64 simple_cnn, 32 otherwise
    augmentation: bool | str = True  # finetune: True = "crop+flip" | "flip" | "crop" | False = "none"
    label_smoothing: float | None = None  # finetune: cross-entropy smoothing; None: 0.1
    patience: int | None = None  # finetune: epochs without val-loss improvement before stopping; None: never
    l2: float | None = None  # linear: L2 strength on standardised features; None: picked by CV from linear.L2_GRID
    cv_folds: int = 5  # linear: folds for choosing l2 and the temperature (fewer if a label has fewer images)
    calibrate: bool = True  # fit a softmax temperature (linear: on CV logits; finetune: on val, if it helps)
    refit_full: bool = True  # linear: ship a head refitted on train+val (metrics still come from the train-split head)
    val_fraction: float = 0.15  # share of each label held out for validation (0: metrics from CV instead)
    near_duplicate_bits: int = 6  # pHash Hamming distance that makes two images one group in splits
    seed: int = 0  # splits, folds, initialisation, shuffling, augmentation
    export_onnx: bool = True  # also return the ONNX graph of the model
    label_issues: str = "auto"  # linear: the images the label-error report flags are dropped from the shipped head: auto (when cross-validation says it helps) | drop | keep
    precision: str = "auto"  # linear: int8 (quantized backbone, features and served graph; ~2x faster on CPU) | fp32; auto: int8 where a range table ships (efficientnet_lite0)

    def validate(self) -> "TrainConfig":
        def need(ok: bool, name: str, msg: str):
            if not ok:
                raise InvalidTrainConfig(name, msg)

        for f in fields(self):  # types first: a string where a number belongs is a 4xx, not a crash
            value = getattr(self, f.name)
            need(_type_ok(value, f.type), f.name, f"must be {f.type}, got {type(value).__name__}")
            need(not isinstance(value, float) or math.isfinite(value), f.name, "must be a finite number")
        need(catalog.is_supported(self.architecture), "architecture", f"unknown architecture {self.architecture!r}")
        need(self.mode in ("auto", "linear", "finetune"), "mode", "must be auto, linear or finetune")
        need(not (self.mode == "linear" and self.architecture == "simple_cnn"), "mode", "simple_cnn has no pretrained features; use finetune")
        need(self.image_size is None or 16 <= self.image_size <= 1024, "image_size", "must be 16..1024 pixels")
        need(self.resize in RESIZE_MODES, "resize", f"must be one of {RESIZE_MODES}")
        need(self.crop_fraction is None or 0.25 <= self.crop_fraction <= 1.0, "crop_fraction", "must be 0.25..1.0")
        need(self.pooling in (None, "avg", "avgmax"), "pooling", "must be avg or avgmax")
        need(self.width is None or (self.architecture == "simple_cnn" and 4 <= self.width <= 256), "width", "simple_cnn only, 4..256 channels")
        need(self.epochs is None or 1 <= self.epochs <= 1000, "epochs", "must be 1..1000")
        need(self.time_budget_s is None or self.time_budget_s > 0, "time_budget_s", "must be > 0 seconds")
        need(self.learning_rate is None or 0 < self.learning_rate <= 1, "learning_rate", "must be in (0, 1]")
        need(self.weight_decay is None or 0 <= self.weight_decay <= 1, "weight_decay", "must be in [0, 1]")
        need(self.batch_size is None or 2 <= self.batch_size <= 1024, "batch_size", "must be 2..1024")
        need(self.augmentation in AUGMENTATIONS, "augmentation", f"must be one of {list(AUGMENTATIONS)}")
        need(self.label_smoothing is None or 0 <= self.label_smoothing < 1, "label_smoothing", "must be in [0, 1)")
        need(self.patience is None or self.patience >= 1, "patience", "must be >= 1 epoch")
        need(self.l2 is None or 0 < self.l2 <= MAX_L2, "l2", f"must be in (0, {MAX_L2:g}]")
        need(2 <= self.cv_folds <= 20, "cv_folds", "must be 2..20")
        need(0 <= self.val_fraction <= 0.5, "val_fraction", "must be 0..0.5")
        need(0 <= self.near_duplicate_bits <= MAX_NEAR_DUPLICATE_BITS, "near_duplicate_bits",
             f"must be 0..{MAX_NEAR_DUPLICATE_BITS} (beyond, unrelated photos match)")
        need(isinstance(self.seed, int) and 0 <= self.seed <= MAX_SEED, "seed", f"must be an integer 0..{MAX_SEED}")
        need(self.precision in ("auto", "int8", "fp32"), "precision", "must be auto, int8 or fp32")
        need(self.label_issues in LABEL_ISSUE_POLICIES, "label_issues", f"must be one of {LABEL_ISSUE_POLICIES}")
        if self.precision == "int8":
            need(self.mode != "finetune" and self.architecture != "simple_cnn", "precision", "int8 is for linear mode (a frozen, quantized backbone)")
            need(self.architecture in catalog.INT8_BACKBONES, "precision", f"int8 needs a range table; available for {sorted(catalog.INT8_BACKBONES)}")
        return self

    def check_given(self, given: dict) -> None:
        """After resolved(): refuse an option the request gave (not null) that this mode never
        reads, rather than echo it as if it were used: a linear training has no epochs."""
        if self.mode == "linear":
            for name in FINETUNE_ONLY:
                if given.get(name) is not None:
                    raise InvalidTrainConfig(name, f"fine-tuning only; a training of {self.architecture} is linear (frozen "
                                                   'features and a fitted head) unless its options say "mode": "finetune"')

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise InvalidTrainConfig(unknown[0], "unknown field")
        try:
            return cls(**d).validate()
        except TypeError as e:
            raise InvalidTrainConfig("config", str(e)) from None

    @classmethod
    def from_stored(cls, d: dict) -> "TrainConfig":
        """A config recorded by the service (validated when it was requested): no second validation."""
        return cls(**d)

    def resolved(self, *, int8_available: bool = True) -> "TrainConfig":
        """A copy with every default filled in with the concrete value that will be used. Idempotent.
        int8_available=False resolves precision auto to fp32 (pretrained weights the shipped range
        table may not describe)."""
        c = TrainConfig(**asdict(self))
        scratch = c.architecture == "simple_cnn"
        if c.mode == "auto":  # linear on photos: 99.3% test, 99.1% 5-fold CV in ~19 s on 2 CPUs; a 2-epoch fine-tune: 98.6% in ~100 s
            c.mode = "finetune" if scratch else "linear"
        defaults = SIMPLE_CNN_DEFAULTS if scratch else FINETUNE_DEFAULTS
        c.image_size = c.image_size or catalog.default_image_size(c.architecture, c.mode)
        c.crop_fraction = c.crop_fraction if c.crop_fraction is not None else (1.0 if scratch else 0.875)
        if scratch:
            c.width = c.width or defaults["width"]
        c.pooling = c.pooling or ("avgmax" if c.mode == "linear" else "avg")
        c.batch_size = c.batch_size or defaults["batch_size"]
        c.augmentation = AUGMENTATIONS[c.augmentation] if c.mode == "finetune" else "none"  # frozen features: none
        if c.precision == "auto":
            c.precision = catalog.default_precision(c.architecture, c.mode) if int8_available else "fp32"
        if c.mode == "finetune":
            c.epochs = c.epochs or defaults["epochs"]
            c.learning_rate = c.learning_rate or defaults["learning_rate"]
            c.weight_decay = c.weight_decay if c.weight_decay is not None else defaults["weight_decay"]
            c.label_smoothing = c.label_smoothing if c.label_smoothing is not None else defaults["label_smoothing"]
        return c
