"""The batch's in-place KV cache (tunesmith/serve/kv_batch.py): after any run of joins, decode steps and leaves,
each row's live view holds exactly its own keys and values, right-aligned, as a left-padded torch.cat cache would;
swap_remove fills holes from the end without overlapping copies."""

from __future__ import annotations

import pytest
import torch

from tunesmith.serve import kv_batch
from tunesmith.serve.kv_batch import SlotLayer, swap_remove

HEADS, DIM = 2, 3


def check(layer: SlotLayer, rows: list[torch.Tensor]) -> None:
    """The layer's view is (B, H, max L_i, D) with row j's tensor (H, L_j, D) in its last L_j columns."""
    width = max(r.shape[1] for r in rows)
    assert layer.keys.shape == (len(rows), HEADS, width, DIM) == layer.values.shape
    for j, r in enumerate(rows):
        assert torch.equal(layer.keys[j, :, width - r.shape[1]:], r)
        assert torch.equal(layer.values[j, :, width - r.shape[1]:], -r)


@pytest.mark.parametrize("room", [1, 64])
def test_joins_steps_and_leaves_keep_every_row_exact(monkeypatch, room):
    """Room 1 makes nearly every step and join regrow (more rows, more columns, a wider prompt than the batch);
    64 keeps them in place."""
    monkeypatch.setattr(kv_batch, "MIN_ROOM", room)
    g = torch.Generator().manual_seed(0)
    rows = [torch.randn(HEADS, 5, DIM, generator=g)]
    layer = SlotLayer(rows[0][None], -rows[0][None], max_rows=8)
    check(layer, rows)
    buffers = set()
    for step in range(60):
        action = torch.randint(3, (1,), generator=g).item()
        if action == 0 and len(rows) < 8:  # join 1-3 rows of 1-30 columns (sometimes wider than the batch)
            new = [torch.randn(HEADS, int(torch.randint(1, 31, (1,), generator=g)), DIM, generator=g)
                   for _ in range(min(8 - len(rows), int(torch.randint(1, 4, (1,), generator=g))))]
            width = max(r.shape[1] for r in new)
            padded = torch.stack([torch.cat([torch.zeros(HEADS, width - r.shape[1], DIM), r], 1) for r in new])
            layer.append_rows(padded, -padded)
            rows += [torch.cat([torch.zeros(HEADS, width - r.shape[1], DIM), r], 1) for r in new]
        elif action == 1 and len(rows) > 1:  # some rows leave; then the columns no row uses
            gone = torch.randperm(len(rows), generator=g)[:int(torch.randint(1, len(rows), (1,), generator=g))]
            order, moves = swap_remove(len(rows), gone.tolist())
            layer.move_rows(moves, len(order))
            rows = [rows[i] for i in order]
            layer.drop_columns(layer.keys.shape[2] - max(r.shape[1] for r in rows))
        else:  # a decode step: one new column for every row
            new = torch.randn(len(rows), HEADS, 1, DIM, generator=g)
            keys, values = layer.update(new, -new)
            assert keys is layer.keys and values is layer.values
            rows = [torch.cat([r, new[j]], 1) for j, r in enumerate(rows)]
        check(layer, rows)
        buffers.add(layer.buf_k.data_ptr())
        assert layer.buf_k.shape[0] <= 8
    assert (len(buffers) > 10) if room == 1 else (len(buffers) < 10)  # in place unless out of room


def test_a_decode_step_writes_in_place():
    rows = torch.randn(4, HEADS, 6, DIM)
    layer = SlotLayer(rows, -rows, max_rows=4)
    buffer = layer.buf_k.data_ptr()
    for _ in range(20):
        new = torch.randn(4, HEADS, 1, DIM)
        layer.update(new, -new)
    assert layer.buf_k.data_ptr() == buffer and layer.keys.shape == (4, HEADS, 26, DIM)
    assert layer.get_seq_length() == 26


@pytest.mark.parametrize("count, gone, order", [(4, [1], [0, 3, 2]), (4, [0, 1], [2, 3]), (4, [3], [0, 1, 2]),
                                                (5, [0, 2, 4], [3, 1]), (3, [0, 1, 2], [])])
def test_swap_remove_fills_holes_from_the_end(count, gone, order):
    got, moves = swap_remove(count, gone)
    assert got == order
    assert all(src >= len(order) > dst for src, dst in moves)  # every source is past the new end: no overlap
    assert sorted(got) == sorted(set(range(count)) - set(gone))
