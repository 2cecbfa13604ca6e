"""Every adaptation method behind one small interface, chosen by `method.name`.

The loop and the commands know nothing of a method's math. A method file ends with
`METHOD = Method(...)`, which says:

    apply(model, cfg)          -> names of the modules it changed; freezes what must not train
    param_groups(model, cfg)   -> optimizer groups; each may carry `lr_scale` (lora_plus_groups is
                                  LoRA+, and method.lora_plus_ratio is accepted only where it is used)
    after_step(model)          -> work after each optimizer step (Delta-LoRA uses it), or None
    save(model, dir, cfg, base)-> the trained artifact (PEFT format where one exists)
    load(model, dir)           -> put a saved artifact back onto a base model
    merge(model)               -> the model with the method folded into plain weights, or None
                                  when it cannot be (bottleneck adapters are not linear)
    disable(model)             -> a context in which the model computes the base model (DPO's and
                                  PPO's reference for free), or None where the method trains the
                                  base weights themselves (full, freeze)
    not_on_quantized_base      -> why it cannot train over a 4/8-bit base, or None when it can
    sharding                   -> "ddp" (replicate; few trainable weights) or "fsdp2" (shard
                                  everything) under torchrun
    peft_type                  -> PEFT's peft_type of its artifact (None: tunesmith's own format)
    describe(cfg)              -> one line for reports: the method and the settings that matter

Adding a method is one file plus one line in METHODS (name -> module); the contract test
(tests/test_method_contract.py) then checks it like every other. A new option of its own goes in
config.MethodConfig. Nothing here imports torch until a method is asked for, so reading a config
stays cheap.
"""

from __future__ import annotations

import importlib
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, ContextManager, Iterator

from tunesmith.errors import UserError

if TYPE_CHECKING:
    from torch import nn

    from tunesmith.config import MethodConfig

# name -> the module that defines METHOD, in the order --help lists them. Loading a PEFT artifact
# picks the first method here whose peft_type matches (lora loads LORA files, DoRA ones included).
METHODS: dict[str, str] = {
    "lora": "tunesmith.methods.lora",
    "lora_fa": "tunesmith.methods.lora_fa",
    "dora": "tunesmith.methods.dora",
    "vera": "tunesmith.methods.vera",
    "delta_lora": "tunesmith.methods.delta_lora",
    "adapter": "tunesmith.methods.adapter",
    "full": "tunesmith.methods.full",
    "freeze": "tunesmith.methods.freeze",
    "peft": "tunesmith.methods.peft_bridge",
}


def single_group(model: "nn.Module", cfg: "MethodConfig") -> list[dict]:
    """All trainable parameters at the base learning rate."""
    return [{"params": [p for p in model.parameters() if p.requires_grad], "lr_scale": 1.0}]


def lora_plus_groups(model: "nn.Module", cfg: "MethodConfig") -> list[dict]:
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


def merge_weight_deltas(model: "nn.Module") -> "nn.Module":
    """Fold every weight-delta adapter into its layer (see inject.merge_and_unload)."""
    from tunesmith.methods.inject import merge_and_unload

    return merge_and_unload(model)


@contextmanager
def switch_adapters_off(model: "nn.Module") -> Iterator["nn.Module"]:
    """Every module with a `disabled` switch turned off (inject.adapters_disabled)."""
    from tunesmith.methods.inject import adapters_disabled

    with adapters_disabled(model):
        yield model


@dataclass(frozen=True)
class Method:
    name: str
    apply: Callable[["nn.Module", "MethodConfig"], list[str]]
    save: Callable[["nn.Module", Path, "MethodConfig", str], None]
    load: Callable[["nn.Module", Path], "MethodConfig"]
    describe: Callable[["MethodConfig"], str]
    param_groups: Callable[["nn.Module", "MethodConfig"], list[dict]] = single_group
    after_step: Callable[["nn.Module"], None] | None = None
    merge: Callable[["nn.Module"], "nn.Module"] | None = merge_weight_deltas
    disable: Callable[["nn.Module"], ContextManager] | None = switch_adapters_off
    not_on_quantized_base: str | None = None
    sharding: str = "ddp"
    peft_type: str | None = None

    @property
    def uses_lora_plus(self) -> bool:
        return self.param_groups is lora_plus_groups


def describe_method(cfg: "MethodConfig") -> str:
    """One line for reports: the method and the settings that matter for it."""
    return f"{cfg.name} {get_method(cfg.name).describe(cfg)}".strip()


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise UserError(f"method.name={name!r} is not a known method; known: {', '.join(METHODS)}.")
    return importlib.import_module(METHODS[name]).METHOD


def peft_loader(peft_type: str | None) -> Method:
    """The method that loads a PEFT artifact of this peft_type; the peft bridge for every other type."""
    for name in METHODS:
        method = get_method(name)
        if method.peft_type is not None and method.peft_type == peft_type:
            return method
    return get_method("peft")


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
    return peft_loader(raw.get("peft_type")).load(model, adapter_dir)


def artifact_base_model(adapter_dir: Path) -> str | None:
    """The base model an artifact was trained on (base_model_name_or_path), if it says."""
    return _artifact_config(Path(adapter_dir))[1].get("base_model_name_or_path")
