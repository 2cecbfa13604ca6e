"""TIES: trim, elect sign, disjoint merge.

    tau_i = W_i - W_0
    trim:   keep the k = floor(density * n) entries of tau_i with the largest |.| (at least one), zero the rest
    elect:  s = sign(sum_i w_i trim(tau_i))                         (per entry; 0 counts as +)
    merge:  W = W_0 + lambda * sum_i m_i w_i trim(tau_i) / sum_i m_i w_i,   m_i = [sign(w_i trim(tau_i)) = s]

Yadav et al. 2023, "TIES-Merging: Resolving Interference When Merging Models", arXiv:2306.01708,
Section 3 and Algorithm 1. With all w_i = 1 the divisor is the paper's count of agreeing models
(its "disjoint mean"); normalize: false sums instead.

Where mergekit and the paper differ: a recipe without `density` keeps every entry in mergekit
(density 1: sign election only), while the paper trims to the top 20% (k = 20, Section 6).
`variant: paper` uses 0.2 when no density is given; an explicit density is used as written.
"""

from __future__ import annotations

import torch

from tunesmith.merge.registry import MergeMethod, Param
from tunesmith.merge.task_arithmetic import gta_params, rescaled, task_arithmetic_frame

PAPER_DENSITY = 0.2  # k = 20%, TIES Section 6 ("we keep the top-20% values")


def magnitude(delta: torch.Tensor, density: float, rescale: bool) -> torch.Tensor:
    """Keep the round-down density * n entries of largest magnitude (at least 1), mergekit's `magnitude`."""
    if density >= 1:
        return delta
    if density <= 0 or delta.numel() == 0:
        return torch.zeros_like(delta)
    k = max(1, int(density * delta.numel()))
    mask = torch.zeros(delta.numel(), dtype=delta.dtype, device=delta.device)
    magnitudes = delta.abs().reshape(-1)
    if magnitudes.device.type == "cpu":
        magnitudes = magnitudes.float()
    mask[torch.argsort(magnitudes, descending=True)[:k]] = 1
    return rescaled(delta, mask.reshape_as(delta), rescale)


def density_of(params: dict, shared: dict) -> float:
    """The model's density; unset: 1 (mergekit) or the paper's 0.2 (variant: paper)."""
    if params["density"] is not None:
        return params["density"]
    return PAPER_DENSITY if shared["variant"] == "paper" else 1.0


def trim(delta, params, shared):
    return magnitude(delta, density_of(params, shared), shared["rescale"])


def ties(base, tensors, shared, per_model):
    return task_arithmetic_frame(base, tensors, shared, per_model, sparsify=trim, consensus=True)


TIES = MergeMethod(
    name="ties", merge=ties, base="required",
    params=gta_params(normalize=True, rescale=False, density=Param(float, None, per_model=True)),
    paper="arXiv:2306.01708",
)
