"""Variable-length attention for packed rows: each sample attends to itself only, at its own cost.

A packed row (tunesmith/data/packing.py) holds several samples back to back. transformers keeps
them apart with a block-diagonal mask, but the SDPA kernels behind that mask still compute every
query-key pair of the row and throw most away: a row of total length T costs T^2, however short
its samples. Run per sample instead and the cost is the sum of L_i^2:

    row of 8 samples, lengths 40..300, T = 995:   T^2 = 990,025   sum L_i^2 ~ 190,000   (5x less)

which on the CPU was about a quarter of a LoRA step's time (docs/speed.md). This module registers
an attention function with transformers' AttentionInterface that, when the loss passes the
samples' start positions (`packed_starts`, a list per row), calls SDPA once per sample with
`is_causal=True` and no mask. Everything else (padded batches, generation with a KV cache) goes
to transformers' own SDPA function unchanged, so the model behaves as before outside packed
training. The mask builder is SDPA's, for the same reason.

The numbers are those of the masked computation up to float rounding (tests/test_attention.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

NAME = "tunesmith_varlen"


def sample_starts(position_ids: torch.Tensor) -> list[list[int]]:
    """For each row of a packed batch, where its samples start (positions restart at 0), plus the row end."""
    starts = []
    for row in position_ids.tolist():
        begins = [i for i, p in enumerate(row) if p == 0]
        starts.append(begins + [len(row)])
    return starts


@torch.compiler.disable  # a Python loop over samples whose count and lengths change every batch
def varlen_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """(B, H, T, D) query/key/value -> (B, T, H, D) output, as transformers' attention functions return."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    starts = kwargs.pop("packed_starts", None)
    if starts is None or query.shape[2] != key.shape[2]:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    # grouped-query attention (fewer key/value heads than query heads): SDPA shares each key/value
    # head among its query heads itself, so no repeated copy of K and V is made or kept for backward
    gqa = query.shape[1] != key.shape[1]
    p = dropout if module.training else 0.0
    rows = []
    for r, bounds in enumerate(starts):
        # split, not slicing: split's backward is one cat, slicing's a zero-filled full-size tensor per slice
        lengths = [b - a for a, b in zip(bounds, bounds[1:])]
        qs, ks, vs = (t[r : r + 1].split(lengths, dim=2) for t in (query, key, value))
        pieces = [F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True, scale=scaling,
                                                 enable_gqa=gqa)
                  for q, k, v in zip(qs, ks, vs)]
        rows.append(torch.cat(pieces, dim=2))  # (1, H, T, D)
    out = torch.cat(rows, dim=0)  # (B, H, T, D)
    return out.transpose(1, 2).contiguous(), None


def register() -> None:
    """Make NAME known to transformers (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(NAME, varlen_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)


def use_varlen_attention(model) -> str:
    """Switch `model` to the packed-aware attention; returns the implementation it had (to restore later)."""
    register()
    before = model.config._attn_implementation
    if before in ("sdpa", NAME):
        model.set_attn_implementation(NAME)
    return before


def restore_attention(model, implementation: str) -> None:
    if model.config._attn_implementation == NAME:
        model.set_attn_implementation(implementation)
