"""Next-token loss, shared by causal LM (raw text) and SFT (completions only).

The two objectives differ only in which labels are -100 (sft.py masks prompts, causal_lm.py
does not), so they share this loss. For a window of micro-batches with labelled positions P:

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

from tunesmith.data.dataset import collate, has_target
from tunesmith.data.packing import collate_packed
from tunesmith.objectives.registry import LossOutput, Objective

IGNORE = -100
HEAD_CHUNK = 2048  # labelled positions per head/cross-entropy chunk


def labelled_states(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(states (N, H), targets (N,), keep (B, T-1)): the trunk's hidden states at the N positions whose next
    token carries a label, and those labels. Only these positions ever reach the output head."""
    hidden = trunk_states(model, batch)
    labels = batch["labels"][:, 1:]  # position t predicts token t+1
    keep = labels != IGNORE  # (B, T-1)
    return hidden[:, :-1][keep], labels[keep], keep


def trunk_states(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """(B, T, H): the transformer's last hidden states (after its final norm), packed or padded rows alike."""
    # A packed batch has position_ids and no attention mask (see tunesmith/data/packing.py); a KV
    # cache would make transformers ignore the packing, and training needs none. Where the sample
    # starts are passed on, tunesmith/models/attention.py attends per sample (other attention
    # implementations ignore the extra argument and use transformers' block-diagonal mask).
    packed = {}
    if "position_ids" in batch and "attention_mask" not in batch:
        from tunesmith.models.attention import sample_starts

        packed["packed_starts"] = sample_starts(batch["position_ids"])
    return model.base_model(
        input_ids=batch["input_ids"],
        attention_mask=batch.get("attention_mask"),
        position_ids=batch.get("position_ids"),
        use_cache=False,
        **packed,
    ).last_hidden_state


def head_chunks(model, states: torch.Tensor, targets: torch.Tensor):
    """(logits (chunk, V) in float32, targets (chunk,), start) for HEAD_CHUNK labelled positions at a time.

    At least one (possibly empty) chunk: a batch without labels then still reaches the head and
    every weight with a zero gradient, as DDP expects of every process (see train/loop.py)."""
    head = model.get_output_embeddings()
    for start in range(0, max(1, targets.numel()), HEAD_CHUNK):
        yield head(states[start : start + HEAD_CHUNK]).float(), targets[start : start + HEAD_CHUNK], start


def next_token_loss(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int, torch.Tensor]:
    """(sum of token cross-entropies, labelled tokens, labelled tokens predicted right by argmax)."""
    states, targets, _ = labelled_states(model, batch)
    total = states.new_zeros(())
    correct = torch.zeros((), dtype=torch.long)
    for logits, chunk, _ in head_chunks(model, states, targets):
        total = total + F.cross_entropy(logits, chunk, reduction="sum")
        correct += (logits.detach().argmax(-1) == chunk).sum().cpu()
    return total, int(targets.numel()), correct


def token_loss_sum(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Return (sum of token cross-entropies, number of labelled tokens) for one micro-batch."""
    total, count, _ = next_token_loss(model, batch)
    return total, count


def lm_loss(model, batch: dict[str, torch.Tensor]) -> LossOutput:
    """The objective's loss: the summed cross-entropy, its labelled tokens, and how many argmax got right
    (token_accuracy in metrics.jsonl: correct / labelled tokens of the window)."""
    total, count, correct = next_token_loss(model, batch)
    return total, count, {"token_accuracy": float(correct)}


def labelled_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Positions that carry a label; position 0 is never predicted."""
    return int((batch["labels"][:, 1:] != IGNORE).sum())


def unlabelled(example: dict) -> dict:
    """`example` with every label ignored: a forward and backward that change nothing."""
    return {**example, "labels": [IGNORE] * len(example["labels"])}


def collate_lm(examples: list[dict], pad_id: int, pack_len: int = 0) -> dict[str, torch.Tensor]:
    """Padding-free rows of at most pack_len tokens when pack_len > 0 (data/packing.py), else right-padded."""
    return collate_packed(examples, pad_id, pack_len) if pack_len else collate(examples, pad_id)


def keeps(example: dict) -> bool:
    return has_target(example["labels"])


def lm_objective(name: str, formats: tuple[str, ...], encode) -> Objective:
    """An objective trained by next-token loss on the labels `encode` leaves (the rest is LM-generic)."""
    return Objective(name=name, formats=formats, unit="labelled tokens", encode=encode,
                     keeps=keeps, collate=collate_lm, units=labelled_tokens, filler=unlabelled, loss=lm_loss,
                     metrics=("token_accuracy",))
