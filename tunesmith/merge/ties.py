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

import contextlib
import math
import tempfile
from pathlib import Path

import torch

from tunesmith.merge.registry import MergeMethod, Param
from tunesmith.merge.task_arithmetic import flat_span, gta_params, mask_plan, rescaled, task_arithmetic_frame
from tunesmith.models.heap import release_freed_memory

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


def trim_plan(delta_rows, chunks, shape, params, shared):
    """`trim` as a plan for task_arithmetic.frame_stream, bit for bit, without argsort's full-size buffers when
    the k largest magnitudes are one set (top_k_threshold): then the mask is |delta| >= the k-th largest. When
    ties at the threshold leave a choice, argsort's own tie order decides, as in `magnitude` (torch's CPU sort is
    not stable: which tied entries it keeps depends on the whole tensor, so nothing smaller than the whole sort
    reproduces it): sorted_magnitudes sorts the magnitudes whole then (the task vector itself is not held)."""
    density, rescale = density_of(params, shared), shared["rescale"]
    n = math.prod(shape)
    if density >= 1:
        return None
    if density <= 0 or n == 0:
        return lambda x, rows: x.zero_()
    k = max(1, int(density * n))
    threshold = top_k_threshold(delta_rows, chunks, k)
    if threshold is not None:
        return mask_plan(delta_rows, chunks, shape, lambda d, a, b: (magnitude_bits(d) >= threshold).to(d.dtype),
                         rescale)
    order = sorted_magnitudes(delta_rows, chunks, shape)
    keep = torch.zeros(n, dtype=torch.bool)
    keep[order[:k]] = True
    del order
    return mask_plan(delta_rows, chunks, shape, lambda d, a, b: keep[a:b].to(d.dtype), rescale)


SPILL_BYTES = 16 * 2**20  # magnitudes larger than this are sorted in a scratch file's mapping (sorted_magnitudes)


def sorted_magnitudes(delta_rows, chunks, shape) -> torch.Tensor:
    """The order of argsort(|delta| as fp32, descending) over the whole task vector, by argsort's kernel (torch.sort
    in place), so ties come out as in `magnitude`.

    Memory: torch.sort fills its int64 indices from an int64 arange (8 + 8 bytes an entry) before it reads the
    values (4 bytes an entry). Magnitudes over SPILL_BYTES are written chunk by chunk to a scratch file and
    sorted in a private mapping of it, so their pages come in only when the sort reads them, after the arange is
    freed: the peak is 16 bytes an entry instead of 20 (the default model's embeddings: 432 MiB, not 540)."""
    n = math.prod(shape)
    spill = n * 4 > SPILL_BYTES
    with tempfile.TemporaryDirectory(prefix="tunesmith-ties-") if spill else contextlib.nullcontext() as folder:
        if spill:
            scratch = Path(folder) / "magnitudes"
            with open(scratch, "wb") as f:
                for rows in chunks:
                    f.write(delta_rows(rows).abs().reshape(-1).float().contiguous().numpy())
            magnitudes = torch.from_file(str(scratch), shared=False, size=n, dtype=torch.float32)
        else:
            magnitudes = torch.empty(n, dtype=torch.float32)
            for rows in chunks:
                a, b = flat_span(rows, shape)
                magnitudes[a:b] = delta_rows(rows).abs().reshape(-1).float()
        release_freed_memory()  # the chunks read so far, before the sort's full-size buffers
        order = torch.empty(n, dtype=torch.int64)
        torch.sort(magnitudes, descending=True, out=(magnitudes, order))  # argsort's kernel, sorting in place
        del magnitudes  # unmapped before the folder goes
    return order


def magnitude_bits(x: torch.Tensor) -> torch.Tensor:
    """|x| as `magnitude` ranks it (fp32 on the CPU) read as int32: for non-negative floats the integer order is
    the float order, so counting the bits counts the magnitudes."""
    return x.abs().float().view(torch.int32)


def top_k_threshold(delta_rows, chunks, k: int) -> int | None:
    """The bits of the k-th largest magnitude of the task vector when the k largest are one set whatever the sort's
    tie order (no other entry equals the threshold; or the threshold is 0, where keeping a zero or not writes the
    same zero), else None. A radix select in two counting passes over the row chunks: a histogram of the high 16
    bits, then of the low 16 bits in the bucket holding the k-th; memory: a chunk and two count tables."""
    fp64, finite = False, True

    def high_bits():
        nonlocal fp64, finite
        for rows in chunks:
            delta = delta_rows(rows)
            fp64 |= delta.dtype == torch.float64
            bits = magnitude_bits(delta).reshape(-1)
            finite &= not bool((bits >= 0x7F800000).any())  # inf or nan: leave the order to argsort
            yield bits >> 16

    high = histogram(high_bits(), 2**15)  # the sign bit is 0: high halves 0 .. 0x7fff
    if not finite:
        return None
    top = high.flip(0).cumsum(0)  # top[j]: entries in the j+1 highest buckets
    j = int(torch.searchsorted(top, k))
    bucket, above = 2**15 - 1 - j, int(top[j - 1]) if j else 0
    bits = (magnitude_bits(delta_rows(rows)).reshape(-1) for rows in chunks)
    low = histogram((b[(b >> 16) == bucket] & 0xFFFF for b in bits), 2**16)
    top = low.flip(0).cumsum(0) + above
    j = int(torch.searchsorted(top, k))
    threshold = (bucket << 16) | (2**16 - 1 - j)
    if int(top[j]) == k or (threshold == 0 and not fp64):  # top[j]: entries >= threshold; fp64 -> fp32 can round to 0
        return threshold
    return None


def histogram(values, bins: int, batch: int = 2**16) -> torch.Tensor:
    """Counts of the integers in `values` (an iterable of tensors), bincount once per `batch` entries at least."""
    counts, pending, size = torch.zeros(bins, dtype=torch.int64), [], 0
    for v in values:
        pending.append(v)
        size += v.numel()
        if size >= batch:
            counts += torch.bincount(torch.cat(pending), minlength=bins)
            pending, size = [], 0
    if pending:
        counts += torch.bincount(torch.cat(pending), minlength=bins)
    return counts


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
    paper="arXiv:2306.01708", sparsify_=trim_plan, consensus=True,
)
