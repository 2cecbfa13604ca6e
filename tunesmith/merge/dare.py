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

import math
import queue
import threading
from contextlib import contextmanager

import torch

from tunesmith.merge.registry import MergeMethod
from tunesmith.merge.task_arithmetic import gta_params, mask_plan, rescaled, task_arithmetic_frame


def work_dtype(tensor: torch.Tensor) -> torch.dtype:
    """torch.bernoulli has no fp16 CPU kernel: CPU tensors other than bf16 are drawn in fp32 (as mergekit)."""
    return draw_dtype(tensor.dtype, tensor.device.type)


def draw_dtype(dtype: torch.dtype, device_type: str = "cpu") -> torch.dtype:
    """work_dtype of a tensor of this dtype on this kind of device."""
    if device_type != "cpu" or dtype == torch.bfloat16:
        return dtype
    return torch.float32


def bernoulli(shape: tuple, density: float, dtype: torch.dtype, device="cpu") -> torch.Tensor:
    """mergekit's draw: torch.bernoulli over a tensor of `shape` filled with density (0/1 in dtype). On the CPU it
    draws entry by entry from the generator, so consecutive draws give what one draw over all entries would."""
    return torch.bernoulli(torch.full(shape, density, dtype=dtype, device=device))


class MasksAhead:
    """DARE's Bernoulli masks drawn on a second thread, ahead of the merge that uses them.

    torch.bernoulli over a tensor of probabilities runs on one core (a serial kernel: it draws entry by entry
    from the generator): 2.8 s of DARE TIES' 5.9 s over three models of the default size (bench/merge.py),
    while the other core waited. What a merge draws depends on nothing but the generator and, per (tensor,
    model) in merge order, the number of entries, the density and the work dtype, all known before the merge
    starts (the schedule). So this thread draws them in that order, chunk by chunk as drop_plan would, while
    the merge reads, combines and writes on the other core; the merge takes each mask when it reaches it.
    Nothing else draws from the generator while the merge runs, so every mask is the one the merge would
    have drawn itself: the same seed gives the same merge, bit for bit (tests/test_merge_methods.py). With it
    the DARE TIES merge loop of bench/merge.py took 3.8 s instead of 5.9."""

    def __init__(self, schedule: list[tuple[int, float, torch.dtype]], ahead: int = 16, chunk: int = 2**22):
        self.schedule, self.chunk = schedule, chunk
        self.ready: queue.Queue = queue.Queue(maxsize=ahead)  # at most `ahead` masks held (one byte an entry)
        self.stop = threading.Event()
        self.taken = 0
        self.thread = threading.Thread(target=self._draw_all, name="tunesmith-dare-masks", daemon=True)
        self.thread.start()

    def _draw_all(self) -> None:
        try:
            for numel, density, dtype in self.schedule:
                mask = torch.empty(numel, dtype=torch.bool)
                for a in range(0, numel, self.chunk):  # chunks draw what one call would; a chunk's floats held
                    b = min(numel, a + self.chunk)
                    mask[a:b] = bernoulli((b - a,), density, dtype).bool()
                    if self.stop.is_set():
                        return
                self._put(mask)
        except BaseException as e:  # handed to the merge, which raises it
            self._put(e)

    def _put(self, item) -> None:
        while not self.stop.is_set():
            try:
                self.ready.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def take(self, numel: int, density: float, dtype: torch.dtype) -> torch.Tensor:
        """The next mask (numel,) as bool; it must be the one the schedule planned next."""
        planned = self.schedule[self.taken] if self.taken < len(self.schedule) else None
        if planned != (numel, density, dtype):
            raise RuntimeError(f"DARE asked for a mask of {(numel, density, dtype)} where the schedule has {planned}")
        item = self.ready.get()
        if isinstance(item, BaseException):
            raise item
        self.taken += 1
        return item

    def close(self) -> None:
        self.stop.set()
        self.thread.join()


AHEAD: MasksAhead | None = None  # the masks of the merge now running (masks_ahead), else drawn in place


@contextmanager
def masks_ahead(schedule: list[tuple[int, float, torch.dtype]]):
    """While the block runs, drop_plan and random_drop take their masks from a MasksAhead over `schedule`."""
    global AHEAD
    if not schedule:
        yield
        return
    AHEAD = MasksAhead(schedule)
    try:
        yield
    finally:
        AHEAD.close()
        AHEAD = None


def bernoulli_mask(shape: tuple, density: float, dtype: torch.dtype, device) -> torch.Tensor:
    """Bernoulli(density) entries of `shape` (0/1 in dtype): from the merge's MasksAhead when one runs."""
    if AHEAD is not None and torch.device(device).type == "cpu":
        return AHEAD.take(math.prod(shape), density, dtype).view(shape).to(dtype)
    return bernoulli(shape, density, dtype, device)


def random_drop(delta: torch.Tensor, density: float, rescale: bool, variant: str) -> torch.Tensor:
    """Keep each entry with probability density; rescale as the variant says."""
    if density >= 1:
        return delta
    dtype = work_dtype(delta)
    mask = bernoulli_mask(tuple(delta.shape), density, dtype, delta.device)
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
    on_cpu = first.device.type == "cpu"
    del first
    if AHEAD is not None and on_cpu:
        whole = AHEAD.take(math.prod(shape), density, dtype)
        draw = lambda d, a, b: whole[a:b]  # bool
    else:
        draw = lambda d, a, b: bernoulli((b - a,), density, dtype, d.device)
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
