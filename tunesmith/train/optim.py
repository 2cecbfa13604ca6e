"""Optimizer and learning-rate schedule.

The schedule is a pure function of the step, so resuming needs no scheduler object: the
step number in the checkpoint is the whole state.

    warmup (s < W):   lr(s) = peak * (s + 1) / W
    cosine:           lr(s) = peak * 0.5 * (1 + cos(pi * p)),   p = (s - W) / max(1, T - W)
    linear:           lr(s) = peak * (1 - p)
    constant:         lr(s) = peak

The optimizer is torch's AdamW, or bitsandbytes' 8-bit AdamW (train.optimizer=adamw_8bit;
Dettmers et al. 2021, "8-bit Optimizers via Block-wise Quantization", arXiv:2110.02861): both
moments stored in 8 bits, block-wise dynamic quantization with one fp32 absmax per 256 values, so
the state is ~2 bytes per trained parameter instead of 8. Tensors under 4096 values keep 32-bit
state (bitsandbytes' min_8bit_size). paged_adamw_8bit puts that state in CUDA unified memory,
which the driver pages out to CPU memory under pressure (QLoRA, Section 3). Where bitsandbytes is
missing or cannot step on the parameters' device, torch AdamW runs instead and the log says so.
"""

from __future__ import annotations

import logging
import math

import torch

from tunesmith.config import TrainConfig

log = logging.getLogger(__name__)
BNB_OPTIMIZERS = {"adamw_8bit": "AdamW8bit", "paged_adamw_8bit": "PagedAdamW8bit"}  # train.optimizer -> class


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
    kw = {"lr": cfg.lr, "weight_decay": cfg.weight_decay, "betas": (0.9, 0.999), "eps": 1e-8}
    optimizer_class = torch.optim.AdamW
    if cfg.optimizer in BNB_OPTIMIZERS:
        optimizer_class = bnb_optimizer_class(cfg.optimizer, groups[0]["params"][0].device, kw) or torch.optim.AdamW
    return optimizer_class(groups, **kw)


def bnb_optimizer_class(name: str, device: torch.device, kw: dict) -> type | None:
    """bitsandbytes' class for `name` if one step of it runs on `device`, else None (after logging why)."""
    try:
        import bitsandbytes as bnb

        optimizer_class = getattr(bnb.optim, BNB_OPTIMIZERS[name])
        # a throwaway step on a tensor large enough for 8-bit state: does this device have the kernels?
        probe = torch.nn.Parameter(torch.zeros(4096, device=device))
        probe.grad = torch.ones_like(probe)
        optimizer_class([probe], **kw).step()
        if name.startswith("paged_") and device.type != "cuda":
            log.info("train.optimizer=%s: paging needs CUDA unified memory; on %s bitsandbytes runs it unpaged "
                     "(as adamw_8bit)", name, device)
        return optimizer_class
    except Exception as e:  # ImportError, or no kernel for the device (NotImplementedError, RuntimeError, ...)
        log.warning("train.optimizer=%s: bitsandbytes cannot run it on %s (%s: %s); using torch AdamW instead",
                    name, device, type(e).__name__, str(e).splitlines()[0][:200] if str(e) else "")
        return None


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """The schedule's rate, times each group's own scale."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
