"""Any peft method, trained by tunesmith's loop: the bridge to what tunesmith has no native code for.

There is no new math here; the method is whatever `method.peft_config` names (IA3, LoHa, LoKr,
BOFT, OFT, FourierFT, ... see peft's documentation for each one's formula and paper):

    method:
      name: peft
      peft_config: {peft_type: IA3, target_modules: [k_proj, v_proj, down_proj], feedforward_modules: [down_proj]}

The mapping goes to peft's config class for its peft_type; `peft.inject_adapter_in_model` puts
the adapter layers into the model in place, so the model stays a plain transformers model and
the loop, the objectives and generation need no change. peft freezes the base and leaves the
adapter's parameters trainable; our optimizer, schedule and checkpoints train them.

The artifact is peft's own format: adapter_config.json written by the config's save_pretrained and
adapter_model.safetensors holding `get_peft_model_state_dict` under the keys PeftModel writes
(`base_model.model.<module path>...`), so `peft.PeftModel.from_pretrained` loads it and so does
tunesmith (`--adapter`, `merge`).

peft is an optional extra, needed for this path only: pip install 'tunesmith[peft]'. Prompt-learning
methods (prefix tuning, prompt tuning) change the inputs rather than layers and are not supported.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from tunesmith.config import MethodConfig
from tunesmith.errors import UserError
from tunesmith.methods.registry import Method
from tunesmith.files import atomic_save_safetensors, atomic_write_json, check_keys, read_json

ADAPTER = "default"
PREFIX = "base_model.model."


def require_peft():
    try:
        import peft
    except ImportError:
        raise UserError("method.name=peft (or loading a peft adapter tunesmith has no native code for) needs the "
                        "peft package, which is not installed: pip install 'tunesmith[peft]'.") from None
    return peft


def build_peft_config(raw: dict):
    """{peft_type: X, ...} -> peft's XConfig(...), with errors naming the bad field."""
    require_peft()
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    fields = dict(raw)
    kind = str(fields.pop("peft_type", "")).upper()
    known = {str(getattr(k, "value", k)): v for k, v in PEFT_TYPE_TO_CONFIG_MAPPING.items()}
    if kind not in known:
        raise UserError(f"method.peft_config.peft_type={kind!r} is not a peft method; "
                        f"known: {', '.join(sorted(known))}.")
    fields.setdefault("task_type", "CAUSAL_LM")
    try:
        config = known[kind](**fields)
    except (TypeError, ValueError) as e:
        raise UserError(f"method.peft_config is not a valid {known[kind].__name__}: {e}") from None
    if config.is_prompt_learning:
        raise UserError(f"method.peft_config.peft_type={kind} is a prompt-learning method; the bridge injects layers "
                        "and supports adapter methods (LoRA-like, IA3, LoHa, LoKr, OFT, ...) only.")
    return config


def tuner_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [(n, m) for n, m in model.named_modules() if isinstance(m, BaseTunerLayer)]


def _inject(model: nn.Module, config) -> list[str]:
    peft = require_peft()
    if tuner_layers(model):
        raise UserError("This model already has peft adapters; apply them to a fresh base model.")
    try:
        peft.inject_adapter_in_model(config, model, adapter_name=ADAPTER)
    except ValueError as e:
        raise UserError(f"peft could not apply {config.peft_type}: {e}") from None
    return [n for n, _ in tuner_layers(model)]


def apply_peft(model: nn.Module, cfg: MethodConfig) -> list[str]:
    """Inject the configured peft method in place; peft leaves only its adapter parameters trainable."""
    return _inject(model, build_peft_config(cfg.peft_config or {}))


def save_peft(model: nn.Module, out_dir: Path, cfg: MethodConfig, base_model_name_or_path: str) -> None:
    """adapter_config.json and adapter_model.safetensors as PeftModel.save_pretrained writes them."""
    from tunesmith.methods.io import CONFIG_NAME, WEIGHTS_NAME

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = model.peft_config[ADAPTER]
    atomic_save_safetensors(_peft_state(model), out / WEIGHTS_NAME)
    raw = config.to_dict()
    raw.update(base_model_name_or_path=base_model_name_or_path, inference_mode=True)
    raw = {k: (sorted(v) if isinstance(v, set) else v) for k, v in raw.items()}
    atomic_write_json(out / CONFIG_NAME, raw)


def _peft_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's tensors as PeftModel.save_pretrained names them (`base_model.model.<module path>...`):
    what save writes, and so also what load expects of a file for the same config."""
    require_peft()
    from peft import get_peft_model_state_dict

    state = get_peft_model_state_dict(model, adapter_name=ADAPTER)
    return {(k if k.startswith("base_model.") else PREFIX + k): v for k, v in state.items()}


def load_peft(model: nn.Module, adapter_dir: Path) -> MethodConfig:
    """Inject the adapter described by adapter_config.json in place and load its weights.

    The file is read and checked by us before peft sees it: a corrupt or truncated file, or one whose
    keys or shapes differ from what peft's layers for this config hold (the keys `save_peft` would
    write for them), is a UserError naming the file, not a traceback from inside peft."""
    require_peft()
    from peft import set_peft_model_state_dict

    from tunesmith.methods.io import CONFIG_NAME, read_adapter_weights

    adapter_dir = Path(adapter_dir)
    raw = read_json(adapter_dir / CONFIG_NAME, "the settings of a peft adapter")
    fields = {k: v for k, v in raw.items() if k not in ("peft_version", "auto_mapping", "base_model_name_or_path",
                                                        "revision", "inference_mode")}
    config = build_peft_config(fields)
    kind = str(raw.get("peft_type")).upper()
    path, state = read_adapter_weights(adapter_dir, f"the weights of a peft {kind} adapter")
    _inject(model, config)
    check_keys(_peft_state(model), state, path, what=f"this model's peft {kind} layers as {CONFIG_NAME} describes them")
    state = {(k[len(PREFIX):] if k.startswith(PREFIX) else k): v for k, v in state.items()}
    result = set_peft_model_state_dict(model, state, adapter_name=ADAPTER)
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:  # not expected after check_keys; kept so a peft change cannot load a file half-way silently
        raise UserError(f"{str(path)!r} has weights this model's {kind} layers do not "
                        f"have, e.g. {unexpected[0]!r}: was it trained for a different model?")
    for p in model.parameters():
        p.requires_grad_(False)
    return MethodConfig(name="peft", peft_config=fields)


@torch.no_grad()
def merge_peft(model: nn.Module) -> nn.Module:
    """Fold every peft layer into its base layer and put the base layer back (peft's merge_and_unload)."""
    parents = {id(child): (parent, attr) for parent in model.modules() for attr, child in parent.named_children()}
    for name, layer in tuner_layers(model):
        if layer is not None and id(layer) in parents:
            try:
                layer.merge()
            except (NotImplementedError, ValueError) as e:
                raise UserError(f"peft cannot merge the adapter on {name!r}: {e}") from None
            parent, attr = parents[id(layer)]
            setattr(parent, attr, layer.get_base_layer())
    if hasattr(model, "peft_config"):
        del model.peft_config
    return model


@contextmanager
def peft_disabled(model: nn.Module):
    """Every peft layer switched off (peft's own enable_adapters switch), restored afterwards."""
    layers = [layer for _, layer in tuner_layers(model)]
    before = [layer.disable_adapters for layer in layers]
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield model
    finally:
        for layer, was_disabled in zip(layers, before):
            layer.enable_adapters(not was_disabled)


METHOD = Method(
    name="peft",
    apply=apply_peft, save=save_peft, load=load_peft, merge=merge_peft, disable=peft_disabled,
    describe=lambda cfg: str(cfg.peft_config),
    not_on_quantized_base="the peft bridge does not set up peft's bitsandbytes layers; method.name=lora does",
)
