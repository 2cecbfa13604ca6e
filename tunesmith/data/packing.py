"""Padding-free micro-batches: several samples share one row, and none of them sees another.

A micro-batch's examples are placed into rows of at most `row_len` tokens (first-fit, longest
first), so almost no compute goes to pad tokens. Isolation comes from the position ids: they
restart at 0 where each sample starts, and with no 2-D attention mask transformers turns such
position ids into a block-diagonal causal mask (one block per sample), so attention never
crosses a sample boundary and RoPE positions are those of the sample alone.

    row:       [ s1 s1 s1 s1 | s2 s2 s2 | s3 s3 | pad pad ]
    positions: [ 0  1  2  3  | 0  1  2  | 0  1  | 0   1   ]
    labels:    [ -  .  .  .  | -  .  .  | -  .  | -   -   ]   (-: ignored)

The first label of every sample is ignored: in a packed row the token before it belongs to the
previous sample, which must not be trained to predict it. (Unpacked, position 0 is never
predicted anyway, so the per-sample losses are identical.) Packing happens inside a micro-batch,
so each optimizer step sees exactly the samples it would see unpacked.
"""

from __future__ import annotations

import torch

from tunesmith.data.tokenize import IGNORE


def plan_rows(lengths: list[int], row_len: int) -> list[list[int]]:
    """First-fit decreasing: indices of the examples in each row, no row longer than row_len."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        for r, free in enumerate(room):
            if lengths[i] <= free:
                rows[r].append(i)
                room[r] -= lengths[i]
                break
        else:
            rows.append([i])
            room.append(row_len - lengths[i])
    return rows


def collate_packed(examples: list[dict], pad_id: int, row_len: int,
                   sequence_ids: bool = False) -> dict[str, torch.Tensor]:
    """(R, T) input_ids, labels and position_ids for the examples packed into R rows; no attention mask.
    With `sequence_ids`, also (R, T) "sequence_ids": the index in `examples` of the sample each token
    belongs to (-1 for padding), so a loss can sum per sample (objectives/preference.py)."""
    lengths = [len(e["input_ids"]) for e in examples]
    plan = plan_rows(lengths, max(row_len, max(lengths)))
    width = max(sum(lengths[i] for i in row) for row in plan)
    input_ids = torch.full((len(plan), width), pad_id, dtype=torch.long)  # (R, T)
    labels = torch.full((len(plan), width), IGNORE, dtype=torch.long)  # (R, T)
    position_ids = torch.zeros((len(plan), width), dtype=torch.long)  # (R, T)
    owner = torch.full((len(plan), width), -1, dtype=torch.long)  # (R, T)
    for r, row in enumerate(plan):
        start = 0
        for i in row:
            n = lengths[i]
            input_ids[r, start : start + n] = torch.tensor(examples[i]["input_ids"])
            labels[r, start + 1 : start + n] = torch.tensor(examples[i]["labels"][1:])
            position_ids[r, start : start + n] = torch.arange(n)
            owner[r, start : start + n] = i
            start += n
        position_ids[r, start:] = torch.arange(width - start)  # the padding is a sample of its own
    batch = {"input_ids": input_ids, "labels": labels, "position_ids": position_ids,
             "real_tokens": torch.tensor(sum(lengths))}
    return {**batch, "sequence_ids": owner} if sequence_ids else batch
