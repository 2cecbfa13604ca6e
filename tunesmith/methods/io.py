"""Adapters on disk, in PEFT's format, so they load in `peft.PeftModel.from_pretrained` and back.

An adapter folder holds two files:

    adapter_config.json        LoraConfig fields: peft_type "LORA", r, lora_alpha, target_modules, use_dora, ...
    adapter_model.safetensors  base_model.model.<module path>.lora_A.weight   (r, in)
                               base_model.model.<module path>.lora_B.weight   (out, r)
                               base_model.model.<module path>.lora_magnitude_vector   (out,)  DoRA only
                               base_model.model.<module path>.lora_embedding_A   (r, num)    an embedding table
                               base_model.model.<module path>.lora_embedding_B   (dim, r)    (lora_embedding.py)

PEFT's "base_model.model." prefix comes from its wrappers (PeftModel.base_model is a LoraModel
whose .model is the transformer); the adapter name ("default") is left out of the keys.
Weights are read from safetensors only: pickle files (.bin, .pt) can run code when loaded.
"""

from __future__ import annotations

from pathlib import Path

import torch
from pydantic import ValidationError
from torch import nn

from tunesmith.config import MethodConfig
from tunesmith.errors import UserError
from tunesmith.files import atomic_save_safetensors, atomic_write_json, load_state_strict, read_json, read_safetensors
from tunesmith.methods.dora import DoRALinear
from tunesmith.methods.inject import adapter_modules, apply_lora
from tunesmith.methods.lora import LoRALinear
from tunesmith.methods.lora_embedding import LoRAEmbedding

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."

# Fields of peft 0.21.2's LoraConfig that we always write with their defaults (we use none of them).
_PEFT_DEFAULTS = {
    "alora_invocation_tokens": None, "alpha_pattern": {}, "arrow_config": None, "auto_mapping": None,
    "corda_config": None, "ensure_weight_tying": False, "eva_config": None, "exclude_modules": None,
    "kasa_config": None, "layer_replication": None, "layers_pattern": None, "layers_to_transform": None,
    "loftq_config": {}, "lora_bias": False, "lora_ga_config": None, "megatron_config": None,
    "megatron_core": "megatron.core", "modules_to_save": None, "monteclora_config": None,
    "qalora_group_size": 16, "rank_pattern": {}, "revision": None, "target_parameters": None,
    "trainable_token_indices": None, "use_bdlora": None, "use_dora": False, "use_qalora": False,
    "velora_config": None,
}
# Fields that change what the adapter computes; we refuse an adapter that sets any of them.
_UNSUPPORTED = ("alpha_pattern", "rank_pattern", "layers_to_transform", "exclude_modules",
                "fan_in_fan_out", "lora_bias", "target_parameters", "trainable_token_indices",
                "layer_replication", "use_qalora", "alora_invocation_tokens", "use_bdlora", "arrow_config")


def _peft_tensors(name: str, a: LoRALinear | LoRAEmbedding) -> dict[str, torch.Tensor]:
    """PEFT key -> tensor for one adapted module (DoRA adds its magnitude vector; an embedding's are Parameters
    themselves, so their keys have no ".weight")."""
    if isinstance(a, LoRAEmbedding):
        return {f"{PREFIX}{name}.lora_embedding_A": a.lora_embedding_A,
                f"{PREFIX}{name}.lora_embedding_B": a.lora_embedding_B}
    out = {f"{PREFIX}{name}.lora_A.weight": a.lora_A.weight, f"{PREFIX}{name}.lora_B.weight": a.lora_B.weight}
    if isinstance(a, DoRALinear):
        out[f"{PREFIX}{name}.lora_magnitude_vector"] = a.lora_magnitude_vector
    return out


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter weights under PEFT's key names (detached, contiguous, on CPU)."""
    out = {}
    for name, a in adapter_modules(model):
        out.update({k: t.detach().cpu().contiguous() for k, t in _peft_tensors(name, a).items()})
    return out


def peft_targets(model: nn.Module, names: list[str]) -> list[str]:
    """`target_modules` as PEFT writes it for the adapted `names`: their suffixes, or the full names
    when suffixes would also catch linear layers that were not adapted."""
    linears = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Embedding)) and ".lora_" not in n]
    suffixes = sorted({n.split(".")[-1] for n in names})
    covered = {n for n in linears + names if n.split(".")[-1] in suffixes}
    return suffixes if covered == set(names) else sorted(names)


def adapter_config(model: nn.Module, cfg: MethodConfig, base_model_name_or_path: str) -> dict:
    """The adapter_config.json dict PEFT writes for this LoRA."""
    names = [n for n, _ in adapter_modules(model)]
    targets = peft_targets(model, names)
    use_dora = any(isinstance(a, DoRALinear) for _, a in adapter_modules(model))
    alpha = int(cfg.alpha) if float(cfg.alpha).is_integer() else cfg.alpha
    return dict(sorted({
        **_PEFT_DEFAULTS,
        "base_model_name_or_path": base_model_name_or_path, "bias": "none", "fan_in_fan_out": False,
        "inference_mode": True, "init_lora_weights": True, "lora_alpha": alpha, "lora_dropout": cfg.dropout,
        "peft_type": "LORA", "r": cfg.r, "target_modules": targets, "task_type": "CAUSAL_LM",
        "use_rslora": cfg.rslora, "use_dora": use_dora,
    }.items()))


def save_adapter(model: nn.Module, out_dir: str | Path, cfg: MethodConfig, base_model_name_or_path: str) -> None:
    """Write adapter_config.json and adapter_model.safetensors (PEFT format) into out_dir."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = adapter_state_dict(model)
    if not tensors:
        raise ValueError("save_adapter: the model has no LoRA adapters")
    atomic_save_safetensors(tensors, out / WEIGHTS_NAME)
    atomic_write_json(out / CONFIG_NAME, adapter_config(model, cfg, base_model_name_or_path))


def read_adapter_config(adapter_dir: str | Path) -> MethodConfig:
    """adapter_config.json -> MethodConfig, refusing what our LoRA does not compute."""
    path = Path(adapter_dir) / CONFIG_NAME
    raw = read_json(path, "the settings of a PEFT adapter (is its folder an adapter folder?)")
    if not isinstance(raw, dict):
        raise UserError(f"{str(path)!r} must hold a JSON object of LoRA settings.")
    if raw.get("peft_type") != "LORA":
        raise UserError(f"{str(path)!r} has peft_type {raw.get('peft_type')!r}; only LORA adapters are supported.")
    bad = [k for k in _UNSUPPORTED if raw.get(k)]
    if raw.get("bias", "none") != "none":
        bad.append("bias")
    init = raw.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(("pissa", "olora", "corda", "loftq")):
        bad.append("init_lora_weights")  # these change the base weights too
    if bad:
        raise UserError(f"{str(path)!r} uses LoRA options tunesmith does not support: "
                        + ", ".join(f"{k}={raw[k]!r}" for k in bad) + ".")
    try:
        return MethodConfig(name="dora" if raw.get("use_dora") else "lora",
                            r=raw.get("r", 8), alpha=raw.get("lora_alpha", 8), dropout=raw.get("lora_dropout", 0.0),
                            rslora=bool(raw.get("use_rslora", False)), target_modules=raw.get("target_modules"))
    except ValidationError as e:
        raise UserError(f"{str(path)!r} has invalid LoRA settings: {e}") from None


def attach_modules_to_save(model: nn.Module, names: list[str] | None, config_path: Path) -> dict[str, torch.Tensor]:
    """PEFT's `modules_to_save`: whole modules (a head, the embeddings) trained along with the adapter. Each module
    matching an entry (its full name, or a suffix after a dot, as target_modules) is replaced by a frozen copy that
    will hold the trained weights, so the base module stays untouched (other adapters share it). PEFT saves the
    copy as `base_model.model.<module path>.<parameter>`; returns those keys -> the copy's parameters."""
    import copy

    from tunesmith.methods.weight_delta import WeightDeltaLinear

    params: dict[str, torch.Tensor] = {}
    if not names:
        return params
    parents = {id(child): (parent, attr) for parent in model.modules() for attr, child in parent.named_children()}
    for entry in names:
        found = [(n, m) for n, m in model.named_modules() if n and (n == entry or n.endswith("." + entry))]
        if not found or any(isinstance(m, WeightDeltaLinear) for _, m in found):
            raise UserError(f"{str(config_path)!r}: modules_to_save entry {entry!r} names "
                            f"{'no module' if not found else 'an adapted layer'} of this model.")
        for name, module in found:
            trained = copy.deepcopy(module).requires_grad_(False)
            parent, attr = parents[id(module)]
            setattr(parent, attr, trained)
            params.update({f"{PREFIX}{name}.{k}": p for k, p in trained.named_parameters()})
    return params


def read_adapter_weights(adapter_dir: Path, what: str) -> tuple[Path, dict[str, torch.Tensor]]:
    """(path, tensors) of adapter_model.safetensors, read strictly (files.read_safetensors). A folder
    with only a pickle (adapter_model.bin, .pt) is refused without unpickling it."""
    path = adapter_dir / WEIGHTS_NAME
    pickles = [p.name for p in (adapter_dir / "adapter_model.bin", adapter_dir / "adapter_model.pt") if p.is_file()]
    if pickles and not path.is_file():
        raise UserError(
            f"{str(adapter_dir)!r} holds only {', '.join(pickles)}, a pickle file; loading pickles can run "
            f"arbitrary code, so tunesmith reads {WEIGHTS_NAME} only. If you trust the file, convert it once: "
            "`from safetensors.torch import save_file; import torch; "
            f"save_file(torch.load('{pickles[0]}', weights_only=True), '{WEIGHTS_NAME}')`.")
    return path, read_safetensors(path, what)


def load_adapter(model: nn.Module, adapter_dir: str | Path) -> MethodConfig:
    """Inject LoRA as adapter_config.json says and load adapter_model.safetensors (strictly), with trained copies
    of its `modules_to_save` (see attach_modules_to_save)."""
    adapter_dir = Path(adapter_dir)
    cfg = read_adapter_config(adapter_dir)
    path, state = read_adapter_weights(adapter_dir, f"the weights of a {cfg.name} adapter")
    apply_lora(model, cfg, DoRALinear if cfg.name == "dora" else LoRALinear)
    params = attach_modules_to_save(model, read_json(adapter_dir / CONFIG_NAME, "").get("modules_to_save"),
                                    adapter_dir / CONFIG_NAME)
    for name, a in adapter_modules(model):
        params.update(_peft_tensors(name, a))
        table = f"{PREFIX}{name}.base_layer.weight"  # peft saves an adapted embedding's whole table beside it
        if isinstance(a, LoRAEmbedding) and table in state:  # (save_embedding_layers), which then replaces E0
            params[table] = a.weight
    load_state_strict(params, state, path, what=f"this model's {cfg.name} layers as {CONFIG_NAME} describes them")
    return cfg
