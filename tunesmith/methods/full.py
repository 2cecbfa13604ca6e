"""Full fine-tuning: every weight of the model trains.

    theta <- theta - lr * AdamW_direction(dL/dtheta)        for every parameter theta

No paper of its own: it is the baseline that parameter-efficient methods are measured against
(LoRA, Hu et al. 2021, arXiv:2106.09685, Table 2, compares with it first). It can reach further
than any adapter, at a price: AdamW keeps two moments per parameter, so training state is weight
+ gradient + 2 moments = 16 bytes per parameter in fp32 (2.2 GB for SmolLM2-135M), and the
artifact is a whole model.

Artifact: a complete transformers folder (config.json, model.safetensors and the tokenizer's files;
AutoModelForCausalLM and AutoTokenizer load it as is) plus tunesmith_artifact.json naming the base
model, so `--adapter` and `merge` treat it like any other artifact. The tokenizer is the one of the
folder the model was loaded from (transformers records it as model.name_or_path; built-in and GGUF
models load from their converted folder, which holds one), so the method's save signature stays
the same as every other method's. Loading copies the weights into a base model of the same shape.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from tunesmith.config import MethodConfig
from tunesmith.errors import UserError
from tunesmith.files import load_state_strict, read_safetensors
from tunesmith.methods.artifact import read_artifact_config, write_artifact
from tunesmith.methods.registry import Method

log = logging.getLogger(__name__)


def apply_full(model: nn.Module, cfg: MethodConfig) -> list[str]:
    """Every parameter trains. Returns the names of the modules that hold parameters directly."""
    for p in model.parameters():
        p.requires_grad_(True)
    return [n for n, m in model.named_modules() if any(True for _ in m.parameters(recurse=False))]


def source_tokenizer(model: nn.Module):
    """The tokenizer of the folder `model` was loaded from, as models.loading loads it; None if there is none."""
    from tunesmith.models.loading import load_tokenizer

    folder = Path(getattr(model, "name_or_path", "") or "")
    if not str(folder) or not (folder / "tokenizer_config.json").is_file():
        return None
    try:
        return load_tokenizer(folder)
    except (OSError, ValueError) as e:  # e.g. a tokenizer that needs trust_remote_code
        log.warning("could not load the tokenizer of %s (%s)", folder, e)
        return None


def save_full(model: nn.Module, out_dir: Path, cfg: MethodConfig, base_model_name_or_path: str,
              tokenizer=None) -> None:
    """model.save_pretrained (safetensors), the tokenizer (default: the model's source folder's), and
    tunesmith_artifact.json."""
    out = Path(out_dir)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer = tokenizer if tokenizer is not None else source_tokenizer(model)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    else:
        log.warning("%s holds no tokenizer (the model was not loaded from a folder with one): copy the base "
                    "model's tokenizer files into it to load it with AutoTokenizer", out)
    write_artifact(out, "full", base_model_name_or_path, {})


def load_full(model: nn.Module, folder: Path) -> MethodConfig:
    """Copy every weight of a saved model folder (one or several safetensors shards) into `model`."""
    folder = Path(folder)
    read_artifact_config(folder, "full")
    shards = sorted(folder.glob("model*.safetensors"))
    if not shards:
        raise UserError(f"{str(folder)!r} has no model*.safetensors: it holds no full model weights.")
    state: dict[str, torch.Tensor] = {}
    for shard in shards:
        state.update(read_safetensors(shard, "the weights of a fully fine-tuned model"))
    # Every parameter is required, except tied copies of one that is loaded (lm_head tied to the
    # embeddings is saved once); buffers are not (transformers recomputes the non-persistent ones).
    params = dict(model.named_parameters(remove_duplicate=False))
    loaded = {id(params[k]) for k in state if k in params}
    required = [n for n, p in params.items() if id(p) not in loaded]
    load_state_strict(model, state, folder, required, what="this model")
    return MethodConfig(name="full")


# Trains W itself: nothing to merge (the artifact is the merged model) and no base left to switch back to.
METHOD = Method(
    name="full",
    apply=apply_full, save=save_full, load=load_full, describe=lambda cfg: "",
    merge=lambda model: model, disable=None, sharding="fsdp2",
    not_on_quantized_base="it trains W itself, and packed 4/8-bit weights have no gradient",
)
