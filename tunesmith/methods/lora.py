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

QLoRA (Dettmers et al. 2023, arXiv:2305.14314): the base may be a bitsandbytes Linear4bit or
Linear8bitLt (tunesmith/models/quantize.py), whose weight holds packed integers. The module then
keeps a reference to that base layer (`quantized_base`, not a submodule: its weight and bias are
the ones registered here) and calls it for W0 x + b, which dequantizes inside; A and B take the
layer's compute dtype. A quantized weight cannot take W0 + s B A in place: merging refuses, and
quantize.dequantize_model gives the adapters float weights to merge into instead.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from tunesmith.errors import UserError


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
        # a quantized base computes W0 x + b itself (see the module docstring)
        self.__dict__["quantized_base"] = None if base.weight.is_floating_point() else base
        dtype = base.weight.dtype if self.quantized_base is None else getattr(base, "compute_dtype", torch.float32)
        kw = {"device": base.weight.device, "dtype": dtype}
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
        dtype = self.weight.dtype if self.quantized_base is None else self.lora_A.weight.dtype  # not uint8/int8
        return (delta * self.scaling).to(dtype)

    def _update(self, x: torch.Tensor, dropout: bool = True) -> torch.Tensor:
        """s * B A x for x of shape (..., in) -> (..., out)."""
        x = x.to(self.lora_A.weight.dtype)
        if dropout:
            x = self.lora_dropout(x)
        return self.lora_B(self.lora_A(x)) * self.scaling

    def train(self, mode: bool = True) -> "LoRALinear":
        super().train(mode)
        if self.quantized_base is not None:  # not a submodule, so not reached by super().train
            self.quantized_base.train(mode)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.quantized_base is not None:
            out = self.quantized_base(x)  # dequant(W0) x + b
        else:
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
        if self.quantized_base is not None:
            raise UserError("Cannot merge a LoRA update into a 4/8-bit quantized weight in place: W0 + s B A is not "
                            "representable in the quantized format. Dequantize the base first "
                            "(tunesmith.models.quantize.dequantize_model; `tunesmith merge` does this).")
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
