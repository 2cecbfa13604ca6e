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

What every weight-update adapter shares (owning the base layer's `weight` and `bias`, so the base
checkpoint's keys are unchanged and only `lora_A.weight`/`lora_B.weight` are added, like
torchtune's LoRALinear; merging W = W0 + s B A and unmerging; the `disabled` switch; a QLoRA base)
lives in weight_delta.py; this file says what the update is.

QLoRA (Dettmers et al. 2023, arXiv:2305.14314): over a bitsandbytes Linear4bit or Linear8bitLt
base the forward is dequant(W0) x + b + s B A x; A and B take the layer's compute dtype, and the
update merges only into a dequantized weight (weight_delta.py).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from tunesmith.methods.dropout import Dropout
from tunesmith.methods.lora_kernel import lora_update
from tunesmith.methods.registry import Method, lora_plus_groups
from tunesmith.methods.weight_delta import WeightDeltaLinear


class LoRALinear(WeightDeltaLinear):
    """`h = W0 x + b + s * B A dropout(x)` around a frozen nn.Linear; see the module docstring."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0, rslora: bool = False):
        if r < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {r}")
        super().__init__(base)
        self.r, self.alpha, self.rslora = r, alpha, rslora
        self.scaling = alpha / math.sqrt(r) if rslora else alpha / r
        kw = {"device": base.weight.device, "dtype": self.adapter_dtype}
        self.lora_A = nn.Linear(self.in_features, r, bias=False, **kw)  # A: (r, in)
        self.lora_B = nn.Linear(r, self.out_features, bias=False, **kw)  # B: (out, r)
        self.lora_dropout = Dropout(dropout) if dropout > 0 else nn.Identity()  # fast CPU masks: methods/dropout.py
        self.reset_lora_parameters()

    def reset_lora_parameters(self) -> None:
        """A ~ Kaiming-uniform(a=sqrt(5)), B = 0: the update B A starts at exactly zero."""
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def delta_weight(self) -> torch.Tensor:
        """s * B @ A, shape (out, in), in the base weight's dtype (the compute dtype over a quantized base)."""
        # (out, r) @ (r, in) -> (out, in); multiply in fp32 so bf16 merges lose less
        delta = self.lora_B.weight.float() @ self.lora_A.weight.float()
        return (delta * self.scaling).to(self._delta_dtype())

    def _update(self, x: torch.Tensor, dropout: bool = True) -> torch.Tensor:
        """s * B A x for x of shape (..., in) -> (..., out)."""
        x = x.to(self.lora_A.weight.dtype)
        if dropout:
            x = self.lora_dropout(x)
        return self.lora_B(self.lora_A(x)) * self.scaling

    def _add_update(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """out + s * B A dropout(x) as one autograd function (methods/lora_kernel.py): the product, scaling
        and sum in one BLAS call, and the adapter input kept once however many layers read it."""
        if type(self)._update is not LoRALinear._update or out.dtype != x.dtype or x.dtype != self.lora_A.weight.dtype:
            return super()._add_update(out, x)  # a subclass changed the update (LoRA-FA), or mixed dtypes
        p = self.lora_dropout.p if self.training and isinstance(self.lora_dropout, nn.Dropout) else 0.0
        flat = lora_update(out.reshape(-1, out.shape[-1]), x.reshape(-1, x.shape[-1]), self.lora_A.weight,
                           self.lora_B.weight, self.scaling, p)
        return flat.view(out.shape)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, r={self.r}, alpha={self.alpha}, rslora={self.rslora}"


def describe_lora(cfg) -> str:
    """The settings of a LoRA-family run, for reports."""
    text = f"r={cfg.r} alpha={cfg.alpha}{' rslora' if cfg.rslora else ''} targets={cfg.target_modules}"
    return text + (f" lora_plus_ratio={cfg.lora_plus_ratio}" if cfg.lora_plus_ratio else "")


# inject.py and io.py build on LoRALinear, so this file reaches them at call time.
def apply_lora(model: nn.Module, cfg) -> list[str]:
    from tunesmith.methods.inject import apply_lora as inject_lora

    return inject_lora(model, cfg)


def save_peft_lora(model: nn.Module, out_dir, cfg, base_model_name_or_path: str) -> None:
    """The PEFT LoRA format (adapter_config.json + adapter_model.safetensors), for every LoRA-family layer."""
    from tunesmith.methods.io import save_adapter

    save_adapter(model, out_dir, cfg, base_model_name_or_path)


def load_peft_lora(model: nn.Module, adapter_dir):
    from tunesmith.methods.io import load_adapter

    return load_adapter(model, adapter_dir)


METHOD = Method(
    name="lora",
    apply=apply_lora, save=save_peft_lora, load=load_peft_lora, describe=describe_lora,
    param_groups=lora_plus_groups, peft_type="LORA",
)
