"""tunesmith's own artifact format, for what PEFT has no format for (full, freeze, adapter, delta_lora).

A folder with

    tunesmith_artifact.json   {"method": ..., "base_model_name_or_path": ..., "format_version": 1, <settings>}
    weights.safetensors       tensors under the model's own state-dict keys (e.g.
                              model.layers.29.mlp.up_proj.weight, model.layers.0.mlp.adapter.down.weight)

(`full` writes a complete transformers folder, weights and tokenizer, instead and adds only the json.)
A PEFT adapter folder has adapter_config.json instead; `registry.load_artifact` tells the two apart
by that file.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes
from torch import nn

from tunesmith.errors import UserError
from tunesmith.methods.io import _atomic_write

ARTIFACT_NAME = "tunesmith_artifact.json"
WEIGHTS_NAME = "weights.safetensors"


def write_artifact(out_dir: str | Path, method: str, base_model_name_or_path: str, settings: dict,
                   tensors: dict[str, torch.Tensor] | None = None) -> None:
    """Write weights.safetensors (when `tensors` is given) and then the json, each atomically."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if tensors is not None:
        data = {k: t.detach().cpu().contiguous() for k, t in tensors.items()}
        _atomic_write(out / WEIGHTS_NAME, safetensors_bytes(data, metadata={"format": "pt"}))
    meta = {"method": method, "base_model_name_or_path": base_model_name_or_path, "format_version": 1, **settings}
    _atomic_write(out / ARTIFACT_NAME, (json.dumps(meta, indent=2) + "\n").encode("utf-8"))


def read_artifact_config(folder: str | Path, method: str | None = None) -> dict:
    """The json of a tunesmith artifact folder (checked to be for `method`, when given)."""
    path = Path(folder) / ARTIFACT_NAME
    if not path.is_file():
        raise UserError(f"{str(path)!r} does not exist: is {str(folder)!r} a tunesmith artifact folder?")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{str(path)!r} is not valid JSON: {e}.") from None
    if not isinstance(meta, dict) or "method" not in meta:
        raise UserError(f"{str(path)!r} must be a JSON object with a 'method' field.")
    if method is not None and meta["method"] != method:
        raise UserError(f"{str(path)!r} holds a {meta['method']!r} artifact, not {method!r}.")
    return meta


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise UserError(f"{str(path)!r} does not exist: the artifact folder has no weights.")
    try:
        return load_file(path)
    except (SafetensorError, OSError) as e:
        raise UserError(f"{str(path)!r} is not a readable safetensors file: {e}.") from None


def named_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer under each of its names (a tied weight under all of them)."""
    return {**dict(model.named_buffers(remove_duplicate=False)),
            **dict(model.named_parameters(remove_duplicate=False))}


def copy_into(model: nn.Module, state: dict[str, torch.Tensor], source: Path, allow_missing: bool = True) -> None:
    """Copy `state` into the model's tensors of the same names; unknown names or shapes are errors.

    With allow_missing=False every parameter must be in `state`, except tied copies of one that is.
    """
    own = named_tensors(model)
    unknown = sorted(state.keys() - own.keys())
    if unknown:
        raise UserError(f"{str(source)!r} has unexpected key {unknown[0]!r} ({len(unknown)} unexpected): "
                        "was it saved for a different model or method?")
    if not allow_missing:
        loaded = {id(own[k]) for k in state}
        missing = sorted(n for n, p in model.named_parameters(remove_duplicate=False) if id(p) not in loaded)
        if missing:
            raise UserError(f"{str(source)!r} is missing key {missing[0]!r} ({len(missing)} missing).")
    with torch.no_grad():
        for key, tensor in state.items():
            if tensor.shape != own[key].shape:
                raise UserError(f"{str(source)!r}: {key!r} has shape {tuple(tensor.shape)}, "
                                f"expected {tuple(own[key].shape)}.")
            own[key].copy_(tensor.to(own[key].dtype))
