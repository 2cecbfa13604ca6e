"""DELLA: magnitude-based random pruning (MagPrune), then TIES' sign election (della) or a sum (della_linear).

    tau_i = W_i - W_0; per row (a 1-d tensor is one row), rank entries by |.| ascending, r = 1..n
    keep probability: p = (density - epsilon) + 2 epsilon (r - r_min) / (r_max - r_min)
                      (from density - epsilon for the smallest to density + epsilon for the largest)
    mask:     M ~ Bernoulli(p) per entry
    rescale:  paper:    tau_i' = M * tau_i / p                      (each kept entry by its own 1 / p)
              mergekit: tau_i' = M * tau_i * ||tau_i||_1 / ||M * tau_i||_1
    merge:    della: TIES' elect + disjoint merge (normalize); della_linear: W_0 + lambda sum_i w_i tau_i'

Deep et al. 2024, "DELLA-Merging: Reducing Interference in Model Merging through Magnitude-Based
Sampling", arXiv:2406.11617, Section 3 (MagPrune, Eq. 1-3: rank-linear drop probabilities and
rescaling by 1 / (1 - p_drop)). `variant: paper` gives that per-entry rescaling; mergekit's L1
rescaling is the default. density +- epsilon must lie in (0, 1). The mask is drawn as mergekit
draws it, so the same --random-seed gives the same merge.
"""

from __future__ import annotations

import torch

from tunesmith.errors import UserError
from tunesmith.merge.dare import work_dtype
from tunesmith.merge.registry import MergeMethod, Param
from tunesmith.merge.task_arithmetic import gta_params, rescaled, task_arithmetic_frame


def magprune(delta: torch.Tensor, density: float, epsilon: float, rescale: bool, variant: str) -> torch.Tensor:
    if density >= 1:
        return delta
    if density <= 0:
        return torch.zeros_like(delta)
    if density + epsilon >= 1 or density - epsilon <= 0:
        raise UserError(f"della: epsilon={epsilon} with density={density} puts a keep probability outside (0, 1); "
                        "choose epsilon < min(density, 1 - density).")
    shape, dtype = delta.shape, work_dtype(delta)
    rows = delta.unsqueeze(0) if delta.dim() < 2 else delta  # (rows, n)
    ranks = torch.argsort(rows.abs(), dim=1, descending=False).argsort(dim=1).to(dtype) + 1  # 1..n per row
    n = rows.shape[1]
    # (r - r_min) / (r_max - r_min) with r_min = 1, r_max = n exactly (ranks are a permutation): the same floats
    rank_norm = ((ranks - 1) / (n - 1)).clamp(0, 1) if n > 1 else torch.zeros_like(ranks)
    probs = (density - epsilon) + rank_norm * 2 * epsilon
    mask = torch.bernoulli(probs).to(dtype)
    if variant == "paper":
        kept = rows.to(dtype) * mask
        result = kept / probs if rescale else kept
    else:
        result = rescaled(rows.to(dtype), mask, rescale)
    return result.to(delta.dtype).reshape(shape)


def prune(delta, params, shared):
    return magprune(delta, params["density"], params["epsilon"], shared["rescale"], shared["variant"])


def della(base, tensors, shared, per_model):
    return task_arithmetic_frame(base, tensors, shared, per_model, sparsify=prune, consensus=True)


def della_linear(base, tensors, shared, per_model):
    return task_arithmetic_frame(base, tensors, shared, per_model, sparsify=prune)


_EPSILON = Param(float, 0.15, per_model=True)
DELLA = MergeMethod(name="della", merge=della, base="required", random=True, paper="arXiv:2406.11617",
                    params=gta_params(normalize=True, rescale=True, epsilon=_EPSILON))
DELLA_LINEAR = MergeMethod(name="della_linear", merge=della_linear, base="required", random=True,
                           paper="arXiv:2406.11617", params=gta_params(normalize=False, rescale=True, epsilon=_EPSILON))
