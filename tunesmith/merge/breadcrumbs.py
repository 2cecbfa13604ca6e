"""Model breadcrumbs: drop both tails of each task vector, then task arithmetic (or TIES' sign election).

    tau_i = W_i - W_0, n entries, sorted by |.| ascending
    mask:   drop the n_top = floor(gamma n) largest (outliers) and the n_bot = max(0, n - floor(density n) - n_top)
            smallest; keep the floor(density n) entries between them
    merge:  breadcrumbs:      W = W_0 + lambda sum_i w_i (mask_i * tau_i)
            breadcrumbs_ties: TIES' elect + disjoint merge of the masked w_i tau_i

Davari & Belilovsky 2023, "Model Breadcrumbs: Scaling Multi-Task Model Merging with Sparse Masks",
arXiv:2312.06795, Section 3 (the paper's beta = gamma here, its gamma = 1 - density - gamma).
Parameters and defaults are mergekit's (gamma 0.01 per model; density 1 keeps the tensor whole).
"""

from __future__ import annotations

import torch

from tunesmith.merge.registry import MergeMethod, Param
from tunesmith.merge.task_arithmetic import gta_params, rescaled, task_arithmetic_frame


def magnitude_outliers(delta: torch.Tensor, density: float, gamma: float, rescale: bool) -> torch.Tensor:
    if density >= 1:
        return delta
    n = delta.numel()
    keep, n_top = int(density * n), int(gamma * n)
    n_bot = max(0, n - keep - n_top)  # fewer outliers are dropped when density + gamma > 1
    magnitudes = delta.abs().reshape(-1)
    if magnitudes.device.type == "cpu":
        magnitudes = magnitudes.float()
    order = torch.sort(magnitudes, descending=False).indices
    mask = torch.zeros(n, dtype=delta.dtype, device=delta.device)
    mask[order[n_bot:n_bot + keep]] = 1
    return rescaled(delta, mask.reshape_as(delta), rescale)


def crumbs(delta, params, shared):
    return magnitude_outliers(delta, params["density"], params["gamma"], shared["rescale"])


def breadcrumbs(base, tensors, shared, per_model):
    return task_arithmetic_frame(base, tensors, shared, per_model, sparsify=crumbs)


def breadcrumbs_ties(base, tensors, shared, per_model):
    return task_arithmetic_frame(base, tensors, shared, per_model, sparsify=crumbs, consensus=True)


_PARAMS = gta_params(normalize=False, rescale=False, gamma=Param(float, 0.01, per_model=True))
BREADCRUMBS = MergeMethod(name="breadcrumbs", merge=breadcrumbs, base="required", params=_PARAMS,
                          paper="arXiv:2312.06795")
BREADCRUMBS_TIES = MergeMethod(name="breadcrumbs_ties", merge=breadcrumbs_ties, base="required", params=_PARAMS,
                               paper="arXiv:2312.06795")
