"""LoRA: a frozen linear layer plus a trainable low-rank update.

Low-Rank Adaptation (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models",
arXiv:2106.09685, Section 4.1, Eq. 3). A pretrained weight W0 (out x in) stays frozen; the
update is factored as B A with A (r x in), B (out x r) and r << min(in, out):

    h = W0 x + b + s * B A dropout(x)

    s = alpha / r             (the paper)
    s = alpha / sqrt(r)       (rank-stabilised LoRA, Kalajdzievski 2023, arXiv:2312.03732,
                               which keeps the update's scale stable as r grows)

Initialisation: A is Kaiming-uniform with a=sqrt(5) (nn.Linear's default, as in PEFT), B is
zero, so B A = 0 and the adapted model starts exactly equal to the base model.

Parameters: r * (in + out) per adapted layer instead of in * out.

Merging folds the update into the weight, W = W0 + s B A, so inference costs nothing extra;
unmerging subtracts it again. A `merged` flag makes both idempotent.

The module owns the base layer's `weight` and `bias` (the same Parameter objects), so the base
checkpoint's keys (`...q_proj.weight`) are unchanged and only `lora_A.weight`/`lora_B.weight`
are added, like torchtune's LoRALinear.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class LoRALinear(nn.Module):
    """`h = W0 x + b + s * B A dropout(x)` around a frozen nn.Linear; see the module docstring."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0, rslora: bool = False):
        super().__init__()
        if r < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {r}")
        self.in_features, self.out_features = base.in_features, base.out_features
        self.r, self.alpha, self.rslora = r, alpha, rslora
        self.scaling = alpha / math.sqrt(r) if rslora else alpha / r
        # the base layer's own parameters, frozen: state-dict keys stay `<path>.weight`, `<path>.bias`
        self.weight = base.weight
        self.bias = base.bias
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        kw = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_A = nn.Linear(self.in_features, r, bias=False, **kw)  # A: (r, in)
        self.lora_B = nn.Linear(r, self.out_features, bias=False, **kw)  # B: (out, r)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False
        self.disabled = False
        self.reset_lora_parameters()

    def reset_lora_parameters(self) -> None:
        """A ~ Kaiming-uniform(a=sqrt(5)), B = 0: the update B A starts at exactly zero."""
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def delta_weight(self) -> torch.Tensor:
        """s * B @ A, shape (out, in), in the base weight's dtype."""
        # (out, r) @ (r, in) -> (out, in); multiply in fp32 so bf16 merges lose less
        delta = self.lora_B.weight.float() @ self.lora_A.weight.float()
        return (delta * self.scaling).to(self.weight.dtype)

    def _update(self, x: torch.Tensor, dropout: bool = True) -> torch.Tensor:
        """s * B A x for x of shape (..., in) -> (..., out)."""
        x = x.to(self.lora_A.weight.dtype)
        if dropout:
            x = self.lora_dropout(x)
        return self.lora_B(self.lora_A(x)) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight, self.bias)  # W0 x + b, or (W0 + s B A) x + b when merged
        if self.merged:
            # the update already lives in the weight; take it back out only if adapters are off
            return out - self._update(x, dropout=False).to(out.dtype) if self.disabled else out
        if self.disabled:
            return out
        return out + self._update(x).to(out.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        """W <- W0 + s B A. Harmless when already merged."""
        if not self.merged:
            self.weight.add_(self.delta_weight())
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """W <- W - s B A, back to W0 (up to rounding). Harmless when not merged."""
        if self.merged:
            self.weight.sub_(self.delta_weight())
            self.merged = False

    def to_linear(self) -> nn.Linear:
        """A plain nn.Linear holding W0 + s B A (merges this module in place; no weight copy)."""
        self.merge()
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        linear.weight = self.weight
        linear.bias = self.bias
        return linear

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
                f"alpha={self.alpha}, rslora={self.rslora}, merged={self.merged}, disabled={self.disabled}")
