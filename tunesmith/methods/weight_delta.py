"""The frame every weight-update adapter shares: a frozen linear layer plus an update that folds into W.

LoRA (and LoRA-FA, DoRA, Delta-LoRA) and VeRA all compute

    h = W0 x + b + dW x          dW (out, in): s B A for LoRA, diag(b) B diag(d) A for VeRA

so one class holds what they have in common, and a method's file says only what dW is:

    delta_weight()    dW as a matrix (out, in), in the weight's dtype: what merging adds to W
    _update(x)        dW x for x (..., in), computed without building dW (LoRA: s B (A x))

The frame owns the base layer's `weight` and `bias` (the same Parameter objects, frozen), so the
base checkpoint's keys (`...q_proj.weight`) are unchanged and only the adapter's tensors are added.
Merging folds the update in, W = W0 + dW, so inference costs nothing extra; unmerging subtracts it
again; a `merged` flag makes both idempotent. `disabled` switches the update off, also when
merged (the forward then takes dW x back out of the output).

QLoRA (Dettmers et al. 2023, arXiv:2305.14314): the base may be a bitsandbytes Linear4bit or
Linear8bitLt (tunesmith/models/quantize.py), whose weight holds packed integers. The frame then
keeps a reference to that base layer (`quantized_base`, not a submodule: its weight and bias are
the ones registered here) and calls it for W0 x + b, which dequantizes inside; the adapter's
tensors take the layer's compute dtype (`adapter_dtype`). A quantized weight cannot take W0 + dW
in place (it is not representable in 4 or 8 bits): merging refuses, and quantize.dequantize_model
gives the adapters float weights to merge into instead. A method whose update needs W0 itself
(DoRA's row norms) reads it through `frozen_weight()`, which dequantizes into a temporary: no float
copy of a quantized weight is kept.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from tunesmith.errors import UserError


def adapter_dtype(base: nn.Linear) -> torch.dtype:
    """The dtype an adapter on `base` trains and computes in: the weight's, or a quantized layer's compute dtype."""
    if base.weight.is_floating_point():
        return base.weight.dtype
    return getattr(base, "compute_dtype", None) or torch.float32  # transformers' Linear4bit may leave it None


class WeightDeltaLinear(nn.Module):
    """`h = W0 x + b + dW x` around a frozen linear layer; subclasses define dW. See the module docstring."""

    def __init__(self, base: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias  # the base layer's own: keys stay `<path>.weight`
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        # a quantized base computes W0 x + b itself; a plain attribute, so state-dict keys and repr do not change
        self.__dict__["quantized_base"] = None if base.weight.is_floating_point() else base
        self.adapter_dtype = adapter_dtype(base)
        self.merged = False
        self.disabled = False
        self.folded: torch.Tensor | None = None  # W0 + dW while sampling inside training (folded_for_sampling)
        self.folded_kernel = F.linear  # and the kernel that multiplies by it (models/cpu_linear.py)

    def delta_weight(self) -> torch.Tensor:
        """dW, shape (out, in), in the dtype of the weight it merges into."""
        raise NotImplementedError

    def _update(self, x: torch.Tensor, dropout: bool = True) -> torch.Tensor:
        """dW x for x of shape (..., in) -> (..., out); `dropout` applies the adapter's input dropout."""
        raise NotImplementedError

    def _delta_dtype(self) -> torch.dtype:
        """What delta_weight returns: the float weight's dtype, else (packed integers) the compute dtype."""
        return self.weight.dtype if self.quantized_base is None else self.adapter_dtype

    def frozen_weight(self) -> torch.Tensor:
        """The stored weight as floats (out, in): itself, or a quantized base dequantized into a temporary."""
        if self.quantized_base is None:
            return self.weight
        from tunesmith.models.quantize import dequantize_weight

        with torch.no_grad():
            return dequantize_weight(self.quantized_base, self.adapter_dtype)

    def base_forward(self, x: torch.Tensor) -> torch.Tensor:
        """W x + b: dequant(W0) x + b for a quantized base; W holds W0 + dW while merged."""
        if self.quantized_base is not None:
            return self.quantized_base(x)
        return F.linear(x, self.weight, self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.folded is not None:
            return self.folded_kernel(x, self.folded, self.bias)
        out = self.base_forward(x)
        if self.merged:
            # the update already lives in the weight; take it back out only if adapters are off
            return out - self._update(x, dropout=False).to(out.dtype) if self.disabled else out
        if self.disabled:
            return out
        return self._add_update(out, x)

    def _add_update(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """out + dW x (with dropout in training); a subclass may fuse the two."""
        return out + self._update(x).to(out.dtype)

    def train(self, mode: bool = True) -> "WeightDeltaLinear":
        super().train(mode)
        if self.quantized_base is not None:  # not a submodule, so not reached by super().train
            self.quantized_base.train(mode)
        return self

    def check_mergeable(self) -> None:
        if self.quantized_base is not None:
            raise UserError("Cannot merge an adapter update into a 4/8-bit quantized weight in place: W0 + dW is not "
                            "representable in the quantized format. Dequantize the base first "
                            "(tunesmith.models.quantize.dequantize_model; `tunesmith merge` does this).")

    def can_fold(self) -> bool:
        """A float weight of its own (not packed 4/8-bit, not a shard of FSDP2's DTensor), the update on and apart."""
        return (self.quantized_base is None and not self.merged and not self.disabled
                and type(self.weight.data) is torch.Tensor)

    @torch.no_grad()
    def merge(self) -> None:
        """W <- W0 + dW. Harmless when already merged."""
        self.check_mergeable()
        if not self.merged:
            self.weight.add_(self.delta_weight())
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """W <- W - dW, back to W0 (up to rounding). Harmless when not merged."""
        if self.merged:
            self.weight.sub_(self.delta_weight())
            self.merged = False

    def to_linear(self) -> nn.Linear:
        """A plain nn.Linear holding W0 + dW (merges this module in place; no weight copy)."""
        self.merge()
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        linear.weight, linear.bias = self.weight, self.bias
        return linear

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, merged={self.merged}, "
                f"disabled={self.disabled}")


@contextmanager
def folded_for_sampling(model: nn.Module, enabled: bool = True):
    """While the block runs, every adapter layer that can_fold computes W' x + b with W' = W0 + dW held in a
    temporary copy: one matmul where the unfolded forward takes three (W0 x, A x, B (A x)) and an add. For
    generation inside training (GRPO, PPO): sampling is decode steps of a few rows each, where the adapter's
    small matmuls cost nearly as much as the base's (the default model, LoRA r 16 on every linear layer, 4
    prompts x 8 samples on the 2-core CPU: 166-190 -> 204-216 tokens/s). W0 is not touched (merge() and
    unmerge() would round it); the copies cost one adapted weight each until the block ends.

    The folded layers, and the model's plain nn.Linear layers (the head), multiply with the kernel
    models/cpu_linear.py picks for their weights: oneDNN on an AMD CPU, where MKL's fp32 sgemm is 1.6-2.7x
    slower (204-216 -> 348-362 tokens/s), else F.linear. Sampled tokens may differ from the unfolded forward's
    at rounding level; the log-probabilities the loss uses come from the unfolded forward. Yields the number of
    adapter layers folded."""
    from tunesmith.models.cpu_linear import linear_kernel

    layers = [m for m in model.modules() if isinstance(m, WeightDeltaLinear) and m.can_fold()] if enabled else []
    plain = [m for m in model.modules() if type(m) is nn.Linear and "forward" not in m.__dict__] if layers else []
    routed = [(m, kernel) for m in plain if (kernel := linear_kernel(m.weight)) is not F.linear]
    try:
        with torch.no_grad():
            for layer in layers:
                layer.folded = layer.weight + layer.delta_weight()
                layer.folded_kernel = linear_kernel(layer.folded)
        for linear, kernel in routed:  # an instance attribute, so the class's forward is back when it is deleted
            linear.forward = lambda x, linear=linear, kernel=kernel: kernel(x, linear.weight, linear.bias)
        yield len(layers)
    finally:
        for layer in layers:
            layer.folded, layer.folded_kernel = None, F.linear
        for linear, _ in routed:
            linear.__dict__.pop("forward", None)
