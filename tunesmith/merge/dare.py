"""DARE: drop and rescale, then task arithmetic (dare_linear) or TIES' sign election (dare_ties).

    tau_i = W_i - W_0
    drop:     M ~ Bernoulli(density) per entry (density = 1 - p, p the drop rate)
    rescale:  paper:    tau_i' = M * tau_i / density                   (so E[tau_i'] = tau_i)
              mergekit: tau_i' = M * tau_i * ||tau_i||_1 / ||M * tau_i||_1   (L1 norm kept exactly)
    merge:    dare_linear: W = W_0 + lambda sum_i w_i tau_i'     dare_ties: TIES' elect + disjoint merge

Yu et al. 2024, "Language Models are Super Mario: Absorbing Abilities from Homologous Models as a
Free Lunch", arXiv:2311.03099, Section 3.1, Eq. 1-2 (drop with rate p, rescale by 1 / (1 - p)).
mergekit rescales every sparsified tensor to its original L1 norm instead; the two agree in
expectation, not per tensor. `variant: paper` gives the paper's 1 / density; `rescale: false`
keeps the dropped tensor unscaled in both. The mask is drawn from torch's RNG exactly as mergekit
draws it (one torch.bernoulli over a tensor filled with density, fp32 on the CPU), so the same
--random-seed gives the same merge.
"""

from __future__ import annotations

import torch

from tunesmith.merge.registry import MergeMethod
from tunesmith.merge.task_arithmetic import gta_params, mask_plan, rescaled, task_arithmetic_frame


def work_dtype(tensor: torch.Tensor) -> torch.dtype:
    """torch.bernoulli has no fp16 CPU kernel: CPU tensors other than bf16 are drawn in fp32 (as mergekit)."""
    if tensor.device.type != "cpu" or tensor.dtype == torch.bfloat16:
        return tensor.dtype
    return torch.float32


def random_drop(delta: torch.Tensor, density: float, rescale: bool, variant: str) -> torch.Tensor:
    """Keep each entry with probability density; rescale as the variant says."""
    if density >= 1:
        return delta
    dtype = work_dtype(delta)
    mask = torch.bernoulli(torch.full_like(delta, density, dtype=dtype))
    if variant == "paper":
        kept = delta.to(dtype) * mask
        result = kept / density if rescale and density > 0 else kept
    else:
        result = rescaled(delta.to(dtype), mask, rescale)
    return result.to(delta.dtype)


def drop_plan(delta_rows, chunks, shape, params, shared):
    """`drop` as a plan for task_arithmetic.frame_stream, bit for bit: the mask is drawn chunk by chunk (torch.bernoulli
    on the CPU draws entry by entry from the generator, so the chunks draw what one call over the tensor would)
    and kept as one byte an entry. A work dtype other than the tensor's (fp16) gives the whole sparsified tensor."""
    density, rescale, variant = params["density"], shared["rescale"], shared["variant"]
    if density >= 1:
        return None
    first = delta_rows(chunks[0])
    dtype = work_dtype(first)
    if dtype != first.dtype:
        return random_drop(torch.cat([delta_rows(rows).reshape(-1) for rows in chunks]).reshape(shape), density,
                           rescale, variant)
    del first
    draw = lambda d, a, b: torch.bernoulli(torch.full((b - a,), density, dtype=dtype, device=d.device))
    if variant != "paper":
        return mask_plan(delta_rows, chunks, shape, draw, rescale)
    masked = mask_plan(delta_rows, chunks, shape, draw, rescale=False)

    def apply(x, rows):  # kept / density
        masked(x, rows)
        if rescale and density > 0:
            x.div_(density)
    return apply


def drop(delta, params, shared):
    return random_drop(delta, params["density"], shared["rescale"], shared["variant"])


def dare_linear(base, tensors, shared, per_model):
    return task_arithmetic_frame(base, tensors, shared, per_model, sparsify=drop)


def dare_ties(base, tensors, shared, per_model):
    return task_arithmetic_frame(base, tensors, shared, per_model, sparsify=drop, consensus=True)


DARE_LINEAR = MergeMethod(
    name="dare_linear", merge=dare_linear, base="required", random=True,
    params=gta_params(normalize=False, rescale=True), paper="arXiv:2311.03099", sparsify_=drop_plan,
)
DARE_TIES = MergeMethod(
    name="dare_ties", merge=dare_ties, base="required", random=True,
    params=gta_params(normalize=False, rescale=True), paper="arXiv:2311.03099", sparsify_=drop_plan, consensus=True,
)
