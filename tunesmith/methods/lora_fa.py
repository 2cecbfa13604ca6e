"""LoRA-FA: LoRA with A frozen at its random init; only B trains.

Zhang et al. 2023, "LoRA-FA: Memory-efficient Low-rank Adaptation for Large Language Models
Fine-tuning", arXiv:2308.03303, Section 3. The forward pass is LoRA's,

    h = W0 x + b + s * B A dropout(x)      A: (r, in) frozen Kaiming-uniform,  B: (out, r) trainable, zero init

but with A frozen every step changes the weight by s * dB A: the update stays in the fixed
r-dimensional row space of A, a low-rank projection of full fine-tuning's gradient (the paper's
Section 3.2). Fewer parameters train than in LoRA: out * r per layer instead of r * (in + out).

What it saves is activation memory. B's gradient needs only z = A dropout(x), r numbers per token:

    dL/dB = s * sum_tokens  dL/dh  z^T          (out, r)
    dL/dx = s * A^T (B^T dL/dh)                 (in,): needs A and B, both already in memory

so the adapter path keeps z for the backward pass, never x. Plain LoRA must keep dropout(x)
(`in` floats per token, per adapted layer) for A's gradient. `_FrozenAUpdate` below states this
explicitly rather than relying on autograd's bookkeeping, and does the adapter's dropout itself:
  - with dropout (method.dropout > 0, training) it keeps the drop mask as bool, one byte per
    input element; nn.Dropout on CPU would keep a float mask (four bytes) for the input gradient;
  - the base matmul W0 x with a frozen W0 saves nothing new: its input gradient needs W0 only;
  - everything outside the adapted linear layers (attention, norms, activations) is unchanged.
bench/lora_fa_memory.py measures it on the default model (docs/methods/lora_fa.md has the numbers).

The trained adapter is an ordinary LoRA adapter (A is just not trained), saved in PEFT's LoRA
format: `peft.PeftModel.from_pretrained` loads it, and so does tunesmith's LoRA loader.
"""

from __future__ import annotations

import torch
from torch import nn

from tunesmith.config import MethodConfig
from tunesmith.methods.dropout import drop_mask
from tunesmith.methods.lora import LoRALinear, describe_lora, load_peft_lora, save_peft_lora
from tunesmith.methods.registry import Method, lora_plus_groups


class _FrozenAUpdate(torch.autograd.Function):
    """y = s * (dropout_p(x) A^T) B^T, saving only z = dropout_p(x) A^T, references to A and B, and
    (when p > 0) the bool keep-mask for backward. dropout_p(x) = x * keep / (1 - p), keep ~ Bernoulli(1 - p)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float, p: float) -> torch.Tensor:
        dropped = None
        if p > 0:
            dropped = drop_mask(x.shape, p, x.device)  # bool, (..., in); fast on the CPU: methods/dropout.py
            x = x.masked_fill(dropped, 0.0).mul_(1 / (1 - p))  # a temporary: not kept for backward
        z = x @ a.t()  # (..., r)
        ctx.save_for_backward(z, a, b, dropped)
        ctx.scaling, ctx.p = scaling, p
        return (z @ b.t()) * scaling  # (..., out)

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        z, a, b, dropped = ctx.saved_tensors
        grad_y = grad_y * ctx.scaling
        grad_x = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = (grad_y @ b) @ a  # (..., out) -> (..., r) -> (..., in)
            if dropped is not None:
                grad_x = grad_x.masked_fill_(dropped, 0.0).mul_(1 / (1 - ctx.p))
        if ctx.needs_input_grad[2]:
            # (out, N) @ (N, r) -> (out, r), N = all tokens
            grad_b = grad_y.reshape(-1, grad_y.shape[-1]).t() @ z.reshape(-1, z.shape[-1])
        return grad_x, None, grad_b, None, None


class LoRAFALinear(LoRALinear):
    """LoRALinear with lora_A frozen and the memory-lean update path; see the module docstring."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0, rslora: bool = False):
        super().__init__(base, r, alpha, dropout, rslora)
        self.lora_A.weight.requires_grad_(False)

    def _update(self, x: torch.Tensor, dropout: bool = True) -> torch.Tensor:
        """s * B A dropout(x), with the dropout done inside _FrozenAUpdate (a bool mask for backward)."""
        x = x.to(self.lora_A.weight.dtype)
        drop = self.lora_dropout
        p = drop.p if dropout and isinstance(drop, nn.Dropout) and drop.training else 0.0
        return _FrozenAUpdate.apply(x, self.lora_A.weight, self.lora_B.weight, self.scaling, p)


def apply_lora_fa(model: nn.Module, cfg: MethodConfig) -> list[str]:
    """Freeze the model and wrap every target in a LoRAFALinear (only B trains)."""
    from tunesmith.methods.inject import apply_lora

    return apply_lora(model, cfg, LoRAFALinear)


METHOD = Method(
    name="lora_fa",
    apply=apply_lora_fa, save=save_peft_lora, load=load_peft_lora, describe=describe_lora,
    param_groups=lora_plus_groups, peft_type="LORA",
)
