"""The running batch's KV cache, written in place: per layer one buffer with room for more rows and columns.

Why. transformers' DynamicLayer grows its keys and values (B, H, L, D) with torch.cat at every token, so
each decode step copies the whole cache: B * L * layers * 2 vectors, 13% of a 16-row step of the default
model on a 2-core CPU, and more as answers grow. Here a layer keeps a buffer (R, H, C, D), R >= B rows and
C >= L columns, and the batch is the view buf[:B, :, start:end] (the layout of batching.py: left-padded,
every row's last token in the last column):

    decode   the step's new column is written at `end` for every row (B * H * D numbers), end += 1
    join     n prefilled rows (n, H, P, D) go to rows B..B+n-1, columns end-P..end-1; start = min(start, end-P)
    leave    the last rows move into the holes (only the moved rows are copied); then start moves past the
             columns that no row uses any more
    regrow   when a step or a join does not fit: a new zeroed buffer with room (a quarter more columns, rows
             doubled up to the engine's limit) takes the live part

The columns a row does not use hold zeros or the keys of rows that left: finite numbers that the
attention mask gives exactly zero weight, as it did the left padding's zeros.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicLayer

MIN_ROOM = 64  # columns of room at least, so short answers never regrow


class SlotLayer(DynamicLayer):
    """One layer's keys and values of the running batch; `keys`, `values` are always the live views."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, max_rows: int):
        super().__init__()
        self.max_rows = max(max_rows, keys.shape[0])
        self.rows, self.start, self.end = 0, 0, 0
        self.buf_k = self.buf_v = None
        self._regrow(keys.shape[0], lead=keys.shape[2], like=keys)
        self.append_rows(keys, values)
        self.is_initialized = True

    # -- what transformers calls ------------------------------------------------------------------------------
    def update(self, key_states, value_states, *args, **kwargs):
        """A decode (or prefill) step's new columns (B, H, t, D), written after the last one."""
        t = key_states.shape[2]
        if self.end + t > self.buf_k.shape[2]:
            self._regrow(self.rows, lead=0)
        self.buf_k[:self.rows, :, self.end:self.end + t].copy_(key_states)
        self.buf_v[:self.rows, :, self.end:self.end + t].copy_(value_states)
        self.end += t
        return self._views()

    # -- what the engine calls --------------------------------------------------------------------------------
    def append_rows(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """n rows (n, H, P, D) after the last row, their last column at the batch's last column."""
        n, width = keys.shape[0], keys.shape[2]
        room = self.buf_k.shape[0]
        if self.rows + n > room or width > self.end:
            rows = room if self.rows + n <= room else max(self.rows + n, min(self.max_rows, 2 * room))
            self._regrow(rows, lead=max(0, width - (self.end - self.start)))
        rows = slice(self.rows, self.rows + n)
        self.buf_k[rows, :, self.end - width:self.end].copy_(keys)
        self.buf_v[rows, :, self.end - width:self.end].copy_(values)
        self.rows += n
        self.start = min(self.start, self.end - width)
        self._views()

    def move_rows(self, moves: list[tuple[int, int]], rows: int) -> None:
        """Copy row src to row dst for each (src, dst) (live columns only); then keep the first `rows` rows."""
        live = slice(self.start, self.end)
        for src, dst in moves:
            self.buf_k[dst, :, live].copy_(self.buf_k[src, :, live])
            self.buf_v[dst, :, live].copy_(self.buf_v[src, :, live])
        self.rows = rows
        self._views()

    def drop_columns(self, n: int) -> None:
        """Forget the first n live columns (padding in every row)."""
        self.start += n
        self._views()

    # -- inside -----------------------------------------------------------------------------------------------
    def _regrow(self, rows: int, lead: int, like: torch.Tensor | None = None) -> None:
        """New zeroed buffers of `rows` rows; the live part moves to columns lead..lead+L-1, with room after it."""
        like = self.buf_k if like is None else like
        width = self.end - self.start
        _, heads, _, dim = like.shape
        columns = lead + width + max(MIN_ROOM, (lead + width) // 4)
        new_k = like.new_zeros(rows, heads, columns, dim)
        new_v = like.new_zeros(rows, heads, columns, dim)
        if self.buf_k is not None and self.rows:
            new_k[:self.rows, :, lead:lead + width].copy_(self.buf_k[:self.rows, :, self.start:self.end])
            new_v[:self.rows, :, lead:lead + width].copy_(self.buf_v[:self.rows, :, self.start:self.end])
        self.buf_k, self.buf_v = new_k, new_v
        self.start, self.end = lead, lead + width

    def _views(self):
        self.keys = self.buf_k[:self.rows, :, self.start:self.end]
        self.values = self.buf_v[:self.rows, :, self.start:self.end]
        return self.keys, self.values


def swap_remove(count: int, gone: list[int]) -> tuple[list[int], list[tuple[int, int]]]:
    """Rows 0..count-1 without `gone`, the holes filled from the end: (order, moves). New row j was old row
    order[j]; moves are the (src, dst) copies that make it so (sources all past the new end, so none overlap)."""
    order = list(range(count))
    for i in sorted(gone, reverse=True):  # the rows past i are already gone or kept, so the last one is kept
        last = order.pop()
        if i < len(order):
            order[i] = last
    return order, [(src, dst) for dst, src in enumerate(order) if src != dst]
