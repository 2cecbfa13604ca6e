"""Delta-LoRA: LoRA that also moves the frozen weight by the change of its low-rank product.

Zi et al. 2023, "Delta-LoRA: Fine-Tuning High-Rank Parameters with the Delta of Low-Rank Matrices",
arXiv:2309.02411, Section 4, Eq. 8 and Algorithm 1. The forward pass is LoRA's without dropout,

    h = W x + b + s * B A x

and after every optimizer step (t -> t+1) the weight W, which has no gradient and no optimizer
state, moves by the change of the product:

    W <- W + lambda * s * (B_{t+1} A_{t+1} - B_t A_t)          lambda = method.delta_lambda

The paper drops the adapter's dropout (Section 4.2), because dL/dW = dL/d(s B A) holds only
without it; method.dropout is therefore ignored.

Warm-up (Algorithm 1's "start steps" K = method.delta_start_step): for the first K optimizer
steps W stays put and the layer is plain LoRA; A_t, B_t are still refreshed after each of them, so
the first step that moves W moves it by that step's change only, and after T > K steps

    W_T = W_0 + lambda * s * (B_T A_T - B_K A_K)

The reason to wait: A starts random and B at zero, so the first changes of B A follow a barely
trained, noisy direction, and Delta-LoRA copies them into W where nothing undoes them (the
optimizer never sees W). The default K = 0 is the method as before; the paper treats K as a
per-task hyperparameter. Each layer counts its own steps (`steps_done`), so resume stays exact.

Implementation: each layer keeps A_t, B_t (r * (in + out) numbers, not an (out, in) product) and
a step counter in non-persistent buffers; `after_step` computes the delta in fp32 and refreshes
them. W, A_t, B_t and the counter change outside the optimizer, so the layer lists them in
`checkpoint_extra`: the checkpoint stores them next to the trainable parameters and resume stays
exact.

What the saved artifact must hold, and why an adapter file alone does not do: in exact
arithmetic the updates telescope, W_T = W_0 + lambda * s * (B_T A_T - B_0 A_0) = W_0 + lambda * s * B_T A_T
(B_0 = 0), which a LoRA file with scale (1 + lambda) * s could carry. But W is updated in place
T times in the training dtype: in bf16 most of those small additions round away, and the weight
that was trained against is that rounded W_T, not the ideal one; a K-step warm-up breaks the
identity too (see above); and continuing training needs W_T itself. So the artifact (tunesmith's
own format) holds the updated weights of the adapted layers plus A and B; `merge` folds s B A into them.
Note also that the training dynamics differ from LoRA at scale (1 + lambda) s: the gradient sees
only the s B A path, the lambda part is a constant copy.

Disabling the adapters does not give the base model back: W itself has moved.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from tunesmith.config import MethodConfig
from tunesmith.errors import UserError
from tunesmith.files import load_state_strict, read_safetensors
from tunesmith.methods.artifact import WEIGHTS_NAME, read_artifact_config, write_artifact
from tunesmith.methods.lora import LoRALinear, describe_lora
from tunesmith.methods.registry import Method, lora_plus_groups

log = logging.getLogger(__name__)


class DeltaLoRALinear(LoRALinear):
    """LoRALinear whose weight follows lambda * s * d(B A) after each step; see the module docstring."""

    # tensors changed outside the optimizer: checkpoints store them (see train/checkpoint.py)
    checkpoint_extra = ("weight", "prev_A", "prev_B", "steps_done")

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0, rslora: bool = False,
                 delta_lambda: float = 0.5, delta_start_step: int = 0):
        if not base.weight.is_floating_point():  # a bitsandbytes 4/8-bit weight (QLoRA, weight_delta.py)
            raise UserError("method.name=delta_lora needs a full-precision base weight: it adds a small update to W "
                            "after every step, which a 4/8-bit W rounds away (docs/qlora.md). With a quantized base "
                            "(model.quantization) use lora, lora_fa, dora or vera.")
        super().__init__(base, r, alpha, 0.0, rslora)  # no dropout: see the module docstring
        self.delta_lambda = delta_lambda
        self.delta_start_step = delta_start_step  # K: steps before W starts to move
        self.register_buffer("prev_A", self.lora_A.weight.detach().clone(), persistent=False)  # A_t
        self.register_buffer("prev_B", self.lora_B.weight.detach().clone(), persistent=False)  # B_t
        self.register_buffer("steps_done", torch.zeros((), dtype=torch.int64, device=base.weight.device),
                             persistent=False)  # optimizer steps seen by apply_delta

    @torch.no_grad()
    def apply_delta(self) -> None:
        """After step t = steps_done + 1: W <- W + lambda * s * (B A - B_t A_t) if t > K; then B_t, A_t <- B, A."""
        if self.merged:
            raise RuntimeError("Delta-LoRA cannot update a merged layer")
        if int(self.steps_done) >= self.delta_start_step:  # past the warm-up
            new = self.lora_B.weight.float() @ self.lora_A.weight.float()  # (out, in)
            old = self.prev_B.float() @ self.prev_A.float()
            self.weight.add_(((new - old) * (self.delta_lambda * self.scaling)).to(self.weight.dtype))
        self.prev_A.copy_(self.lora_A.weight)
        self.prev_B.copy_(self.lora_B.weight)
        self.steps_done += 1

    @torch.no_grad()
    def sync_previous(self) -> None:
        """Take the current A, B as A_t, B_t (after loading weights from a file)."""
        self.prev_A.copy_(self.lora_A.weight)
        self.prev_B.copy_(self.lora_B.weight)


def delta_modules(model: nn.Module) -> list[tuple[str, DeltaLoRALinear]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, DeltaLoRALinear)]


def apply_delta_lora(model: nn.Module, cfg: MethodConfig) -> list[str]:
    from tunesmith.methods.inject import apply_lora

    if cfg.dropout > 0:
        log.info("delta_lora trains without adapter dropout (Zi et al. 2023, Section 4.2); method.dropout=%s "
                 "is not used", cfg.dropout)
    counts: dict[int, int] = {}  # how many modules share each parameter (a tied head shares the embeddings)
    for _, p in model.named_parameters(remove_duplicate=False):
        counts[id(p)] = counts.get(id(p), 0) + 1
    names = apply_lora(model, cfg, DeltaLoRALinear)
    for name, m in delta_modules(model):
        if counts.get(id(m.weight), 0) > 1:
            raise UserError(f"delta_lora cannot adapt {name!r}: its weight is tied to another layer "
                            "(e.g. the input embeddings), which the weight update would change too.")
        m.delta_lambda, m.delta_start_step = cfg.delta_lambda, cfg.delta_start_step
    return names


def after_step_delta_lora(model: nn.Module) -> None:
    """The loop's post-step hook: move every adapted W by lambda * s * d(B A)."""
    for _, m in delta_modules(model):
        m.apply_delta()


def save_delta_lora(model: nn.Module, out_dir: Path, cfg: MethodConfig, base_model_name_or_path: str) -> None:
    modules = delta_modules(model)
    if not modules:
        raise ValueError("save_delta_lora: the model has no Delta-LoRA layers")
    tensors = {}
    for name, m in modules:
        tensors.update({f"{name}.weight": m.weight, f"{name}.lora_A.weight": m.lora_A.weight,
                        f"{name}.lora_B.weight": m.lora_B.weight})
    settings = {"r": cfg.r, "alpha": cfg.alpha, "rslora": cfg.rslora, "delta_lambda": cfg.delta_lambda,
                "delta_start_step": cfg.delta_start_step, "target_modules": [n for n, _ in modules]}
    write_artifact(out_dir, "delta_lora", base_model_name_or_path, settings, tensors)


def load_delta_lora(model: nn.Module, folder: Path) -> MethodConfig:
    meta = read_artifact_config(folder, "delta_lora")
    cfg = MethodConfig(name="delta_lora", r=meta["r"], alpha=meta["alpha"], rslora=meta["rslora"], dropout=0.0,
                       delta_lambda=meta["delta_lambda"], delta_start_step=meta.get("delta_start_step", 0),
                       target_modules=meta["target_modules"])
    path = Path(folder) / WEIGHTS_NAME
    state = read_safetensors(path, "the weights of a delta_lora artifact")
    apply_delta_lora(model, cfg)
    expected = {f"{n}.{k}": t for n, m in delta_modules(model)
                for k, t in (("weight", m.weight), ("lora_A.weight", m.lora_A.weight), ("lora_B.weight", m.lora_B.weight))}
    load_state_strict(expected, state, path, what="this model's Delta-LoRA layers")
    for _, m in delta_modules(model):
        m.sync_previous()
    return cfg


METHOD = Method(
    name="delta_lora",
    apply=apply_delta_lora, save=save_delta_lora, load=load_delta_lora, param_groups=lora_plus_groups,
    after_step=after_step_delta_lora,
    describe=lambda cfg: f"{describe_lora(cfg)} lambda={cfg.delta_lambda} start_step={cfg.delta_start_step}",
    not_on_quantized_base="it adds a small update to W after every step, which a 4/8-bit W rounds away",
)
