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

from pathlib import Path

import torch

from tunesmith.errors import UserError
from tunesmith.files import atomic_save_safetensors, atomic_write_json, read_json

ARTIFACT_NAME = "tunesmith_artifact.json"
WEIGHTS_NAME = "weights.safetensors"


def write_artifact(out_dir: str | Path, method: str, base_model_name_or_path: str, settings: dict,
                   tensors: dict[str, torch.Tensor] | None = None) -> None:
    """Write weights.safetensors (when `tensors` is given) and then the json, each atomically."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if tensors is not None:
        atomic_save_safetensors(tensors, out / WEIGHTS_NAME)
    meta = {"method": method, "base_model_name_or_path": base_model_name_or_path, "format_version": 1, **settings}
    atomic_write_json(out / ARTIFACT_NAME, meta)


def read_artifact_config(folder: str | Path, method: str | None = None) -> dict:
    """The json of a tunesmith artifact folder (checked to be for `method`, when given)."""
    path = Path(folder) / ARTIFACT_NAME
    meta = read_json(path, "the settings of a tunesmith artifact (is its folder an artifact folder?)")
    if not isinstance(meta, dict) or "method" not in meta:
        raise UserError(f"{str(path)!r} must be a JSON object with a 'method' field.")
    if method is not None and meta["method"] != method:
        raise UserError(f"{str(path)!r} holds a {meta['method']!r} artifact, not {method!r}.")
    return meta
