"""The LoRA update as one autograd function: fewer passes over memory, less kept for backward.

In training, a LoRA layer adds to the frozen layer's output (N tokens, `out` features)

    y = out + s * B A dropout_p(x),     dropout_p(x) = x * m / (1 - p),  m ~ Bernoulli(1 - p)

Left to autograd, this keeps the dropped-out copy of x (N x in floats) in every adapted layer,
although q, k and v (and gate and up) read the same x, and it makes separate passes for the
product, the scaling and the sum. Written by hand:

    forward    m = mask(seed); u = dropout_p(x) A^T                    (N, r)
               y = addmm(out, u, B^T, alpha=s)                          one BLAS call: product, scale, sum
    keeps      x (the very tensor q, k and v share, so once for all three), u, the seed; A and B are
               parameters; the mask is regenerated from the seed (drop_mask is seeded)
    backward   g = dL/dy;  dL/dout = g
               dL/dB = s g^T u                                          (out, r)
               gu    = s g B                                            (N, r)
               dL/dA = gu^T dropout_p(x)                                (r, in), dropout_p(x) recomputed
               dL/dx = dropout_p(gu A)                                  the same mask and scale

For SmolLM2-135M with every linear layer adapted this keeps 13 KB per token and layer for the
adapter inputs instead of 20 KB (docs/speed.md). The price is regenerating each mask once in the
backward pass. Without dropout (p = 0, or eval) nothing is regenerated.
"""

from __future__ import annotations

import torch

from tunesmith.methods.dropout import drop_mask, new_seed


def _dropped(x: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    if p == 0.0:
        return x
    return x.masked_fill(drop_mask(x.shape, p, x.device, seed), 0.0).mul_(1.0 / (1.0 - p))


@torch.compiler.disable  # masks come from numpy (methods/dropout.py): run eagerly under train.compile
def lora_update(out, x, a, b, scaling: float, p: float) -> torch.Tensor:
    return LoRAUpdate.apply(out, x, a, b, scaling, p)


class LoRAUpdate(torch.autograd.Function):
    """out + s * B A dropout_p(x) for 2-D out (N, out) and x (N, in); see the module docstring."""

    @staticmethod
    def forward(ctx, out, x, a, b, scaling: float, p: float):
        seed = new_seed() if p > 0 else 0
        u = _dropped(x, p, seed) @ a.t()  # (N, r)
        ctx.save_for_backward(x, a, b, u)
        ctx.scaling, ctx.p, ctx.seed = scaling, p, seed
        return torch.addmm(out, u, b.t(), alpha=scaling)

    @staticmethod
    def backward(ctx, grad_y):
        x, a, b, u = ctx.saved_tensors
        s = ctx.scaling
        grad_out = grad_y if ctx.needs_input_grad[0] else None
        grad_b = (grad_y.t() @ u).mul_(s) if ctx.needs_input_grad[3] else None
        grad_u = (grad_y @ b).mul_(s)  # (N, r)
        grad_a = grad_u.t() @ _dropped(x, ctx.p, ctx.seed) if ctx.needs_input_grad[2] else None
        grad_x = _dropped(grad_u @ a, ctx.p, ctx.seed) if ctx.needs_input_grad[1] else None
        return grad_out, grad_x, grad_a, grad_b, None, None
