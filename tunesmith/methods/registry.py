"""Every adaptation method behind one small interface, chosen by `method.name`.

The loop and the commands know nothing of a method's math. A method says:

    apply(model, cfg)          -> names of the modules it changed; freezes what must not train
    param_groups(model, cfg)   -> optimizer groups; each may carry `lr_scale` (LoRA+ uses it)
    after_step(model)          -> work after each optimizer step (Delta-LoRA uses it), or None
    save(model, dir, cfg, base)-> the trained artifact (PEFT format where one exists)
    load(model, dir)           -> put a saved artifact back onto a base model
    merge(model)               -> the model with the method folded into plain weights, or None
                                  when it cannot be (bottleneck adapters are not linear)

Adding a method is one file plus one entry in METHODS. Artifacts: PEFT's format where PEFT has
the method (lora, lora_fa, dora, vera, peft), tunesmith's own otherwise (methods/artifact.py).
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
            # as peft.optimizers.create_loraplus_optimizer: B and every 1-d parameter (DoRA's magnitude)
            (b_params if "lora_B" in name.split(".") or p.ndim == 1 else other).append(p)
    return [{"params": other, "lr_scale": 1.0}, {"params": b_params, "lr_scale": float(ratio)}]


def merge_weight_deltas(model: nn.Module) -> nn.Module:
    """Fold every weight-delta adapter into its layer (see inject.merge_and_unload)."""
    from tunesmith.methods.inject import merge_and_unload

    return merge_and_unload(model)


@dataclass(frozen=True)
class Method:
    name: str
    apply: Callable[[nn.Module, MethodConfig], list[str]]
    save: Callable[[nn.Module, Path, MethodConfig, str], None]
    load: Callable[[nn.Module, Path], MethodConfig]
    param_groups: Callable[[nn.Module, MethodConfig], list[dict]] = single_group
    after_step: Callable[[nn.Module], None] | None = None
    merge: Callable[[nn.Module], nn.Module] | None = merge_weight_deltas


def _lora() -> Method:
    from tunesmith.methods.inject import apply_lora
    from tunesmith.methods.io import load_adapter, save_adapter

    return Method("lora", apply_lora, save_adapter, load_adapter, lora_plus_groups)


def _lora_fa() -> Method:
    from tunesmith.methods.io import load_adapter, save_adapter
    from tunesmith.methods.lora_fa import apply_lora_fa

    return Method("lora_fa", apply_lora_fa, save_adapter, load_adapter, lora_plus_groups)


def _dora() -> Method:
    from tunesmith.methods.dora import apply_dora
    from tunesmith.methods.io import load_adapter, save_adapter

    return Method("dora", apply_dora, save_adapter, load_adapter, lora_plus_groups)


def _vera() -> Method:
    from tunesmith.methods.vera import apply_vera, load_vera, save_vera

    return Method("vera", apply_vera, save_vera, load_vera)


def _delta_lora() -> Method:
    from tunesmith.methods import delta_lora as d

    return Method("delta_lora", d.apply_delta_lora, d.save_delta_lora, d.load_delta_lora, lora_plus_groups,
                  after_step=d.after_step_delta_lora)


def _adapter() -> Method:
    from tunesmith.methods.adapter import apply_adapters, load_adapters, save_adapters

    return Method("adapter", apply_adapters, save_adapters, load_adapters, merge=None)


def _full() -> Method:
    from tunesmith.methods.full import apply_full, load_full, save_full

    return Method("full", apply_full, save_full, load_full)


def _freeze() -> Method:
    from tunesmith.methods.freeze import apply_freeze, load_freeze, save_freeze

    return Method("freeze", apply_freeze, save_freeze, load_freeze)


def _peft() -> Method:
    from tunesmith.methods.peft_bridge import apply_peft, load_peft, merge_peft, save_peft

    return Method("peft", apply_peft, save_peft, load_peft, merge=merge_peft)


METHODS: dict[str, Callable[[], Method]] = {
    "lora": _lora, "lora_fa": _lora_fa, "dora": _dora, "vera": _vera, "delta_lora": _delta_lora,
    "adapter": _adapter, "full": _full, "freeze": _freeze, "peft": _peft,
}


def describe_method(cfg: MethodConfig) -> str:
    """One line for reports: the method and the settings that matter for it."""
    lora = f"r={cfg.r} alpha={cfg.alpha}{' rslora' if cfg.rslora else ''} targets={cfg.target_modules}"
    lora += f" lora_plus_ratio={cfg.lora_plus_ratio}" if cfg.lora_plus_ratio else ""
    detail = {
        "lora": lora, "lora_fa": lora, "dora": lora,
        "delta_lora": f"{lora} lambda={cfg.delta_lambda} start_step={cfg.delta_start_step}",
        "vera": f"r={cfg.r} seed={cfg.vera_seed} d_init={cfg.vera_d_init} targets={cfg.target_modules}",
        "adapter": f"size={cfg.adapter_size}", "full": "",
        "freeze": f"last {cfg.trainable_blocks} blocks" + (f", {cfg.trainable_modules}" * bool(cfg.trainable_modules)),
        "peft": str(cfg.peft_config),
    }.get(cfg.name, "")
    return f"{cfg.name} {detail}".strip()


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise UserError(f"method.name={name!r} is not a known method; known: {', '.join(sorted(METHODS))}.")
    return METHODS[name]()


# PEFT's `peft_type` in adapter_config.json -> our method name, for loading saved artifacts
# (a LORA file with use_dora=true loads as DoRA; other peft types go through the peft bridge).
PEFT_TYPES = {"LORA": "lora", "VERA": "vera"}


def _artifact_config(adapter_dir: Path) -> tuple[str, dict]:
    """('peft', adapter_config.json) or ('tunesmith', tunesmith_artifact.json) of an artifact folder."""
    import json

    from tunesmith.methods.artifact import ARTIFACT_NAME, read_artifact_config

    if (adapter_dir / ARTIFACT_NAME).is_file():
        return "tunesmith", read_artifact_config(adapter_dir)
    config_path = adapter_dir / "adapter_config.json"
    if not config_path.is_file():
        raise UserError(f"{str(adapter_dir)!r} holds neither adapter_config.json (a PEFT adapter) nor "
                        f"{ARTIFACT_NAME} (a tunesmith artifact): is it an adapter folder?")
    try:
        raw = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raw = {"peft_type": "LORA"}  # let the LoRA loader name the precise problem with the file
    return "peft", raw if isinstance(raw, dict) else {"peft_type": "LORA"}


def load_artifact(model: nn.Module, adapter_dir: Path) -> MethodConfig:
    """Put a saved artifact (any method) onto `model`, choosing the method from its config file."""
    adapter_dir = Path(adapter_dir)
    kind, raw = _artifact_config(adapter_dir)
    if kind == "tunesmith":
        return get_method(raw["method"]).load(model, adapter_dir)
    peft_type = raw.get("peft_type")
    return get_method(PEFT_TYPES.get(peft_type, "peft")).load(model, adapter_dir)


def artifact_base_model(adapter_dir: Path) -> str | None:
    """The base model an artifact was trained on (base_model_name_or_path), if it says."""
    return _artifact_config(Path(adapter_dir))[1].get("base_model_name_or_path")
