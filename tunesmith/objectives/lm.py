"""Next-token loss for causal LM (raw text) and SFT (completions only): one function for both.

The two objectives differ only in which labels are -100 (the data pipeline masks prompts for
SFT), so they share this loss. For a window of micro-batches with labelled positions P:

    loss = - (1 / |P|) * sum_{t in P} log p(y_t | y_<t)

The sum and the count are returned separately so that gradient accumulation divides by the
number of target tokens in the whole window, not by a per-micro-batch mean (which would weight
short micro-batches more).

The output head runs only at labelled positions, in chunks: prompt tokens cost no vocabulary
projection, and the (tokens x vocab) logits tensor for the whole batch never exists at once.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE = -100
HEAD_CHUNK = 2048  # labelled positions per head/cross-entropy chunk


def token_loss_sum(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Return (sum of token cross-entropies, number of labelled tokens) for one micro-batch."""
    # A packed batch has position_ids and no attention mask (see tunesmith/data/packing.py); a KV
    # cache would make transformers ignore the packing, and training needs none. Where the sample
    # starts are passed on, tunesmith/models/attention.py attends per sample (other attention
    # implementations ignore the extra argument and use transformers' block-diagonal mask).
    packed = {}
    if "position_ids" in batch and "attention_mask" not in batch:
        from tunesmith.models.attention import sample_starts

        packed["packed_starts"] = sample_starts(batch["position_ids"])
    hidden = model.base_model(
        input_ids=batch["input_ids"],
        attention_mask=batch.get("attention_mask"),
        position_ids=batch.get("position_ids"),
        use_cache=False,
        **packed,
    ).last_hidden_state
    labels = batch["labels"][:, 1:]  # position t predicts token t+1
    hidden = hidden[:, :-1]  # (B, T-1, H)
    keep = labels != IGNORE
    targets = labels[keep]  # (N,)
    states = hidden[keep]  # (N, H): only positions that carry a label
    head = model.get_output_embeddings()
    total = hidden.new_zeros(())
    # At least one (possibly empty) chunk: a batch without labels then still reaches the head and
    # every weight with a zero gradient, as DDP expects of every process (see train/loop.py).
    for start in range(0, max(1, targets.numel()), HEAD_CHUNK):
        logits = head(states[start : start + HEAD_CHUNK]).float()  # (chunk, V)
        total = total + F.cross_entropy(logits, targets[start : start + HEAD_CHUNK], reduction="sum")
    return total, int(targets.numel())
