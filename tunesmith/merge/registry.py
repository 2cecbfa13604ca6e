"""Merge methods by name: what each takes (parameters, base model, inputs) and the function that merges.

A method merges one tensor at a time: merge(base, tensors, shared, per_model) -> tensor, where
`base` is the base model's tensor (None for methods without one), `tensors` the other inputs' in
the recipe's order, `shared` the method-wide parameters and `per_model[i]` those of tensors[i].
The names, parameters and defaults are mergekit's (0.1.5), so its recipes run unchanged; `variant`
is tunesmith's own switch between mergekit's numbers and the paper's where the two differ.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable, Literal

from tunesmith.errors import UserError

REQUIRED = object()


@dataclass(frozen=True)
class Param:
    kind: type
    default: Any = REQUIRED
    per_model: bool = False  # per input (set under each model, or globally as everyone's default)
    choices: tuple | None = None


@dataclass(frozen=True)
class MergeMethod:
    name: str
    merge: Callable
    params: dict[str, Param]
    base: Literal["required", "none"]  # none: the base model, when listed, is one more input
    min_inputs: int = 1  # counting the base
    max_inputs: int | None = None
    paper: str = ""
    random: bool = False  # draws from torch's RNG (seeded by --random-seed)
    # How run.py streams a tensor (docs/merging.md, Memory): elementwise methods merge row chunks of the inputs
    # as they are (each output row depends on the same rows only); a task-arithmetic-frame method with an
    # in-place sparsifier sparsify_(delta, params, shared) runs task_arithmetic.frame_stream; others get whole tensors.
    elementwise: bool = False
    sparsify_: Callable | None = None
    consensus: bool = False  # with sparsify_: TIES' sign election

    def shared(self) -> dict[str, Param]:
        return {k: p for k, p in self.params.items() if not p.per_model}

    def per_model(self) -> dict[str, Param]:
        return {k: p for k, p in self.params.items() if p.per_model}


# name -> (module, attribute)
METHODS = {
    "linear": ("tunesmith.merge.linear", "LINEAR"),
    "task_arithmetic": ("tunesmith.merge.task_arithmetic", "TASK_ARITHMETIC"),
    "ties": ("tunesmith.merge.ties", "TIES"),
    "dare_linear": ("tunesmith.merge.dare", "DARE_LINEAR"),
    "dare_ties": ("tunesmith.merge.dare", "DARE_TIES"),
    "breadcrumbs": ("tunesmith.merge.breadcrumbs", "BREADCRUMBS"),
    "breadcrumbs_ties": ("tunesmith.merge.breadcrumbs", "BREADCRUMBS_TIES"),
    "della": ("tunesmith.merge.della", "DELLA"),
    "della_linear": ("tunesmith.merge.della", "DELLA_LINEAR"),
    "slerp": ("tunesmith.merge.slerp", "SLERP"),
    "model_stock": ("tunesmith.merge.model_stock", "MODEL_STOCK"),
}


def get_merge_method(name: str) -> MergeMethod:
    if name not in METHODS:
        raise UserError(f"merge_method={name!r} is not supported by tunesmith merge; supported: "
                        f"{', '.join(METHODS)}.")
    module, attr = METHODS[name]
    return getattr(importlib.import_module(module), attr)
