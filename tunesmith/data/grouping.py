"""Length-grouped batch order (data.group_by_length): less padding, order still a function of the seed.

A padded micro-batch costs batch_size x its longest row. Drawn uniformly, most micro-batches
hold one long row and the rest is padding. Sorting the whole epoch by length would remove the
padding but also the randomness (every epoch the same batches, short ones first). So, as
Hugging Face's LengthGroupedSampler does:

    permutation of the epoch (epoch_order)  ->  cut into mega-batches of 50 micro-batches
    each mega-batch: sort its rows by length, longest first, and cut into micro-batches
    shuffle the micro-batches of each mega-batch

Rows still come from a random 50-batch neighbourhood, and the order is a pure function of
(seed, epoch, lengths, batch size), so micro-batch k is found again by index on resume. A short
last micro-batch (rows not divisible by the batch size) stays last, where the loop expects it.
`batch_size` is the global micro-batch: under torchrun every process takes its share of it.
"""

from __future__ import annotations

import torch

MEGA_BATCH = 50  # micro-batches sorted together


def length_grouped_order(lengths: list[int], batch_size: int, seed: int, epoch: int,
                         mega_batch: int = MEGA_BATCH) -> list[int]:
    """The epoch's row order, regrouped into micro-batches of similar length (a permutation of all rows)."""
    # The permutation is epoch_order's (same generator and first draw); the shuffles continue its stream.
    generator = torch.Generator().manual_seed(seed + epoch)
    order = torch.randperm(len(lengths), generator=generator).tolist()
    span = batch_size * mega_batch
    full, short = [], []
    for start in range(0, len(order), span):
        rows = sorted(order[start : start + span], key=lambda i: -lengths[i])  # stable: ties keep their order
        batches = [rows[b : b + batch_size] for b in range(0, len(rows), batch_size)]
        if len(batches[-1]) < batch_size:
            short = batches.pop()  # only the epoch's last mega-batch can end short
        shuffled = torch.randperm(len(batches), generator=generator).tolist()
        full += [batches[i] for i in shuffled]
    return [i for batch in full + [short] for i in batch]


def padding(lengths: list[int], order: list[int], batch_size: int) -> int:
    """Pad tokens of the right-padded micro-batches of `order`: sum of batch x longest, less the real tokens."""
    total = 0
    for start in range(0, len(order), batch_size):
        batch = [lengths[i] for i in order[start : start + batch_size]]
        total += len(batch) * max(batch) - sum(batch)
    return total
