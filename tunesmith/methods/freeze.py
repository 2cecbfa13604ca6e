"""Freeze: only the last k transformer blocks (and a few named modules) train.

    theta trains   if it lives in blocks[L-k], ..., blocks[L-1], or in a module named in trainable_modules
    theta frozen   otherwise (its gradient is never computed, and it has no optimizer state)

Lee et al. 2019, "What Would Elsa Do? Freezing Layers During Transformer Fine-Tuning",
arXiv:1911.03090: fine-tuning only the top quarter of BERT's layers keeps about 90% of the quality
of full fine-tuning. The upper blocks are the most task-specific; the lower ones the most reusable.

The blocks are found without knowing the architecture: the largest nn.ModuleList of the model
(`model.layers` in Llama, `transformer.h` in GPT-2). `trainable_modules` matches module names like
`method.target_modules` does (full name or dotted suffix), e.g. [norm, lm_head]; a head tied to
the input embeddings trains the embeddings too.

Artifact (tunesmith's own format): the trained tensors only, under the model's own keys.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from tunesmith.config import MethodConfig
from tunesmith.errors import UserError
from tunesmith.files import load_state_strict, read_safetensors
from tunesmith.methods.artifact import WEIGHTS_NAME, read_artifact_config, write_artifact
from tunesmith.methods.registry import Method


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(name, list) of the transformer blocks: the longest nn.ModuleList, the one with most parameters on ties."""
    lists = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    if not lists:
        raise UserError("This model has no nn.ModuleList of blocks, so method.name=freeze cannot find its layers.")
    return max(lists, key=lambda nm: (len(nm[1]), sum(p.numel() for p in nm[1].parameters())))


def apply_freeze(model: nn.Module, cfg: MethodConfig) -> list[str]:
    """Freeze everything, then unfreeze the last `trainable_blocks` blocks and `trainable_modules`."""
    from tunesmith.methods.inject import _matches

    list_name, blocks = find_blocks(model)
    k = cfg.trainable_blocks
    if k > len(blocks):
        raise UserError(f"method.trainable_blocks={k} but {list_name} has only {len(blocks)} blocks.")
    names = [f"{list_name}.{i}" for i in range(len(blocks) - k, len(blocks))]
    modules = [(n, m) for n, m in model.named_modules() if n]
    for wanted in cfg.trainable_modules:
        found = [n for n, _ in modules if _matches(n, [wanted])]
        if not found:
            top = ", ".join(n for n, _ in modules if n.count(".") <= 1)
            raise UserError(f"method.trainable_modules entry {wanted!r} matches no module; top-level modules: {top}.")
        names += [n for n in found if n not in names]
    if not names:
        raise UserError("method.name=freeze with trainable_blocks=0 and no trainable_modules trains nothing.")
    for p in model.parameters():
        p.requires_grad_(False)
    by_name = dict(modules)
    for name in names:
        for p in by_name[name].parameters():
            p.requires_grad_(True)
    return names


def save_freeze(model: nn.Module, out_dir: Path, cfg: MethodConfig, base_model_name_or_path: str) -> None:
    trained = {n: p for n, p in model.named_parameters() if p.requires_grad}
    settings = {"trainable_blocks": cfg.trainable_blocks, "trainable_modules": list(cfg.trainable_modules)}
    write_artifact(out_dir, "freeze", base_model_name_or_path, settings, trained)


def load_freeze(model: nn.Module, folder: Path) -> MethodConfig:
    meta = read_artifact_config(folder, "freeze")
    cfg = MethodConfig(name="freeze", trainable_blocks=meta["trainable_blocks"],
                       trainable_modules=meta["trainable_modules"])
    apply_freeze(model, cfg)
    path = Path(folder) / WEIGHTS_NAME
    # Only the trained tensors were saved: nothing is required, but every tensor must be the model's.
    load_state_strict(model, read_safetensors(path, "the weights of a freeze artifact"), path, required=())
    return cfg


def describe_freeze(cfg) -> str:
    return f"last {cfg.trainable_blocks} blocks" + (f", {cfg.trainable_modules}" if cfg.trainable_modules else "")


# Trains W itself: the trained blocks are the artifact (merge returns the model as it is); no base to switch back to.
METHOD = Method(
    name="freeze",
    apply=apply_freeze, save=save_freeze, load=load_freeze, describe=describe_freeze,
    merge=lambda model: model, disable=None,
    not_on_quantized_base="it trains the weights of whole blocks, and packed 4/8-bit weights have no gradient",
)
