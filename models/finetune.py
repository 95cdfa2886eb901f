"""End-to-end training of a whole network: simple_cnn from scratch, or fine-tuning a pretrained one.

airbench-style: every image is decoded and resized once into a uint8 tensor that stays resident
on the device; each batch is indexed out of it as uint8 and only then converted to float and
normalised, on the device. Augmentation (random crop with reflection padding, horizontal flip) is
one gather on that batch. AdamW with a OneCycle schedule, bf16 autocast where the hardware has it
natively, channels_last, cudnn.benchmark while training on CUDA (restored afterwards). The step
loop never waits for the accelerator: random draws come from a CPU generator (the same numbers on
every device) and go over with non-blocking copies, the training loss is summed on the device and
read once per epoch; so per-step progress events carry no loss, the epoch's event does.
A completed schedule returns the last epoch (the learning rate has annealed; picking the "best"
epoch on ~30 validation images cost 20 points of test accuracy on catvnoncat); a run stopped
early (patience, time budget) returns the epoch with the lowest validation loss.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .networks import normalizer
from .preprocess import Preprocessing
from .runtime import use_bf16


@dataclass
class FinetuneParams:
    epochs: int  # passes over the training split
    learning_rate: float  # AdamW peak learning rate (OneCycle)
    weight_decay: float  # AdamW decoupled weight decay
    batch_size: int  # images per step
    augmentation: str  # "crop+flip" | "flip" | "crop" | "none"
    label_smoothing: float = 0.0  # cross-entropy target smoothing
    patience: int | None = None  # epochs without val-loss improvement before stopping; None: never
    time_budget_s: float | None = None  # seconds for the epoch loop; the best epoch so far is kept
    backbone_lr_scale: float = 1.0  # learning-rate multiplier for the (pretrained) backbone


def _reflect(i: torch.Tensor, size: int) -> torch.Tensor:
    """Index into a dimension of `size` for index i of its reflection padding (F.pad mode="reflect",
    offset by the pad: -1 -> 1, size -> size - 2); valid for -size < i < 2 * size - 1."""
    return (size - 1) - ((size - 1) - i.abs()).abs()


def augment(x: torch.Tensor, mode: str, gen: torch.Generator) -> torch.Tensor:
    """Random translation (reflect-pad by S/16, crop back to S) and/or horizontal flip, per image.

    x is NCHW of any dtype (uint8 in training) on any device; the result keeps both. The offsets
    (x, then y) and flips are drawn from gen on its device, in that order, then cross in one
    non-blocking copy; the crop and the flip are a single gather through per-image row and column
    indices, the same pixels as padding and slicing image by image.
    """
    crop, flip = "crop" in mode, "flip" in mode
    if not (crop or flip):
        return x
    n, c, h, w = x.shape
    pad = max(1, h // 16)
    draws = []
    if crop:
        draws += [torch.randint(0, 2 * pad + 1, (n,), generator=gen, device=gen.device) for _ in "xy"]
    if flip:
        draws.append((torch.rand(n, generator=gen, device=gen.device) < 0.5).long())
    draws = torch.stack(draws).to(x.device, non_blocking=True)  # pageable source: staged at once, no stream sync
    rows = torch.arange(h, device=x.device).expand(n, h)
    cols = torch.arange(w, device=x.device).expand(n, w)
    if crop:
        cols = _reflect(cols + (draws[0] - pad)[:, None], w)
        rows = _reflect(rows + (draws[1] - pad)[:, None], h)
    if flip:
        cols = torch.where(draws[-1].bool()[:, None], cols.flip(1), cols)
    pixel = (rows[:, :, None] * w + cols[:, None, :]).view(n, 1, h * w).expand(n, c, h * w)
    return x.reshape(n, c, h * w).gather(2, pixel).view(n, c, h, w)  # 5x faster on CPU than x[i, c, r, q]


def _autocast(device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16(device))


@contextlib.contextmanager
def _cudnn_benchmark(device: torch.device):
    """cudnn.benchmark on for training on CUDA (fixed batch shapes: autotuned kernels pay back), then
    back to what it was; the process-wide flag is not touched for other devices."""
    if device.type != "cuda":
        yield
        return
    before = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = before


@torch.no_grad()
def predict_logits(model: nn.Module, x_u8: torch.Tensor, norm, device: torch.device, batch_size: int = 64) -> np.ndarray:
    """Logits (before temperature) for resident uint8 images, float32 numpy."""
    model.eval()
    out = []
    for i in range(0, len(x_u8), batch_size):
        with _autocast(device):
            out.append(model(norm(x_u8[i : i + batch_size]).contiguous(memory_format=torch.channels_last)).float())
    return torch.cat(out).cpu().numpy() if out else np.zeros((0, model.head.out_features), np.float32)


@torch.no_grad()
def predict_features(model: nn.Module, x_u8: torch.Tensor, norm, device: torch.device, batch_size: int = 64) -> np.ndarray:
    """Pooled penultimate features (N, D) float32 for resident uint8 images, in eval mode and in
    float32 (no autocast): the features the exported graph computes, which the open-set index holds."""
    model.eval()
    out = [model.features(norm(x_u8[i : i + batch_size].to(device)).contiguous(memory_format=torch.channels_last)).float().cpu()
           for i in range(0, len(x_u8), batch_size)]
    return torch.cat(out).numpy() if out else np.zeros((0, model.head.in_features), np.float32)


def train_network(model: nn.Module, x_train: torch.Tensor, y_train: torch.Tensor, x_val: torch.Tensor, y_val: torch.Tensor, prep: Preprocessing, params: FinetuneParams, device: torch.device, seed: int, progress: Callable[[dict], None], should_stop: Callable[[], None]) -> tuple[nn.Module, list[dict]]:
    """Train in place; returns (the model, per-epoch history)."""
    with _cudnn_benchmark(device):
        model.to(device=device, memory_format=torch.channels_last)
        x_train, y_train, x_val, y_val = (t.to(device) for t in (x_train, y_train, x_val, y_val))
        norm = normalizer(prep, device)
        gen = torch.Generator().manual_seed(seed)  # CPU generator: same shuffles on every device
        head_params = list(model.head.parameters())
        body_params = [p for n, p in model.named_parameters() if not n.startswith("head.")]
        groups = [{"params": body_params, "lr": params.learning_rate * params.backbone_lr_scale}, {"params": head_params, "lr": params.learning_rate}]
        opt = torch.optim.AdamW(groups, weight_decay=params.weight_decay)
        steps_per_epoch = max(1, -(-len(x_train) // params.batch_size))
        total_steps = params.epochs * steps_per_epoch
        if total_steps >= 8:
            sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[g["lr"] for g in groups], total_steps=total_steps, pct_start=0.25)
        else:  # too few steps for a one-cycle warm-up (at 4, OneCycleLR divides by zero): a constant rate
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
        best, best_loss, since_best, history = None, float("inf"), 0, []
        started = time.monotonic()
        for epoch in range(1, params.epochs + 1):
            model.train()
            order = torch.randperm(len(x_train), generator=gen).to(device, non_blocking=True)
            total_loss, seen = torch.zeros((), dtype=torch.float64, device=device), 0  # read once, after the epoch
            for step in range(steps_per_epoch):
                should_stop()
                idx = order[step * params.batch_size : (step + 1) * params.batch_size]
                if len(idx) < 2 and step > 0:  # a lone last image would break BatchNorm statistics
                    continue
                xb = norm(augment(x_train[idx], params.augmentation, gen)).contiguous(memory_format=torch.channels_last)
                with _autocast(device):
                    loss = F.cross_entropy(model(xb).float(), y_train[idx], label_smoothing=params.label_smoothing)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                total_loss += loss.detach().double() * len(idx)  # float64, as the Python float sum was
                seen += len(idx)
                progress({"phase": "training", "epoch": epoch, "epochs": params.epochs, "step": step + 1, "steps": steps_per_epoch})
            record = {"epoch": epoch, "train_loss": float(total_loss) / max(seen, 1)}
            if len(x_val):
                logits = torch.from_numpy(predict_logits(model, x_val, norm, device))
                yv = y_val.cpu()
                record["val_loss"] = float(F.cross_entropy(logits, yv))
                record["val_accuracy"] = float((logits.argmax(1) == yv).float().mean())
            history.append(record)
            progress({"phase": "training", "epoch": epoch, "epochs": params.epochs, "loss": record["train_loss"], "val_loss": record.get("val_loss"), "val_accuracy": record.get("val_accuracy")})
            monitored = record.get("val_loss", record["train_loss"])
            if monitored < best_loss:
                best_loss, since_best = monitored, 0
                if params.patience is not None or params.time_budget_s is not None:  # may stop early
                    best = {k: v.detach().clone() for k, v in model.state_dict().items()}
            else:
                since_best += 1
            if params.patience is not None and since_best >= params.patience:
                break
            if params.time_budget_s is not None and time.monotonic() - started > params.time_budget_s:
                break
        if best is not None and len(history) < params.epochs:
            model.load_state_dict(best)
        return model.eval(), history
