"""Held-out scoring during training: the objective's mean loss and metrics on the validation examples.

    val_loss       = (sum of the loss over all validation units) / (number of units)
    val_<metric>   = (sum of the metric over all validation units) / (number of units)

Eval mode (no dropout, no RNG use), so validating never changes what training does next; an
objective with a `score` function of its own (e.g. one that generates) replaces this.
"""

from __future__ import annotations

import torch

from tunesmith.objectives.registry import Objective, as_loss_output, get_objective
from tunesmith.train import distributed


@torch.no_grad()
def held_out_score(model, examples: list[dict], batch_size: int, pad_id: int, objective: Objective,
                   loss_fn=None, pack_len: int = 0) -> dict[str, float] | None:
    """{"val_loss": mean loss per unit, "val_<metric>": ...} over `examples` (eval mode: no dropout, no RNG).

    Under torchrun process r scores batches r, r + world, ...; in the last round a process left
    without one runs a filler row, because FSDP2 needs every process in every forward.
    pack_len > 0 packs each batch like training does (the same loss, less compute). An objective's
    before_window sees all the batches of all processes as one window (KTO: one z0 for the whole set),
    so the scores do not depend on the batch size or the number of processes."""
    if not examples:
        return None
    if objective.score is not None:
        return objective.score(model, examples, batch_size, pad_id, pack_len)
    loss_fn = loss_fn or objective.loss
    was_training = model.training
    model.eval()
    batches = my_batches(examples, batch_size, pad_id, objective, pack_len, next(model.parameters()).device)
    if objective.before_window is not None:
        batches = objective.before_window(model, batches)
    sums = {"val_loss": 0.0, **{f"val_{m}": 0.0 for m in objective.metrics}}
    units = 0
    for batch in batches:
        loss_sum, n, metrics = as_loss_output(loss_fn(model, batch))
        sums["val_loss"] += float(loss_sum)
        for m in objective.metrics:
            sums[f"val_{m}"] += float(metrics.get(m, 0.0))
        units += n
    *totals, units = distributed.sum_over_ranks(*sums.values(), units)
    model.train(was_training)
    return {k: v / max(1, units) for k, v in zip(sums, totals)}


def my_batches(examples: list[dict], batch_size: int, pad_id: int, objective: Objective, pack_len: int,
               device) -> list[dict]:
    """This process's validation micro-batches on `device`: batches r, r + world, ..., and a filler where a
    process has none left in the last round (the same number of batches on every process)."""
    starts = range(0, len(examples), batch_size)
    batches = []
    for first in range(0, len(starts), distributed.world()):
        j = first + distributed.rank()
        rows = examples[starts[j] : starts[j] + batch_size] if j < len(starts) else [objective.filler(examples[0])]
        batch = objective.collate(rows, pad_id, pack_len)
        batches.append({k: v.to(device) for k, v in batch.items() if k != "real_tokens"})
    return batches


def validation_loss(model, examples: list[dict], batch_size: int, pad_id: int, loss_fn=None,
                    pack_len: int = 0, objective: Objective | None = None):
    """The mean held-out loss alone (see held_out_score)."""
    scores = held_out_score(model, examples, batch_size, pad_id, objective or get_objective("sft"), loss_fn, pack_len)
    return None if scores is None else scores["val_loss"]
