"""Every adaptation method behind one small interface, chosen by `method.name`.

The loop and the commands know nothing of a method's math. A method says:

    apply(model, cfg)          -> names of the modules it changed; freezes what must not train
    param_groups(model, cfg)   -> optimizer groups; each may carry `lr_scale` (LoRA+ uses it)
    after_step(model)          -> work after each optimizer step (Delta-LoRA uses it), or None
    save(model, dir, cfg, base)-> the trained artifact (PEFT format where one exists)
    load(model, dir)           -> put a saved artifact back onto a base model

Adding a method is one file plus one entry in METHODS.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from torch import nn

from tunesmith.config import MethodConfig
from tunesmith.errors import UserError


def single_group(model: nn.Module, cfg: MethodConfig) -> list[dict]:
    """All trainable parameters at the base learning rate."""
    return [{"params": [p for p in model.parameters() if p.requires_grad], "lr_scale": 1.0}]


def lora_plus_groups(model: nn.Module, cfg: MethodConfig) -> list[dict]:
    """LoRA+ (Hayou et al. 2024, arXiv:2402.12354): B learns `lora_plus_ratio` times faster than A.

    With B initialised at zero, the paper shows that equal step sizes for A and B are inefficient
    for wide layers; a larger rate for B (ratio ~16) speeds up feature learning. Without a ratio
    this is the single group.
    """
    ratio = cfg.lora_plus_ratio
    if not ratio:
        return single_group(model, cfg)
    b_params, other = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (b_params if "lora_B" in name.split(".") else other).append(p)
    return [{"params": other, "lr_scale": 1.0}, {"params": b_params, "lr_scale": float(ratio)}]


@dataclass(frozen=True)
class Method:
    name: str
    apply: Callable[[nn.Module, MethodConfig], list[str]]
    save: Callable[[nn.Module, Path, MethodConfig, str], None]
    load: Callable[[nn.Module, Path], MethodConfig]
    param_groups: Callable[[nn.Module, MethodConfig], list[dict]] = single_group
    after_step: Callable[[nn.Module], None] | None = None


def _lora() -> Method:
    from tunesmith.methods.inject import apply_lora
    from tunesmith.methods.io import load_adapter, save_adapter

    return Method("lora", apply_lora, save_adapter, load_adapter, lora_plus_groups)


METHODS: dict[str, Callable[[], Method]] = {
    "lora": _lora,
}


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise UserError(f"method.name={name!r} is not a known method; known: {', '.join(sorted(METHODS))}.")
    return METHODS[name]()


# PEFT's `peft_type` in adapter_config.json -> our method name, for loading saved artifacts.
PEFT_TYPES = {"LORA": "lora"}


def load_artifact(model: nn.Module, adapter_dir: Path) -> MethodConfig:
    """Put a saved adapter (any method) onto `model`, choosing the method from its config file."""
    import json

    config_path = Path(adapter_dir) / "adapter_config.json"
    try:
        peft_type = json.loads(config_path.read_text(encoding="utf-8")).get("peft_type")
    except (OSError, ValueError, AttributeError):
        peft_type = "LORA"  # let the method's loader name the precise problem with the file
    if peft_type not in PEFT_TYPES:
        raise UserError(f"{str(config_path)!r}: peft_type {peft_type!r} is not one tunesmith loads natively "
                        f"({', '.join(PEFT_TYPES)}).")
    return get_method(PEFT_TYPES[peft_type]).load(model, Path(adapter_dir))
