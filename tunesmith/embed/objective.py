"""The `contrastive` objective as the training loop runs it: pairs -> tokenized contrastive batches -> the loss.

The loop (train/loop.py) shuffles the examples (a seeded permutation per epoch, so resume is exact) and hands
each micro-batch's rows to `collate`; here a row is an embed.data.Pair. collate builds the ContrastiveBatch of
objectives/contrastive.py (positives, then hard negatives; the same-document mask) and tokenizes every text of
it at once:

    input_ids, attention_mask (, token_type_ids)   (B + P, T)   the B queries, then the P passages
    positive                                       (B,)         column of each query's positive among the P
    exclude                                        (B, P)       True: masked out of that query's softmax

`loss(encoder, batch)` embeds the queries and the passages (each cut to its own longest text), and returns
(L * B, B, {"accuracy": queries whose positive scores highest}), the loop's (sum, units, metric sums). With
objective.cached the same L and gradients come from GradCache; with objective.matryoshka_dims, L is the sum over
nested dimensions. Held-out scoring (`score`) is retrieval, not the loss: the validation queries against their
passages, NDCG@10, MRR@10 and hit rate@5, which pick the best checkpoint (embed/train.py).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Callable

import torch

from tunesmith.embed.config import EmbedObjectiveConfig
from tunesmith.objectives.registry import Objective

BEST_BY = "ndcg@10"


def _rows_only(*_args, **_kwargs):  # interface slots the embed objective never uses
    raise NotImplementedError("the embed objective gets Pair rows from embed/train.py, not encoded examples")


def select(features: dict[str, torch.Tensor], rows) -> dict[str, torch.Tensor]:
    """Those rows of a right-padded feature dict, cut to their longest text (less compute on padding)."""
    mask = features["attention_mask"][rows]
    length = max(1, int(mask.sum(dim=1).max()))
    return {k: v[rows][:, :length] for k, v in features.items()}


def make_objective(encoder, cfg: EmbedObjectiveConfig, document_of: dict[str, str] | None = None,
                   score: Callable | None = None) -> Objective:
    """The Objective for train/loop.py: collate with `encoder`'s tokenizer, the (cached, nested) contrastive loss,
    and `score(model, examples) -> {"val_...": ...}` for held-out scoring."""
    from tunesmith.objectives.contrastive import ContrastiveBatch, cached_contrastive_loss, make_batch, \
        nested_contrastive_loss

    def collate(rows, pad_id: int = 0, pack_len: int = 0) -> dict[str, torch.Tensor]:
        batch = make_batch(rows, document_of)
        exclude = batch.exclude if cfg.mask_same_document else torch.zeros_like(batch.exclude)
        features = encoder.tokenize(batch.queries + batch.passages)
        features = {k: v.cpu() for k, v in features.items()}
        return {**features, "positive": batch.positive, "exclude": exclude}

    def units(batch) -> int:
        return int(batch["positive"].shape[0])

    def loss(model, batch):
        b = units(batch)
        features = {k: v for k, v in batch.items() if k not in ("positive", "exclude")}
        n = features["input_ids"].shape[0]
        if cfg.cached:
            embed = lambda idx: model(select(features, idx))  # noqa: E731 (texts are row numbers here)
            cb = ContrastiveBatch(list(range(b)), list(range(b, n)), batch["positive"], batch["exclude"])
            value = cached_contrastive_loss(embed, cb, cfg.scale, cfg.chunk_size, dims=cfg.matryoshka_dims)
            return value * b, b, {}  # no in-batch accuracy: it would cost a third forward
        q, p = model(select(features, slice(0, b))), model(select(features, slice(b, n)))
        value = nested_contrastive_loss(q, p, batch["positive"], batch["exclude"], cfg.scale, cfg.matryoshka_dims)
        with torch.no_grad():
            logits = (q @ p.T).masked_fill(batch["exclude"], float("-inf"))
            correct = (logits.argmax(dim=1) == batch["positive"]).sum()
        return value * b, b, {"accuracy": correct}

    objective = Objective(name="contrastive", formats=("pairs",), unit="queries", encode=_rows_only,
                          keeps=lambda e: True, collate=collate, units=units, filler=lambda e: e, loss=loss,
                          metrics=("accuracy",), packs=False,
                          score=(lambda model, examples, *rest: score(model, examples)) if score else None)
    return replace(objective, metrics=()) if cfg.cached else objective
