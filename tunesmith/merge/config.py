"""The merge recipe: mergekit's YAML (`mergekit-yaml` configs), for the methods tunesmith implements.

    models:                          # the inputs, in order
      - model: path/to/finetune-a    # a model folder, a .gguf file, a built-in name, an adapter folder,
        parameters:                  #   or "BASE+ADAPTER" (mergekit's LoRA syntax)
          weight: 0.7                # a scalar ...
          density: [0.3, 0.7]        # ... or a gradient: interpolated over the layers
      - model: path/to/finetune-b
        parameters:
          weight:
            - filter: self_attn      # per-tensor: the first filter that is a substring of the tensor name
              value: 0.2
            - value: 0.5             # no filter (or "*"): every other tensor
    base_model: path/to/base
    merge_method: ties
    parameters: {normalize: true}    # global: shared parameters, and defaults for the per-model ones
    dtype: float32                   # inputs are cast to this before merging
    out_dtype: bfloat16              # the saved tensors and config.json's dtype
    tokenizer_source: base           # or a model; `tokenizer: {source: ...}` says the same
    chat_template: auto              # auto | chatml | a Jinja template

A gradient [v0, ..., vk] gives layer i of L the value at t = i / (L - 1) of the piecewise-linear
curve through the vk at equal spacing (t = 1 when L = 1); tensors outside the layers (embeddings,
final norm, head) take t = 0, as mergekit plans them. A per-model value wins over the global one;
a filter list that matches nothing falls through to the next source.

What mergekit accepts but tunesmith does not merge (slices, modules, tokenizer unions, added
tokens, methods outside registry.py) is a UserError naming the key.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, TypeAdapter, ValidationError

from tunesmith.errors import UserError

Scalar = Union[bool, int, float, str]
ScalarOrGradient = Union[Scalar, list[Scalar]]
DTYPES = ("float32", "float16", "bfloat16", "float64")


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Conditional(Strict):
    """One entry of a per-tensor filter list."""

    value: ScalarOrGradient
    filter: str | None = None


Setting = Union[Conditional, list[Conditional], ScalarOrGradient]


class InputModel(Strict):
    model: str
    parameters: dict[str, Setting] | None = None


class TokenizerChoice(Strict):
    source: str = "base"
    tokens: dict[str, Any] | None = None
    pad_to_multiple_of: int | None = None


class Recipe(Strict):
    """A mergekit configuration, limited to what tunesmith merges (see the module docstring)."""

    models: list[InputModel]
    merge_method: str
    base_model: str | None = None
    parameters: dict[str, Setting] | None = None
    dtype: Literal[DTYPES] | None = None
    out_dtype: Literal[DTYPES] | None = None
    tokenizer_source: str | None = None
    tokenizer: TokenizerChoice | None = None
    chat_template: str | None = None
    # tunesmith's own: `output: adapter` merges LoRA adapters into one adapter (merge/adapters.py), exactly or
    # truncated by SVD to `rank`
    output: Literal["model", "adapter"] | None = None  # unset: model
    rank: int | None = None

    def tokenizer_donor(self) -> str | None:
        """'base', a model reference, or None (the donor model's own tokenizer files)."""
        if self.tokenizer is not None:
            return self.tokenizer.source
        return self.tokenizer_source


UNSUPPORTED = {
    "slices": "layer slices (passthrough / frankenmerges) are not a merge method tunesmith implements; list whole "
              "models under `models:`",
    "modules": "per-module recipes are for multi-module architectures; list whole models under `models:`",
}


def read_recipe(path: str | Path) -> Recipe:
    """Parse and check a recipe file; every problem is a UserError naming the file and the key."""
    from tunesmith.files import read_yaml

    tree = read_yaml(path)
    return parse_recipe(tree, str(path))


def parse_recipe(tree: dict, where: str = "the merge config") -> Recipe:
    for key, why in UNSUPPORTED.items():
        if key in tree:
            raise UserError(f"{where}: `{key}:` is not supported by tunesmith merge ({why}).")
    try:
        recipe = Recipe.model_validate(tree)
    except ValidationError as e:
        raise UserError(_describe(e, where)) from None
    _check_tokenizer(recipe, where)
    if recipe.chat_template is not None and not _is_template_choice(recipe.chat_template):
        raise UserError(f"{where}: chat_template={recipe.chat_template!r} is not auto, chatml, or a Jinja template "
                        "(a string with '{'); tunesmith ships only the chatml named template.")
    if not recipe.models:
        raise UserError(f"{where}: `models:` is empty; list the models to merge.")
    if recipe.rank is not None and recipe.output != "adapter":
        raise UserError(f"{where}: `rank:` applies to `output: adapter` only (an adapter merge truncated by SVD).")
    return recipe


def _check_tokenizer(recipe: Recipe, where: str) -> None:
    if recipe.tokenizer is not None and recipe.tokenizer_source is not None:
        raise UserError(f"{where}: give either tokenizer_source or tokenizer, not both (as mergekit).")
    if recipe.tokenizer is not None:
        if recipe.tokenizer.tokens:
            raise UserError(f"{where}: tokenizer.tokens (adding or re-sourcing token embeddings) is not supported; "
                            "merge models that share a vocabulary and add tokens afterwards.")
        if recipe.tokenizer.pad_to_multiple_of:
            raise UserError(f"{where}: tokenizer.pad_to_multiple_of is not supported (the vocabulary is kept as is).")
    if recipe.tokenizer_donor() == "union":
        raise UserError(f"{where}: tokenizer source `union` (a merged vocabulary) is not supported; use `base` or a "
                        "model whose vocabulary every input shares.")


def _is_template_choice(value: str) -> bool:
    return value in ("auto", "chatml") or "{" in value


def _describe(error: ValidationError, where: str) -> str:
    lines = [f"Invalid merge config {where}:"]
    for item in error.errors():
        key = ".".join(str(p) for p in item["loc"]) or "(top level)"
        if item["type"] == "extra_forbidden":
            lines.append(f"  - unknown or unsupported key `{key}`")
        elif item["type"] == "missing":
            lines.append(f"  - `{key}` is required")
        else:
            lines.append(f"  - `{key}`: {item['msg']} (got {item.get('input')!r})")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Settings: filters and gradients


def evaluate_setting(setting: Setting, tensor_name: str, t: float, kind: type) -> Any:
    """The value of one setting for one tensor at layer position t in [0, 1]; None when no filter matches.

    A numeric gradient [v0..vk] interpolates linearly: with s = t k, i = floor(s),
    value = (1 - (s - i)) v_i + (s - i) v_{i+1}. A gradient of booleans or strings picks v_floor(t k)."""
    if isinstance(setting, Conditional):
        setting = [setting]
    if isinstance(setting, list) and setting and isinstance(setting[0], Conditional):
        for cond in setting:
            if cond.filter in (None, "*") or (tensor_name and cond.filter in tensor_name):
                return evaluate_setting(cond.value, tensor_name, t, kind)
        return None
    if isinstance(setting, list):
        if not setting:
            return None
        values = [coerce(v, kind) for v in setting]
        if kind is bool or kind is str:
            return values[int(t * (len(values) - 1))]
        scaled = t * (len(values) - 1)
        i0 = int(scaled)
        i1 = min(len(values) - 1, i0 + 1)
        frac = scaled - i0
        return coerce((1 - frac) * values[i0] + frac * values[i1], kind)
    return coerce(setting, kind)


def coerce(value: Any, kind: type) -> Any:
    """A YAML scalar as the parameter's type (pydantic's lax rules, as mergekit validates)."""
    try:
        return type_adapter(kind).validate_python(value)
    except ValidationError:
        raise UserError(f"merge parameter value {value!r} is not a {kind.__name__}.") from None


@functools.cache
def type_adapter(kind: type) -> TypeAdapter:
    """Built once per type: building one took 0.1 ms, a merge of the default model coerces about 800 values."""
    return TypeAdapter(kind)


def layer_position(layer: int | None, num_layers: int) -> float:
    """t for gradients: i / (L - 1) inside the layer stack (1 when L = 1), 0 outside it."""
    if layer is None:
        return 0.0
    return layer / (num_layers - 1) if num_layers > 1 else 1.0
