"""Adapter dropout with cheap random masks on the CPU.

Dropout on an adapter's input, `dropout_p(x) = x * keep / (1 - p)` with keep ~ Bernoulli(1 - p),
needs one random number per input element, per adapted layer, per step: for SmolLM2-135M with
every linear layer adapted that is about 5,000 numbers per token per layer. torch's CPU sampler
(`bernoulli_`, `rand`) draws them from a Mersenne twister at ~3-5 ns each, which made mask
generation about a fifth of a LoRA training step here (profiled with torch.profiler; see
docs/speed.md). numpy's PCG64 fills 16-bit integers several times faster, so on the CPU:

    seed  = one draw from torch's generator         (so torch.manual_seed and the RNG state saved
                                                     in checkpoints still decide every mask)
    bits  = PCG64(seed) -> n int16 values, uniform on [-32768, 32767]
    drop  = bits < round(p * 65536) - 32768         (P(drop) = round(p * 65536) / 65536)

so p is used rounded to a multiple of 1/65536 (|error| <= 7.7e-6). On CUDA, torch's own sampler is
fast and is used as is. The backward pass keeps the bool mask (one byte per element), not a float
mask, and recomputes nothing.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

LEVELS = 65536  # int16 values: p is applied in steps of 1/65536


def new_seed() -> int:
    """A mask seed drawn from torch's generator, so torch.manual_seed and checkpointed RNG states decide it."""
    return int(torch.randint(0, 2**62, (1,)))


# Left out of torch.compile (train.compile): numpy cannot be traced, and the seed, a Python int, would
# make dynamo recompile on every call. Masks are made eagerly between the compiled pieces instead.
@torch.compiler.disable
def drop_mask(shape: torch.Size, p: float, device: torch.device, seed: int | None = None) -> torch.Tensor:
    """Bool tensor of `shape`, each element True (dropped) with probability p (see the module docstring).
    The same seed gives the same mask, so a backward pass can regenerate it instead of keeping it."""
    seed = new_seed() if seed is None else seed
    if device.type != "cpu":
        return torch.rand(shape, device=device, generator=torch.Generator(device).manual_seed(seed)) < p
    bits = np.random.Generator(np.random.PCG64(seed)).integers(
        -32768, 32767, size=int(np.prod(shape)), dtype=np.int16, endpoint=True)
    return torch.from_numpy(bits).view(shape) < round(p * LEVELS) - 32768


class _MaskedScale(torch.autograd.Function):
    """y = x * (not dropped) * scale; the backward pass applies the same bool mask and scale to the gradient."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, dropped: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.save_for_backward(dropped)
        ctx.scale = scale
        # masked_fill + mul: a bool * float product takes a slow type-promotion path on the CPU
        return x.masked_fill(dropped, 0.0).mul_(scale)

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        (dropped,) = ctx.saved_tensors
        return grad_y.masked_fill(dropped, 0.0).mul_(ctx.scale), None, None


@torch.compiler.disable  # see drop_mask
def dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """`dropout_p(x)` with the fast mask; identity when not training or p == 0."""
    if not training or p == 0.0:
        return x
    return _MaskedScale.apply(x, drop_mask(x.shape, p, x.device), 1.0 / (1.0 - p))


class Dropout(nn.Dropout):
    """nn.Dropout with the fast mask (a subclass, so code that asks `isinstance(m, nn.Dropout)` and reads
    `m.p` keeps working, and state dicts are unchanged: dropout has no state)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(x, self.p, self.training)
