"""DoRA: LoRA on the direction of each weight row, with a separately trained magnitude.

Liu et al. 2024, "DoRA: Weight-Decomposed Low-Rank Adaptation", arXiv:2402.09353, Section 4.1,
Eq. 5. A weight splits into a magnitude and a direction, W = m * V / ||V||_c; DoRA trains the
magnitude m directly and the direction through a LoRA update:

    W' = m * (W0 + s B A) / ||W0 + s B A||_c          m: (out,), A: (r, in), B: (out, r)
    h  = W' x + b

||.||_c is the paper's column-wise norm: the paper stores W as (in, out), so its columns are the
rows of our (out, in) weight, one norm per output feature (torch.linalg.norm(W, dim=1), as peft).

Initialisation: A Kaiming-uniform, B = 0 and m = ||W0||_c, so W' = W0 and training starts at the
base model. s is LoRA's alpha / r (or alpha / sqrt(r) with method.rslora).

Section 4.3: the norm is treated as a constant in backpropagation (detached), which saves the
memory of its gradient graph and, the paper reports, changes accuracy by nothing measurable.
The forward pass never builds W' for the input; like peft it reuses the base output W0 x:

    h = W0 x + b + (m/n - 1) * W0 x + (m/n) * s * B A x,      n = ||W0 + s sg(B A)||_c

With dropout active, x in the two adapter terms is dropout(x) (peft's choice, copied so that
the two implementations agree number for number).

QLoRA base ("QDoRA"; peft does the same): over a bitsandbytes 4/8-bit layer, W0 x + b is that
layer's forward, and the row norms need W0 itself, so every forward dequantizes W0 into a
temporary (weight_delta.frozen_weight), takes n from it under no_grad and drops it: no float copy
of the weight is kept, at the cost of one dequantization per layer and forward (the quantized
matmul does one more). The magnitude starts at the norms of the dequantized W0, as in peft.
With dropout, W0 dropout(x) also goes through the quantized layer, so its backward keeps only the
packed weight. Merging needs a dequantized base (quantize.dequantize_model), as for LoRA.

Parameters: r * (in + out) + out per adapted layer. Merging writes W' into the weight; the norm
at merge time is kept so that unmerging gives W0 back. The saved adapter is PEFT's LoRA format
with use_dora=True and one extra key per layer, `<path>.lora_magnitude_vector`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tunesmith.config import MethodConfig
from tunesmith.methods.lora import LoRALinear, describe_lora, load_peft_lora, save_peft_lora
from tunesmith.methods.registry import Method, lora_plus_groups


class DoRALinear(LoRALinear):
    """`h = m * (W0 + s B A) / ||W0 + s B A||_c x + b`; see the module docstring."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0, rslora: bool = False):
        super().__init__(base, r, alpha, dropout, rslora)
        self.lora_magnitude_vector = nn.Parameter(self.weight_norm().detach().clone())  # m: (out,)
        self._merge_norm: torch.Tensor | None = None  # n at merge time, to undo the merge exactly

    def weight_norm(self, w0: torch.Tensor | None = None) -> torch.Tensor:
        """n = ||W0 + s B A||_c, one L2 norm per output row, shape (out,); no gradient flows through it.
        `w0`: W0 as floats if the caller has it (over a quantized base: dequantized, see frozen_weight)."""
        with torch.no_grad():
            w0 = self.frozen_weight() if w0 is None else w0
            lora = self.lora_B.weight @ self.lora_A.weight  # (out, r) @ (r, in)
            return torch.linalg.norm(w0 + self.scaling * lora.to(w0.dtype), dim=1)

    def _base_weight(self) -> torch.Tensor:
        """W0 as floats, also while merged (then W0 = W' * n / m - s B A)."""
        if not self.merged:
            return self.frozen_weight()
        factor = (self.lora_magnitude_vector / self._merge_norm).view(-1, 1)
        return self.weight / factor - super().delta_weight()

    def _base_matmul(self, x: torch.Tensor) -> torch.Tensor:
        """W0 x, without the bias. A quantized base goes through its own layer, whose backward keeps only
        the packed weight; F.linear with a dequantized W0 would keep that float copy alive until backward."""
        if self.quantized_base is None:
            return F.linear(x, self.weight)
        out = self.quantized_base(x)
        return out if self.bias is None else out - self.bias

    def delta_weight(self) -> torch.Tensor:
        """W' - W0, shape (out, in): what merging adds to the weight."""
        with torch.no_grad():
            w0 = self._base_weight()
            direction = w0 + super().delta_weight()  # W0 + s B A
            return (self.lora_magnitude_vector / torch.linalg.norm(direction, dim=1)).view(-1, 1) * direction - w0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.folded is not None:  # folded_for_sampling: W0 + dW = m (W0 + s B A) / n
            return self.folded_kernel(x, self.folded, self.bias)
        if self.merged:
            weight = self._base_weight() if self.disabled else self.weight
            return F.linear(x, weight, self.bias)
        out = self.base_forward(x)  # W0 x + b (dequantized inside for a quantized base)
        if self.disabled:
            return out
        x = x.to(self.lora_A.weight.dtype)
        scale = (self.lora_magnitude_vector / self.weight_norm()).to(out.dtype)  # m / n, (out,)
        if isinstance(self.lora_dropout, nn.Identity) or not self.training:
            base = out if self.bias is None else out - self.bias  # W0 x
        else:
            x = self.lora_dropout(x)
            base = self._base_matmul(x)  # W0 dropout(x)
        lora = self.lora_B(self.lora_A(x)) * self.scaling  # s B A x, (..., out)
        return out + (scale - 1) * base + scale * lora.to(out.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        """W <- m * (W0 + s B A) / n, keeping n for unmerge. Harmless when already merged."""
        self.check_mergeable()
        if not self.merged:
            norm = self.weight_norm()
            factor = (self.lora_magnitude_vector / norm).view(-1, 1)
            self.weight.copy_(factor * (self.weight + super().delta_weight()))
            self._merge_norm = norm
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """W <- W' n / m - s B A, back to W0 (up to rounding). Harmless when not merged."""
        if self.merged:
            self.weight.copy_(self._base_weight())
            self._merge_norm = None
            self.merged = False


def apply_dora(model: nn.Module, cfg: MethodConfig) -> list[str]:
    """Freeze the model and wrap every target in a DoRALinear (A, B and m train)."""
    from tunesmith.methods.inject import apply_lora

    return apply_lora(model, cfg, DoRALinear)


METHOD = Method(
    name="dora",
    apply=apply_dora, save=save_peft_lora, load=load_peft_lora, describe=describe_lora,
    param_groups=lora_plus_groups, peft_type="LORA",
)
