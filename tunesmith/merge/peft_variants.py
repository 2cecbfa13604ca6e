"""PEFT's add_weighted_adapter variants (`variant: peft`): A and B factors combined separately.

peft 0.21's LoraModel.add_weighted_adapter with combination_type linear, ties, dare_linear or
dare_ties does not merge the weight changes s_i B_i A_i. Per layer it splits each weight between the
two factors, a_i = sign(w_i s_i) sqrt(|w_i s_i|) on A and b_i = sqrt(|w_i s_i|) on B, and runs the
merge on the A's and on the B's on their own (peft/utils/merge_utils.py):

    A = f([A_1, A_2, ...], [a_1, a_2, ...]),   B = f([B_1, B_2, ...], [b_1, b_2, ...]),   r = alpha = r_i
    linear:       f = sum_i a_i A_i                                  (no normalization)
    ties:         trim each to its top int(density n) by |.|, elect s = sign(sum_i trim(A_i)) (unweighted),
                  f = sum_i [sign trim(A_i) = s] a_i trim(A_i) / max(1, #agreeing)
    dare_linear:  A_i' = A_i M_i / density, M_i ~ Bernoulli(density), f = sum_i a_i A_i'
    dare_ties:    A_i' as dare_linear, then ties' election and disjoint mean (no trim)

so for linear B A = sum_i sum_j b_i a_j B_i A_j = sum_i w_i s_i B_i A_i + sum_{i != j} b_i a_j B_i A_j:
the cross terms B_i A_j (i != j) are a change no input made; tunesmith's default merges the full
changes instead (merge/adapters.py). The ranks must agree, as in peft. The Bernoulli masks are drawn
in peft's order, layers in the model's module order, for each layer all A's then all B's, from the
global RNG seeded with the merge seed. DoRA and VeRA inputs are refused: peft combines LoRA
factors only (a DoRA adapter it writes keeps a freshly initialized magnitude).
"""

from __future__ import annotations

import math

import torch

from tunesmith.errors import UserError

PEFT_METHODS = ("linear", "ties", "dare_linear", "dare_ties")


def split_weights(weight: float, scale: float) -> tuple[float, float]:
    """(a_i, b_i): sqrt(|w s|) on both factors, the sign on A."""
    ws = weight * scale
    root = math.sqrt(abs(ws))
    return (root if ws >= 0 else -root), root


def prune(t: torch.Tensor, density: float, how: str) -> torch.Tensor:
    """peft's prune: density >= 1 keeps everything (no draw); magnitude keeps the top int(density n) by |.|;
    random keeps each entry with probability density and divides by it."""
    if density >= 1:
        return t
    if density < 0:
        raise UserError(f"density={density} must be >= 0.")
    if how == "magnitude":
        mask = torch.zeros_like(t).reshape(-1)
        mask[torch.topk(t.abs().reshape(-1), k=int(density * t.numel()), largest=True)[1]] = 1
        return t * mask.reshape(t.shape)
    return t * torch.bernoulli(torch.full_like(t, density)) / density


def combine(method: str, tensors: list[torch.Tensor], weights: list[float], density: float) -> torch.Tensor:
    """f of the module docstring on one factor's list ((r, in) A's or (out, r) B's)."""
    w = torch.tensor(weights, dtype=tensors[0].dtype).view(-1, 1, 1)
    if method == "linear":
        return (torch.stack(tensors) * w).sum(dim=0)
    how = "magnitude" if method == "ties" else "random"
    stacked = torch.stack([prune(t, density, how) for t in tensors])  # (n, rows, cols)
    if method == "dare_linear":
        return (stacked * w).sum(dim=0)
    sign = stacked.sign()
    agree = sign == torch.where(stacked.sum(dim=0) >= 0, 1, -1)  # peft's "total" majority sign
    return (stacked * w * agree).sum(dim=0) / torch.clamp(agree.sum(dim=0), min=1.0)


def peft_factors(inputs, weights: list[float], method: str, density: float | None, order: list[str] | None):
    """{layer: (A, B)} as add_weighted_adapter(combination_type=method) writes them, layers in peft's order."""
    if method not in PEFT_METHODS:
        raise UserError(f"variant: peft reproduces peft's add_weighted_adapter for {', '.join(PEFT_METHODS)}; "
                        f"{method} is not one of them.")
    kinds = {x.kind for x in inputs} - {"lora"}
    if kinds:
        raise UserError(f"variant: peft takes LoRA and rsLoRA adapters only, not {', '.join(sorted(kinds))}: peft's "
                        "add_weighted_adapter combines LoRA factors (a DoRA adapter it writes keeps a freshly "
                        "initialized magnitude, and VeRA has no per-layer A and B). Use the default variant.")
    if len({x.r for x in inputs}) != 1:
        raise UserError(f"variant: peft needs adapters of one rank (peft's rule for {method}); they have ranks "
                        f"{', '.join(str(x.r) for x in inputs)}.")
    if len(inputs) == 1:
        method = "linear"  # peft: one adapter is always a linear combination
    if method != "linear" and density is None:
        raise UserError(f"variant: peft with {method} needs a density (peft has no default for it).")
    names = {n for x in inputs for n in x.layers}
    rank = {n: i for i, n in enumerate(order or [])}
    out = {}
    for name in sorted(names, key=lambda n: (rank.get(n, len(rank)), n)):
        present = [(x, w) for x, w in zip(inputs, weights) if name in x.layers]
        split = [split_weights(w, x.scale) for x, w in present]
        a = combine(method, [x.layers[name][0] for x, _ in present], [s[0] for s in split], density)
        b = combine(method, [x.layers[name][1] for x, _ in present], [s[1] for s in split], density)
        out[name] = (a.contiguous(), b.contiguous())
    return out
