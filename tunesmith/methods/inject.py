"""Putting adapters into a model and taking them out again.

Injection is one walk: find the target nn.Linear modules by name, freeze the whole model,
swap each target for a LoRALinear that owns the target's weight. Targets are chosen like
PEFT chooses them:

    "all-linear"         every nn.Linear except the output head (model.get_output_embeddings()
                         and anything called lm_head); the head is adapted only when named
    ["q_proj", "v_proj"] a module matches if its full dotted name equals an entry or ends
                         with "." + entry
    "regex"              any other string, re.fullmatch'ed against full module names

Plain LoRA also adapts an nn.Embedding that a list or regex names (e.g. BERT's "word_embeddings", a causal LM's
"embed_tokens"), as PEFT does: it becomes a LoRAEmbedding (lora_embedding.py). "all-linear" never includes one.
An embedding whose table is tied to another layer (the output head of most small causal LMs) is refused: the
update would reach the input side only and could never be merged.
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from typing import Iterator

from torch import nn

from tunesmith.config import MethodConfig
from tunesmith.errors import UserError
from tunesmith.methods.lora import LoRALinear
from tunesmith.methods.lora_embedding import LoRAEmbedding
from tunesmith.methods.weight_delta import WeightDeltaLinear


def adapter_modules(model: nn.Module) -> Iterator[tuple[str, LoRALinear | LoRAEmbedding]]:
    """(name, module) for every LoRA layer in the model, in module order: LoRALinear (or a subclass: LoRA-FA, DoRA,
    Delta-LoRA) and LoRAEmbedding."""
    for name, module in model.named_modules():
        if isinstance(module, (LoRALinear, LoRAEmbedding)):
            yield name, module


def _foldable_modules(model: nn.Module) -> Iterator[tuple[str, WeightDeltaLinear | LoRAEmbedding]]:
    """What merging folds into weights: the weight-delta adapters and the embedding adapters."""
    for name, module in model.named_modules():
        if isinstance(module, (WeightDeltaLinear, LoRAEmbedding)):
            yield name, module


def weight_delta_modules(model: nn.Module) -> Iterator[tuple[str, WeightDeltaLinear]]:
    """(name, module) for every adapter whose update folds into its weight (weight_delta.py: `weight`,
    `delta_weight()`, `merge()`, `unmerge()`, `to_linear()`; the LoRA family and VeRA)."""
    for name, module in model.named_modules():
        if isinstance(module, WeightDeltaLinear):
            yield name, module


def _candidate_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every named module except the insides of existing adapters (their lora_A/lora_B)."""
    inner = {id(m) for _, a in adapter_modules(model) for m in a.modules() if m is not a}
    return [(n, m) for n, m in model.named_modules() if n and id(m) not in inner]


def _matches(name: str, target_modules: str | list[str]) -> bool:
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return any(name == t or name.endswith("." + t) for t in target_modules)


def find_targets(model: nn.Module, target_modules: str | list[str], embeddings: bool = False) -> list[str]:
    """Full dotted names of the linear modules selected by `target_modules` (see module docstring), and of the
    nn.Embedding modules it names when `embeddings` (plain LoRA)."""
    candidates = _candidate_modules(model)
    linear_names = [n for n, m in candidates if isinstance(m, nn.Linear)]
    if target_modules == "all-linear":
        get_head = getattr(model, "get_output_embeddings", None)
        head = get_head() if callable(get_head) else None
        names = [n for n, m in candidates
                 if isinstance(m, nn.Linear) and m is not head and n.split(".")[-1] != "lm_head"]
    else:
        if isinstance(target_modules, str):
            try:
                re.compile(target_modules)
            except re.error as e:
                raise UserError(f"method.target_modules {target_modules!r} is not a valid regex: {e}.") from None
        matched = [(n, m) for n, m in candidates if _matches(n, target_modules)]
        kinds = (nn.Linear, nn.Embedding) if embeddings else nn.Linear
        wrong = [f"{n} ({type(m).__name__})" for n, m in matched if not isinstance(m, kinds)]
        if wrong:
            what = ("nn.Linear and nn.Embedding modules" if embeddings else
                    "nn.Linear modules only (plain method.name=lora also adapts nn.Embedding)")
            raise UserError(f"method.target_modules {target_modules!r} matches modules that are not linear "
                            f"layers: {', '.join(wrong[:5])}. This method adapts {what}, "
                            f"e.g. {_examples(linear_names)}.")
        names = [n for n, _ in matched]
    if not names:
        hint = " (a single string is a regex over full names; use a list for suffixes)" \
            if isinstance(target_modules, str) else ""
        raise UserError(f"method.target_modules {target_modules!r} matches no linear layer of this model{hint}. "
                        f"Linear layers here include: {_examples(linear_names)}.")
    return names


def _examples(names: list[str], k: int = 8) -> str:
    """'q_proj, k_proj, ... (full names like model.layers.0.self_attn.q_proj)'."""
    if not names:
        return "(none)"
    suffixes = list(dict.fromkeys(n.split(".")[-1] for n in names))  # unique, in order
    return f"{', '.join(suffixes[:k])} (full names like {names[0]})"


def apply_lora(model: nn.Module, cfg: MethodConfig, layer: type[LoRALinear] = LoRALinear) -> list[str]:
    """Freeze every parameter, then wrap each target in `layer` (LoRALinear or a subclass with the
    same constructor: LoRA-FA, DoRA, Delta-LoRA). Plain LoRA wraps a named nn.Embedding in a LoRAEmbedding.
    Returns the adapted names."""
    if any(True for _ in _foldable_modules(model)):
        raise UserError("This model already has adapters; load or apply adapters on a fresh base model.")
    names = find_targets(model, cfg.target_modules, embeddings=layer is LoRALinear)
    modules = dict(model.named_modules())
    for name in names:
        if isinstance(modules[name], nn.Embedding):
            _check_embedding_adaptable(model, name, modules[name])
    # where each target hangs: module -> (parent module, attribute name), found by reference
    parents = {id(child): (parent, attr) for parent in model.modules() for attr, child in parent.named_children()}
    for p in model.parameters():
        p.requires_grad_(False)
    for name in names:
        base = modules[name]
        parent, attr = parents[id(base)]
        if isinstance(base, nn.Embedding):
            setattr(parent, attr, LoRAEmbedding(base, cfg.r, cfg.alpha, cfg.rslora))
        else:
            setattr(parent, attr, layer(base, cfg.r, cfg.alpha, cfg.dropout, cfg.rslora))
    return names


def _check_embedding_adaptable(model: nn.Module, name: str, module: nn.Embedding) -> None:
    """A plain nn.Embedding whose table no other layer shares (see the module docstring)."""
    if type(module) is not nn.Embedding:
        raise UserError(f"method.target_modules names {name!r}, a {type(module).__name__}: LoRA adapts plain "
                        "nn.Embedding tables only (a subclass may scale or change its lookup). Leave it out of "
                        "method.target_modules.")
    shared = [n for n, p in model.named_parameters(remove_duplicate=False)
              if p is module.weight and not n.startswith(name + ".")]
    if shared:
        raise UserError(f"method.target_modules names {name!r}, whose table is tied to {shared[0]!r} (input and "
                        "output embeddings share one matrix). A LoRA update of the embeddings would change the input "
                        "side only and could not be merged. Leave the embeddings out of method.target_modules, or "
                        "untie them (config tie_word_embeddings=false) first.")


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total); shared (tied) weights are counted once, packed 4-bit weights by their (out, in)."""
    params = list(model.parameters())  # parameters() already skips duplicates
    state = lambda p: getattr(p, "quant_state", None)  # a bitsandbytes Params4bit packs two weights per byte
    numel = lambda p: state(p).shape.numel() if state(p) is not None else p.numel()
    return sum(numel(p) for p in params if p.requires_grad), sum(numel(p) for p in params)


def _check_not_shared(model: nn.Module) -> None:
    """Merging writes into the weight in place; a weight tied to another module would change it too."""
    seen: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        seen[id(p)] = seen.get(id(p), 0) + 1
    for name, a in _foldable_modules(model):
        if seen[id(a.weight)] > 1:
            raise UserError(f"Cannot merge the adapter on {name!r}: its weight is tied to another layer "
                            "(e.g. the input embeddings), which merging would change too.")


def merge_adapters(model: nn.Module) -> None:
    _check_not_shared(model)
    for _, a in _foldable_modules(model):
        a.merge()


def unmerge_adapters(model: nn.Module) -> None:
    for _, a in _foldable_modules(model):
        a.unmerge()


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Replace every adapter by a plain nn.Linear holding its merged weight (W0 + s B A for LoRA), and every
    embedding adapter by a plain nn.Embedding (E0 + s (B A)^T); drop shared adapter state hung on the model
    (`remove_on_unload`, e.g. VeRA's projections). Returns the same model."""
    _check_not_shared(model)
    parents = {id(child): (parent, attr) for parent in model.modules() for attr, child in parent.named_children()}
    for _, a in list(_foldable_modules(model)):
        parent, attr = parents[id(a)]
        setattr(parent, attr, a.to_embedding() if isinstance(a, LoRAEmbedding) else a.to_linear())
    for parent in list(model.modules()):
        for attr, child in list(parent.named_children()):
            if getattr(child, "remove_on_unload", False):
                delattr(parent, attr)
    return model


@contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Run the base model (e.g. DPO's reference) with every adapter off; restores each flag after.
    Every module with a boolean `disabled` switch counts (LoRA family, VeRA, bottleneck adapters)."""
    adapters = [m for m in model.modules() if isinstance(getattr(m, "disabled", None), bool)]
    before = [a.disabled for a in adapters]
    for a in adapters:
        a.disabled = True
    try:
        yield model
    finally:
        for a, flag in zip(adapters, before):
            a.disabled = flag
