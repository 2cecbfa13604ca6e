"""PEFT's add_weighted_adapter variants (`variant: peft`): what peft 0.21 writes, bit for bit.

peft's LoraModel.add_weighted_adapter with combination_type linear, ties, dare_linear, dare_ties or
magnitude_prune does not merge the weight changes s_i B_i A_i. Per layer it splits each weight between
the two factors, a_i = sign(w_i s_i) sqrt(|w_i s_i|) on A and b_i = sqrt(|w_i s_i|) on B, and runs the
merge on the A's and on the B's on their own (peft/utils/merge_utils.py):

    A = f([A_1, A_2, ...], [a_1, a_2, ...]),   B = f([B_1, B_2, ...], [b_1, b_2, ...]),   r = alpha = r_i
    linear:           f = sum_i a_i A_i                                  (no normalization)
    magnitude_prune:  f = sum_i a_i trim(A_i), trim keeps the top int(density n) entries by |.|
    ties:             elect s = sign(sum_i trim(A_i)) (unweighted; majority_sign_method: frequency
                      counts signs instead), f = sum_i [sign trim(A_i) = s] a_i trim(A_i) / max(1, #agreeing)
    dare_linear:      A_i' = A_i M_i / density, M_i ~ Bernoulli(density), f = sum_i a_i A_i'
    dare_ties:        A_i' as dare_linear, then ties' election and disjoint mean (no trim)

so for linear B A = sum_i sum_j b_i a_j B_i A_j = sum_i w_i s_i B_i A_i + sum_{i != j} b_i a_j B_i A_j:
the cross terms B_i A_j (i != j) are a change no input made; tunesmith's default merges the full
changes instead (merge/adapters.py). The ranks must agree, as in peft.

The other types act on the full changes dW_i = (B_i A_i) s_i:

    cat:     A = [w_1 s_1 A_1; w_2 s_2 A_2; ...],  B = [B_1, B_2, ...]    r = sum_i r_i, exact
    svd, ties_svd, dare_linear_svd, dare_ties_svd, magnitude_prune_svd:
             dW = f([dW_1, dW_2, ...], [w_1, w_2, ...]) with f as above (svd: the weighted sum),
             U S V^T = dW (torch.linalg.svd, full matrices), B = U_r S_r, A = V_r^T,
             r = rank (peft's svd_rank) or max_i r_i; svd_clamp q clips B and A to +-c, c the
             q-quantile of all their entries

The Bernoulli masks are drawn in peft's order, layers in the model's module order, for each layer all
A's then all B's (or the dW's), from the global RNG seeded with the merge seed. DoRA and VeRA inputs
are refused: peft combines LoRA factors only (a DoRA adapter it writes keeps a freshly initialized
magnitude).
"""

from __future__ import annotations

import math

import torch

from tunesmith.errors import UserError

FACTOR_METHODS = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")  # A's and B's apart
SVD_METHODS = ("svd", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd")  # dW, then SVD
PEFT_METHODS = (*FACTOR_METHODS, "cat", *SVD_METHODS)


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


def combine(method: str, tensors: list[torch.Tensor], weights: list[float], density: float,
            sign_method: str = "total") -> torch.Tensor:
    """f of the module docstring on one list: (r, in) A's, (out, r) B's, or (out, in) dW's."""
    w = torch.tensor(weights, dtype=tensors[0].dtype).view(-1, 1, 1)
    if method == "linear":
        return (torch.stack(tensors) * w).sum(dim=0)
    how = "magnitude" if method in ("ties", "magnitude_prune") else "random"
    stacked = torch.stack([prune(t, density, how) for t in tensors])  # (n, rows, cols)
    if method in ("dare_linear", "magnitude_prune"):
        return (stacked * w).sum(dim=0)
    sign = stacked.sign()
    votes = stacked.sum(dim=0) if sign_method == "total" else sign.sum(dim=0)  # peft's majority_sign_method
    agree = sign == torch.where(votes >= 0, 1, -1)
    return (stacked * w * agree).sum(dim=0) / torch.clamp(agree.sum(dim=0), min=1.0)


def peft_cat(present, weights: list[float], rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cat: (A, B) of rank `rank` (the sum over all inputs), the present inputs' rows first, zeros after. The same
    product as adapters.concatenated (the exact merge), but with peft's bits: w_i s_i on A, not on B, and the
    missing inputs' zero blocks last, not in place."""
    a = torch.cat([x_a * w * x.scale for (x, (x_a, _)), w in zip(present, weights)], dim=0)
    b = torch.cat([x_b for _, (_, x_b) in present], dim=1)
    a_out, b_out = a.new_zeros(rank, a.shape[1]), b.new_zeros(b.shape[0], rank)
    a_out[: a.shape[0]], b_out[:, : b.shape[1]] = a, b
    return a_out, b_out


def svd_factors(delta: torch.Tensor, rank: int, clamp: float | None, full_matrices: bool):
    """(A, B) = (V_r^T, U_r S_r) of the merged change, clipped to its clamp-quantile when asked (peft's svd_clamp).
    adapters.truncated is tunesmith's own truncation: in fp64, S split as S^(1/2) on each factor."""
    u, s, vh = torch.linalg.svd(delta, full_matrices=full_matrices)
    b, a = u[:, :rank] @ torch.diag(s[:rank]), vh[:rank, :]
    if clamp is not None:
        high = torch.quantile(torch.cat([b.flatten(), a.flatten()]), clamp)
        b, a = b.clamp(-high, high), a.clamp(-high, high)
    return a, b


def peft_factors(inputs, weights: list[float], method: str, density: float | None, order: list[str] | None,
                 rank: int | None = None, sign_method: str = "total", clamp: float | None = None,
                 full_matrices: bool = True) -> tuple[dict, int]:
    """({layer: (A, B)}, r) as add_weighted_adapter(combination_type=method) writes them, layers in peft's order;
    rank, sign_method, clamp and full_matrices are its svd_rank, majority_sign_method, svd_clamp and
    svd_full_matrices."""
    if method not in PEFT_METHODS:
        raise UserError(f"variant: peft reproduces peft's add_weighted_adapter for {', '.join(PEFT_METHODS)}; "
                        f"{method} is not one of them.")
    kinds = {x.kind for x in inputs} - {"lora"}
    if kinds:
        raise UserError(f"variant: peft takes LoRA and rsLoRA adapters only, not {', '.join(sorted(kinds))}: peft's "
                        "add_weighted_adapter combines LoRA factors (a DoRA adapter it writes keeps a freshly "
                        "initialized magnitude, and VeRA has no per-layer A and B). Use the default variant.")
    if len(inputs) == 1:
        method = "linear"  # peft: one adapter is always a linear combination
    if method in FACTOR_METHODS and len({x.r for x in inputs}) != 1:
        raise UserError(f"variant: peft needs adapters of one rank (peft's rule for {method}); they have ranks "
                        f"{', '.join(str(x.r) for x in inputs)}.")
    if method not in ("linear", "cat", "svd") and density is None:
        raise UserError(f"variant: peft with {method} needs a density (peft has no default for it).")
    if sign_method not in ("total", "frequency"):
        raise UserError(f"majority_sign_method={sign_method!r} must be total or frequency.")
    r = (inputs[0].r if method in FACTOR_METHODS else sum(x.r for x in inputs) if method == "cat"
         else rank or max(x.r for x in inputs))
    names = {n for x in inputs for n in x.layers}
    position = {n: i for i, n in enumerate(order or [])}
    out = {}
    for name in sorted(names, key=lambda n: (position.get(n, len(position)), n)):
        present = [(x, x.layers[name]) for x in inputs if name in x.layers]
        present_weights = [w for x, w in zip(inputs, weights) if name in x.layers]
        if method == "cat":
            out[name] = peft_cat(present, present_weights, r)
        elif method in SVD_METHODS:
            deltas = [(b @ a) * x.scale for x, (a, b) in present]  # peft's get_delta_weight, in its order
            on_deltas = "linear" if method == "svd" else method.removesuffix("_svd")  # svd: peft's task_arithmetic
            merged = combine(on_deltas, deltas, present_weights, density, sign_method)
            out[name] = svd_factors(merged, r, clamp, full_matrices)
        else:
            split = [split_weights(w, x.scale) for (x, _), w in zip(present, present_weights)]
            a = combine(method, [f[0] for _, f in present], [s[0] for s in split], density, sign_method)
            b = combine(method, [f[1] for _, f in present], [s[1] for s in split], density, sign_method)
            out[name] = (a, b)
    return {name: (a.contiguous(), b.contiguous()) for name, (a, b) in out.items()}, r
