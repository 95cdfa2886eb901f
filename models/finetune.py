"""End-to-end training of a whole network: simple_cnn from scratch, or fine-tuning a pretrained one.

airbench-style: every image is decoded and resized once into a uint8 tensor that stays resident
on the device; augmentation (random crop with reflection padding, horizontal flip) is a plain
batch function on that tensor. AdamW with a OneCycle schedule, bf16 autocast where the hardware
has it, channels_last, cudnn.benchmark on CUDA. A completed schedule returns the last epoch (the
learning rate has annealed; picking the "best" epoch on ~30 validation images cost 20 points of
test accuracy on catvnoncat); a run stopped early (patience, time budget) returns the epoch
with the lowest validation loss.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

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


def normalizer(prep: Preprocessing, device: torch.device) -> Callable[[torch.Tensor], torch.Tensor]:
    """uint8 NCHW -> float32 normalised exactly as preprocess.to_array does."""
    mean = torch.tensor(np.broadcast_to(np.asarray(prep.mean, np.float32), 3).copy(), device=device).view(1, 3, 1, 1)
    std = torch.tensor(np.broadcast_to(np.asarray(prep.std, np.float32), 3).copy(), device=device).view(1, 3, 1, 1)
    return lambda x: (x.float() - mean) / std


def augment(x: torch.Tensor, mode: str, gen: torch.Generator) -> torch.Tensor:
    """Random translation (reflect-pad by S/16, crop back to S) and/or horizontal flip, per image."""
    n, _, s, _ = x.shape
    if "crop" in mode:
        pad = max(1, s // 16)
        padded = F.pad(x.float(), (pad, pad, pad, pad), mode="reflect").to(x.dtype)
        dx = torch.randint(0, 2 * pad + 1, (n,), generator=gen).tolist()
        dy = torch.randint(0, 2 * pad + 1, (n,), generator=gen).tolist()
        x = torch.stack([padded[i, :, dy[i] : dy[i] + s, dx[i] : dx[i] + s] for i in range(n)])
    if "flip" in mode:
        flip = (torch.rand(n, generator=gen) < 0.5).to(x.device)
        x = torch.where(flip.view(n, 1, 1, 1), x.flip(3), x)
    return x


def _autocast(device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16(device))


@torch.no_grad()
def predict_logits(model: nn.Module, x_u8: torch.Tensor, norm, device: torch.device, batch_size: int = 64) -> np.ndarray:
    """Logits (before temperature) for resident uint8 images, float32 numpy."""
    model.eval()
    out = []
    for i in range(0, len(x_u8), batch_size):
        with _autocast(device):
            out.append(model(norm(x_u8[i : i + batch_size]).contiguous(memory_format=torch.channels_last)).float())
    return torch.cat(out).cpu().numpy() if out else np.zeros((0, model.head.out_features), np.float32)


def train_network(model: nn.Module, x_train: torch.Tensor, y_train: torch.Tensor, x_val: torch.Tensor, y_val: torch.Tensor, prep: Preprocessing, params: FinetuneParams, device: torch.device, seed: int, progress: Callable[[dict], None], should_stop: Callable[[], None]) -> tuple[nn.Module, list[dict]]:
    """Train in place; returns (the model, per-epoch history)."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    model.to(device=device, memory_format=torch.channels_last)
    x_train, y_train, x_val, y_val = (t.to(device) for t in (x_train, y_train, x_val, y_val))
    norm = normalizer(prep, device)
    gen = torch.Generator().manual_seed(seed)  # CPU generator: same shuffles on every device
    head_params = list(model.head.parameters())
    body_params = [p for n, p in model.named_parameters() if not n.startswith("head.")]
    groups = [{"params": body_params, "lr": params.learning_rate * params.backbone_lr_scale}, {"params": head_params, "lr": params.learning_rate}]
    opt = torch.optim.AdamW(groups, weight_decay=params.weight_decay)
    steps_per_epoch = max(1, -(-len(x_train) // params.batch_size))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[g["lr"] for g in groups], total_steps=params.epochs * steps_per_epoch, pct_start=0.25)
    best, best_loss, since_best, history = None, float("inf"), 0, []
    started = time.monotonic()
    for epoch in range(1, params.epochs + 1):
        model.train()
        order = torch.randperm(len(x_train), generator=gen).to(device)
        total_loss, seen = 0.0, 0
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
            total_loss, seen = total_loss + float(loss.detach()) * len(idx), seen + len(idx)
            progress({"phase": "training", "epoch": epoch, "epochs": params.epochs, "step": step + 1, "steps": steps_per_epoch, "loss": float(loss.detach())})
        record = {"epoch": epoch, "train_loss": total_loss / max(seen, 1)}
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
