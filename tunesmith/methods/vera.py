"""VeRA: one pair of frozen random matrices for the whole model, two trained vectors per layer.

Kopiczko et al. 2024, "VeRA: Vector-based Random Matrix Adaptation", arXiv:2310.11454, Section 3,
Eq. 2. LoRA's A and B are replaced by random projections shared by every adapted layer and never
trained; each layer learns only a scaling of their rows:

    h = W0 x + b + Lb B Ld A dropout(x)
    A: (r, max_in), B: (max_out, r)   frozen, shared; a layer uses A[:, :in] and B[:out, :]
    Ld = diag(d), d: (r,)             trained, starts at d_init (0.1; paper Table 6c: small is best)
    Lb = diag(b), b: (out,)           trained, starts at 0, so the model starts at the base model

A and B are Kaiming-uniform (bound sqrt(6 / fan_in)), drawn from a torch CPU generator seeded with
`method.vera_seed`: first A (r, max_in), then B (max_out, r), where max_in and max_out are the largest
input and output sizes over the adapted layers. That is peft's `projection_prng_key` recipe, so
the same seed gives the same matrices as peft.

Parameters: r + out per adapted layer, against LoRA's r * (in + out): with r = 256 on all linear
layers of SmolLM2-135M, 209,280 instead of LoRA r=16's 4,884,480. The rank can be large because it
costs almost nothing; the paper uses 256 to 1024.

The update path never reads W0, so over a QLoRA base (a bitsandbytes 4/8-bit layer) nothing
changes: W0 x + b is the quantized layer's own forward, and A, B, b, d take its compute dtype.
Owning W0 and b, merging (into a dequantized weight only) and `disabled` are weight_delta.py's.

Saved in PEFT's VeRA format (peft_type VERA): per layer `vera_lambda_b` and `vera_lambda_d`, plus
the shared `base_model.vera_A`/`base_model.vera_B` (save_projection=True, peft's default), so a
load never depends on the random generator.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from tunesmith.config import MethodConfig
from tunesmith.errors import UserError
from tunesmith.files import atomic_save_safetensors, atomic_write_json, load_state_strict, read_json
from tunesmith.methods.dropout import Dropout
from tunesmith.methods.registry import Method
from tunesmith.methods.weight_delta import WeightDeltaLinear, adapter_dtype

log = logging.getLogger(__name__)

PREFIX = "base_model.model."


def kaiming_uniform(shape: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """U(-sqrt(6/fan_in), sqrt(6/fan_in)) with fan_in = shape[1], drawn from `generator` (peft's _kaiming_init)."""
    bound = math.sqrt(3.0) * math.sqrt(2) / math.sqrt(shape[1])
    return torch.empty(shape).uniform_(-bound, bound, generator=generator)


class VeRAProjections(nn.Module):
    """The shared frozen A (r, max_in) and B (max_out, r). Non-persistent buffers: they are not part of
    the model's state dict (the adapter file carries them) and `model.to()` moves them once."""

    remove_on_unload = True  # inject.merge_and_unload drops it with the adapters

    def __init__(self, r: int, max_in: int, max_out: int, seed: int):
        super().__init__()
        generator = torch.Generator(device="cpu").manual_seed(seed)
        self.register_buffer("A", kaiming_uniform((r, max_in), generator), persistent=False)
        self.register_buffer("B", kaiming_uniform((max_out, r), generator), persistent=False)


class VeRALinear(WeightDeltaLinear):
    """`h = W0 x + b + Lb B Ld A dropout(x)` around a frozen linear layer; see the module docstring."""

    def __init__(self, base: nn.Linear, projections: VeRAProjections, dropout: float = 0.0, d_init: float = 0.1):
        super().__init__(base)  # owns W0 and b, or calls a quantized base for them (weight_delta.py)
        r, max_in = projections.A.shape
        if projections.B.shape[0] < self.out_features or max_in < self.in_features:
            raise ValueError("VeRA projections are smaller than the layer they adapt")
        self.r = r
        # a plain reference, not a submodule: the projections are registered once, on the model
        self.__dict__["projections"] = projections
        kw = {"device": base.weight.device, "dtype": self.adapter_dtype}
        self.vera_lambda_d = nn.Parameter(torch.full((r,), float(d_init), **kw))  # d: (r,)
        self.vera_lambda_b = nn.Parameter(torch.zeros(self.out_features, **kw))  # b: (out,)
        self.vera_dropout = Dropout(dropout) if dropout > 0 else nn.Identity()  # fast CPU masks: methods/dropout.py

    def _sliced(self) -> tuple[torch.Tensor, torch.Tensor]:
        """A[:, :in] (r, in) and B[:out, :] (out, r)."""
        return self.projections.A[:, : self.in_features], self.projections.B[: self.out_features, :]

    def delta_weight(self) -> torch.Tensor:
        """diag(b) B diag(d) A, shape (out, in), in the weight's dtype (over a quantized base: the compute dtype)."""
        a, b = self._sliced()
        d, lam_b = self.vera_lambda_d.float(), self.vera_lambda_b.float()
        delta = (lam_b[:, None] * b.float()) @ (d[:, None] * a.float())  # (out, r) @ (r, in)
        return delta.to(self._delta_dtype())

    def _update(self, x: torch.Tensor, dropout: bool = True) -> torch.Tensor:
        """b * (B (d * (A x))) for x of shape (..., in) -> (..., out)."""
        a, b = self._sliced()
        x = x.to(self.vera_lambda_d.dtype)
        if dropout:
            x = self.vera_dropout(x)
        return self.vera_lambda_b * F.linear(self.vera_lambda_d * F.linear(x, a), b)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, r={self.r}"


def vera_modules(model: nn.Module) -> list[tuple[str, VeRALinear]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, VeRALinear)]


def apply_vera(model: nn.Module, cfg: MethodConfig) -> list[str]:
    """Freeze the model, hang the shared projections on it (`model.vera_projections`), wrap the targets."""
    from tunesmith.methods.inject import find_targets, weight_delta_modules

    if any(True for _ in weight_delta_modules(model)):
        raise UserError("This model already has adapters; load or apply adapters on a fresh base model.")
    names = find_targets(model, cfg.target_modules)
    modules = dict(model.named_modules())
    max_in = max(modules[n].in_features for n in names)
    max_out = max(modules[n].out_features for n in names)
    first = modules[names[0]]  # the projections live where the adapters compute: a quantized base's compute dtype
    projections = VeRAProjections(cfg.r, max_in, max_out, cfg.vera_seed).to(first.weight.device, adapter_dtype(first))
    parents = {id(child): (parent, attr) for parent in model.modules() for attr, child in parent.named_children()}
    for p in model.parameters():
        p.requires_grad_(False)
    model.add_module("vera_projections", projections)
    for name in names:
        parent, attr = parents[id(modules[name])]
        setattr(parent, attr, VeRALinear(modules[name], projections, cfg.dropout, cfg.vera_d_init))
    vera = sum(cfg.r + modules[n].out_features for n in names)
    lora = sum(cfg.r * (modules[n].in_features + modules[n].out_features) for n in names)
    log.info("VeRA r=%d on %d layers: %s trainable (sum of r + out); LoRA at the same rank, r * (in + out): %s",
             cfg.r, len(names), f"{vera:,}", f"{lora:,}")
    return names


# ---------------------------------------------------------------------------------------------
# PEFT's VeRA format

# Fields of peft 0.21.2's VeraConfig written with their defaults.
_PEFT_DEFAULTS = {"auto_mapping": None, "bias": "none", "fan_in_fan_out": False, "inference_mode": True,
                  "init_weights": True, "layers_pattern": None, "layers_to_transform": None,
                  "modules_to_save": None, "revision": None, "save_projection": True}
_UNSUPPORTED = ("fan_in_fan_out", "layers_to_transform", "modules_to_save")


def vera_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    out = {}
    for name, m in vera_modules(model):
        out[f"{PREFIX}{name}.vera_lambda_b"] = m.vera_lambda_b
        out[f"{PREFIX}{name}.vera_lambda_d"] = m.vera_lambda_d
    out["base_model.vera_A"], out["base_model.vera_B"] = model.vera_projections.A, model.vera_projections.B
    return out


def save_vera(model: nn.Module, out_dir: Path, cfg: MethodConfig, base_model_name_or_path: str) -> None:
    from tunesmith.methods.io import CONFIG_NAME, WEIGHTS_NAME, peft_targets

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    names = [n for n, _ in vera_modules(model)]
    if not names:
        raise ValueError("save_vera: the model has no VeRA layers")
    atomic_save_safetensors(vera_state_dict(model), out / WEIGHTS_NAME)
    config = dict(sorted({
        **_PEFT_DEFAULTS, "base_model_name_or_path": base_model_name_or_path, "d_initial": cfg.vera_d_init,
        "peft_type": "VERA", "projection_prng_key": cfg.vera_seed, "r": cfg.r,
        "target_modules": peft_targets(model, names), "task_type": "CAUSAL_LM", "vera_dropout": cfg.dropout,
    }.items()))
    atomic_write_json(out / CONFIG_NAME, config)


def load_vera(model: nn.Module, adapter_dir: Path) -> MethodConfig:
    """Apply VeRA as adapter_config.json says and load its vectors (and projections, when saved)."""
    from tunesmith.methods.io import CONFIG_NAME, read_adapter_weights

    adapter_dir = Path(adapter_dir)
    path = adapter_dir / CONFIG_NAME
    raw = read_json(path, "the settings of a PEFT VeRA adapter")
    bad = [k for k in _UNSUPPORTED if raw.get(k)] + (["bias"] if raw.get("bias", "none") != "none" else [])
    if bad:
        raise UserError(f"{str(path)!r} uses VeRA options tunesmith does not support: "
                        + ", ".join(f"{k}={raw[k]!r}" for k in bad) + ".")
    cfg = MethodConfig(name="vera", r=raw.get("r", 256), dropout=raw.get("vera_dropout", 0.0),
                       target_modules=raw.get("target_modules"), vera_seed=raw.get("projection_prng_key", 0),
                       vera_d_init=raw.get("d_initial", 0.1))
    weights, state = read_adapter_weights(adapter_dir, "the weights of a VeRA adapter")
    apply_vera(model, cfg)
    params = vera_state_dict(model)
    optional = {"base_model.vera_A", "base_model.vera_B"}  # without them the seed regenerates A and B
    load_state_strict(params, state, weights, required=params.keys() - optional,
                      what=f"this model's VeRA layers as {CONFIG_NAME} describes them")
    return cfg


METHOD = Method(
    name="vera",
    apply=apply_vera, save=save_vera, load=load_vera, peft_type="VERA",
    describe=lambda cfg: f"r={cfg.r} seed={cfg.vera_seed} d_init={cfg.vera_d_init} targets={cfg.target_modules}",
)
