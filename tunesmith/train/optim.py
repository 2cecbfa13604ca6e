"""Optimizer and learning-rate schedule.

The schedule is a pure function of the step, so resuming needs no scheduler object: the
step number in the checkpoint is the whole state.

    warmup (s < W):   lr(s) = peak * (s + 1) / W
    cosine:           lr(s) = peak * 0.5 * (1 + cos(pi * p)),   p = (s - W) / max(1, T - W)
    linear:           lr(s) = peak * (1 - p)
    constant:         lr(s) = peak
"""

from __future__ import annotations

import math

import torch

from tunesmith.config import TrainConfig


def lr_at(step: int, cfg: TrainConfig, total_steps: int) -> float:
    """Learning rate for optimizer step `step` (0-based) of `total_steps`."""
    warmup = cfg.warmup_steps
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    if cfg.schedule == "cosine":
        return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * progress))
    if cfg.schedule == "linear":
        return cfg.lr * (1.0 - progress)
    return cfg.lr


def build_optimizer(params_or_groups: list, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW over a list of parameters, or over groups that may carry an `lr_scale` (LoRA+)."""
    groups = params_or_groups
    if groups and not isinstance(groups[0], dict):
        groups = [{"params": list(groups)}]
    groups = [dict(g, lr_scale=g.get("lr_scale", 1.0)) for g in groups if g["params"]]
    if not groups:
        raise ValueError("no trainable parameters: the method froze everything")
    return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.999), eps=1e-8)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """The schedule's rate, times each group's own scale."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
