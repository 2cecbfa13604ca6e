"""Turn each model reference of a recipe into a folder of safetensors weights.

A reference is one of
  - a model folder (config.json + *.safetensors; a `full` artifact is one);
  - a .gguf file or a built-in model name: tunesmith's cached conversion (models/loading.py);
  - a hub id already in the local cache;
  - an adapter folder of any tunesmith method (PEFT adapter_config.json or tunesmith_artifact.json):
    folded into the base it records first (commands/artifacts.merged_model: a QLoRA adapter into
    its dequantized 4-bit base), and the merged model written to a temporary folder;
  - "BASE+ADAPTER", mergekit's syntax for a LoRA applied to a base: the same, with BASE as the base.
"""

from __future__ import annotations

import logging
from pathlib import Path

from tunesmith.errors import UserError

log = logging.getLogger(__name__)


def same_reference(a: str, b: str) -> bool:
    """Two references name the same model: equal strings, or the same local path."""
    if a == b:
        return True
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    return pa.exists() and pb.exists() and pa.resolve() == pb.resolve()


def is_adapter_folder(path: Path) -> bool:
    from tunesmith.methods.artifact import ARTIFACT_NAME

    if not path.is_dir():
        return False
    has_weights = (path / "config.json").is_file() and any(path.glob("*.safetensors"))
    if has_weights:  # a whole model (a `full` artifact also carries tunesmith_artifact.json)
        return False
    return (path / "adapter_config.json").is_file() or (path / ARTIFACT_NAME).is_file()


def resolve_reference(ref: str, scratch: Path) -> Path:
    """The folder holding `ref`'s weights; adapters are merged into their base under `scratch`."""
    from tunesmith.config import ModelConfig
    from tunesmith.models.loading import resolve_model_folder

    base, plus, adapter = ref.partition("+")
    if plus and Path(adapter).expanduser().is_dir() and not Path(ref).expanduser().exists():
        return materialize_adapter(Path(adapter).expanduser(), base, scratch)
    path = Path(ref).expanduser()
    if is_adapter_folder(path):
        return materialize_adapter(path, None, scratch)
    return resolve_model_folder(ModelConfig(name_or_path=ref))


def materialize_adapter(adapter: Path, base: str | None, scratch: Path) -> Path:
    """Base + adapter folded (any mergeable method), saved as a plain fp32 transformers folder with the tokenizer."""
    from tunesmith.commands.artifacts import merged_model

    out = scratch / f"adapter-{len(list(scratch.iterdir()))}"
    log.info("folding the adapter %s into its base (%s) before merging", adapter, base or "as recorded")
    model, tokenizer = merged_model(str(adapter), base)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    if not any(out.glob("*.safetensors")):
        raise UserError(f"Folding the adapter {str(adapter)!r} into its base wrote no weights.")
    return out
