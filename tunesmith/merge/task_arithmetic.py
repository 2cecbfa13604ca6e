"""Task arithmetic, and the frame TIES, DARE, breadcrumbs and DELLA share.

Task vectors are the fine-tunes' changes to the base, tau_i = W_i - W_0. Task arithmetic adds them:

    W = W_0 + lambda * sum_i w_i tau_i                                (normalize: false, the default)

Ilharco et al. 2023, "Editing models with task arithmetic", arXiv:2212.04089, Section 2 (the
paper's single scaling coefficient is `lambda`; per-model weights w_i generalise it).

The frame ("generalized task arithmetic", as mergekit calls it) runs, per tensor:
  1. sparsify each tau_i (TIES: keep the largest |.|, DARE: keep at random, breadcrumbs: drop the
     largest and the smallest, DELLA: keep at random with a probability that grows with |.|),
     optionally rescaled (`rescale`);
  2. weight: d_i = w_i tau_i;
  3. with a consensus (TIES): elect a sign per element, s = sign(sum_i d_i) (0 counts as +), and
     keep only the d_i that agree, m_i = [sign(d_i) = s];
  4. merge: D = sum_i m_i d_i; with `normalize`, divide by sum_i m_i w_i elementwise (by sum_i w_i
     without a consensus), so agreeing models are averaged rather than summed; a zero divisor is 1;
  5. W = W_0 + lambda D, cast to the base's dtype.
The order of operations, the fp32 work and the divisor guards are mergekit's, so results match it
to rounding; the random sparsifiers draw from torch's RNG tensor by tensor (names in sorted order,
models in recipe order), as mergekit does under --random-seed.
"""

from __future__ import annotations

import math
from typing import Callable, Iterator

import torch

from tunesmith.merge.registry import MergeMethod, Param

VARIANTS = ("mergekit", "paper")


def task_arithmetic_frame(base: torch.Tensor, tensors: list[torch.Tensor], shared: dict, per_model: list[dict],
                          sparsify: Callable | None = None, consensus: bool = False) -> torch.Tensor:
    """Steps 1-5 of the module docstring for one tensor. sparsify(delta, params, shared) -> delta."""
    if not tensors:
        return base
    deltas = base.new_empty((len(tensors), *base.shape))  # (models, *shape)
    for i, (tensor, params) in enumerate(zip(tensors, per_model)):
        delta = tensor - base
        deltas[i] = sparsify(delta, params, shared) if sparsify is not None else delta
    return combine(base, deltas, shared, per_model, consensus)


def combine(base: torch.Tensor, deltas: torch.Tensor, shared: dict, per_model: list[dict],
            consensus: bool) -> torch.Tensor:
    """Steps 2-5 on the (sparsified) task vectors deltas (models, *shape), weighted in place. Every step is
    elementwise over the positions (sums run over the models only), so rows of base and deltas give those rows
    of the merge, bit for bit: frame_stream merges a tensor chunk by chunk with it."""
    weights = torch.tensor([p["weight"] for p in per_model], dtype=deltas.dtype, device=deltas.device)
    while weights.dim() < deltas.dim():
        weights.unsqueeze_(-1)  # (models, 1, ..., 1)
    if not all(p["weight"] == 1 for p in per_model):  # x * 1.0 is x, bit for bit: a pass saved
        deltas.mul_(weights)
    if consensus:
        mask = sign_agreement(deltas)
        mixed = (deltas * mask).sum(dim=0)
    else:
        mixed = deltas.sum(dim=0)
    if shared["normalize"]:  # the divisor only when it divides (a pass and a masked fill saved otherwise)
        if consensus:
            divisor = (weights * mask).sum(dim=0)
            divisor[divisor == 0] = 1
        else:
            divisor = weights.sum(dim=0)
            divisor[divisor.abs() < 1e-8] = 1
        mixed /= divisor
    if shared["lambda"] != 1:
        mixed *= shared["lambda"]
    return (base + mixed).to(base.dtype)


def frame_stream(read_base: Callable, reads: list[Callable], shape: tuple, dtype: torch.dtype,
                 chunks: list, shared: dict, per_model: list[dict], sparsify_: Callable | None,
                 consensus: bool) -> Iterator[torch.Tensor]:
    """task_arithmetic_frame over row chunks, equal to it bit for bit, yielding the merged rows in order.

    read_base(rows) and reads[i](rows) give those rows of the base and of input i in the work dtype; the task
    vector's rows are read - read_base, recomputed from the files whenever needed. sparsify_(delta_rows, chunks,
    shape, params, shared) looks at the whole task vector (TIES' top-k, DARE's L1 norms are per tensor) and
    returns how to sparsify any rows of it: fn(rows_tensor, rows) in place (a kept-entry mask of one byte an
    entry and a scale: what is held per model), a whole sparsified tensor, or None (unchanged). Then steps 2-5
    (`combine`, elementwise) run chunk by chunk."""
    delta_rows = lambda read: lambda rows: read(rows) - read_base(rows)
    plans = [sparsify_(delta_rows(read), chunks, shape, params, shared) if sparsify_ is not None else None
             for read, params in zip(reads, per_model)]  # in model order: the random masks draw in mergekit's order
    for rows in chunks:
        base = read_base(rows)
        deltas = torch.empty((len(reads), *base.shape), dtype=dtype)  # (models, *rows)
        for i, (read, plan) in enumerate(zip(reads, plans)):
            if isinstance(plan, torch.Tensor):
                deltas[i] = plan if rows is None else plan[rows]
                continue
            torch.sub(read(rows), base, out=deltas[i])
            if plan is not None:
                plan(deltas[i], rows)
        yield combine(base, deltas, shared, per_model, consensus)


def flat_span(rows: slice | None, shape: tuple) -> tuple[int, int]:
    """The flat entries [a, b) of a contiguous tensor of `shape` that rows (a row_chunks slice) cover."""
    if rows is None:
        return 0, math.prod(shape)
    row = math.prod(shape[1:])
    return rows.start * row, rows.stop * row


def mask_plan(delta_rows: Callable, chunks: list, shape: tuple, mask_of: Callable, rescale: bool,
              eps: float = 1e-7) -> Callable:
    """`rescaled(delta, mask, rescale)` as a plan for frame_stream, bit for bit, holding a one-byte mask and a
    scale: mask_of(delta_rows, a, b) gives the mask (0/1 in delta's dtype, or bool) of the flat entries [a, b), called
    once per chunk in order (a random mask draws as one call over the tensor would). The L1 norms are summed
    over the whole tensors, as `rescaled` sums them."""
    whole = None
    if rescale:
        whole = torch.empty(shape, dtype=delta_rows(chunks[0]).dtype)
        for rows in chunks:
            torch.abs(delta_rows(rows), out=whole if rows is None else whole[rows])
        before = whole.sum()  # = delta.abs().sum()
    mask = torch.empty(math.prod(shape), dtype=torch.bool)
    for rows in chunks:
        delta = delta_rows(rows)
        a, b = flat_span(rows, shape)
        m = mask_of(delta, a, b)  # 0/1 in delta's dtype, or bool (delta * True is delta * 1.0, bit for bit)
        mask[a:b] = m.reshape(-1)
        if whole is not None:
            torch.mul(delta, m.reshape(delta.shape), out=whole if rows is None else whole[rows])
    scale = None
    if rescale:
        after = whole.abs_().sum()  # = masked.abs().sum()
        del whole
        if not (before < eps or after < eps):
            scale = before / after

    def apply(x: torch.Tensor, rows) -> None:
        a, b = flat_span(rows, shape)
        x.mul_(mask[a:b].view(x.shape))  # by 1.0 or 0.0, as the float mask multiplied
        if scale is not None:
            x.mul_(scale)
    return apply


def sign_agreement(deltas: torch.Tensor) -> torch.Tensor:
    """TIES' elected sign (arXiv:2306.01708, Section 3, step 2, "elect"): the sign of the summed weighted
    deltas (+ on ties), and per model the mask of the entries that share it (step 3, "disjoint merge")."""
    # sign(d) == (+1 if sum >= 0 else -1), in boolean passes: d > 0 agrees with a sum >= 0, d < 0 with a sum
    # < 0, and d = 0 (sign 0) with neither; a NaN (sign NaN) with nothing
    positive = deltas.sum(dim=0) >= 0
    return ((deltas > 0) == positive) & ((deltas != 0) & ~deltas.isnan())


def rescaled(delta: torch.Tensor, mask: torch.Tensor, rescale: bool, eps: float = 1e-7) -> torch.Tensor:
    """delta * mask, scaled (rescale: true) so that its L1 norm is delta's: mergekit's rescaling of every
    sparsifier. Norms under eps leave the masked delta as it is."""
    masked = delta * mask
    if not rescale:
        return masked
    before, after = delta.abs().sum(), masked.abs().sum()
    if before < eps or after < eps:
        return masked
    return masked * (before / after)


def gta_params(normalize: bool, rescale: bool, **extra: Param) -> dict[str, Param]:
    """mergekit's parameters of every task-arithmetic-frame method, with the method's defaults."""
    return {
        "weight": Param(float, per_model=True),
        "density": Param(float, 1.0, per_model=True),
        "normalize": Param(bool, normalize),
        "rescale": Param(bool, rescale),
        "lambda": Param(float, 1.0),
        "int8_mask": Param(bool, False),  # mergekit's memory saver for the sign mask; no effect on the numbers
        "variant": Param(str, "mergekit", choices=VARIANTS),  # tunesmith's: mergekit's numbers, or the paper's (docs/merging.md)
        **extra,
    }


def task_arithmetic(base, tensors, shared, per_model):
    return task_arithmetic_frame(base, tensors, shared, per_model)


TASK_ARITHMETIC = MergeMethod(
    name="task_arithmetic", merge=task_arithmetic, base="required",
    params=gta_params(normalize=False, rescale=False), paper="arXiv:2212.04089", elementwise=True,
)
