"""From the data config to encoded train and validation examples, batches and batch order.

    read -> detect/validate format -> split (seeded) -> encode -> drop rows with nothing to learn
    (or all of it read back from the cache of an earlier run with the same inputs: data/cache.py)

How a row is encoded and what counts as nothing to learn belong to the objective
(tunesmith/objectives/): objective.name=auto picks one by the detected format.

The split and the batch order are pure functions of the seed, so two runs with the same config
see the same examples in the same order, and a resumed run can find batch k again by index.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tunesmith.config import DataConfig
from tunesmith.data import cache
from tunesmith.data.formats import detect_format, validate_rows
from tunesmith.data.readers import Row, read_rows
from tunesmith.data.tokenize import IGNORE
from tunesmith.errors import UserError

log = logging.getLogger(__name__)


@dataclass
class Prepared:
    """Encoded examples (for the LM objectives {input_ids, labels, truncated}) and what happened on the way."""

    train: list[dict]
    validation: list[dict]
    format: str
    stats: dict[str, int] = field(default_factory=dict)
    objective: str = "sft"  # the objective the examples were encoded for (auto resolved)

    def describe(self) -> str:
        s = self.stats
        return (
            f"{self.format} rows for {self.objective}: {s['rows']} read, {len(self.train)} train / "
            f"{len(self.validation)} validation examples, {s['truncated']} truncated, {s['dropped']} dropped "
            "(nothing to learn within max_seq_len)"
        )


def prepare_datasets(cfg: DataConfig, tokenizer, seed: int, objective: str = "auto") -> Prepared:
    """Read, validate, split and encode the configured files for `objective` (a name, or auto: by the data
    format), or take the result of an earlier run with the same inputs from the cache (data.cache,
    tunesmith/data/cache.py). Every data problem is a UserError."""
    if not cfg.train:
        raise UserError("data.train is not set: name a training file (e.g. data.train=data/train.jsonl).")
    key = cache.cache_key(cfg, tokenizer, seed, objective) if cfg.cache else None
    cached = cache.load(key) if key else None
    prepared = Prepared(**cached) if cached else encode_files(cfg, tokenizer, seed, objective)
    if key and not cached:
        cache.store(key, prepared, cfg)
    stats = prepared.stats
    if stats["truncated"] or stats["dropped"]:
        log.warning("%d rows were cut to data.max_seq_len=%d; %d of them had no answer token left and were dropped",
                    stats["truncated"], cfg.max_seq_len, stats["dropped"])
    return prepared


def encode_files(cfg: DataConfig, tokenizer, seed: int, objective_name: str = "auto") -> Prepared:
    """Read, validate, split and encode: what prepare_datasets does when the cache has no copy."""
    from tunesmith.objectives.registry import get_objective, resolve_name

    train_rows = read_rows(cfg.train)
    fmt = detect_format(train_rows, cfg.train) if cfg.format == "auto" else cfg.format
    validate_rows(train_rows, fmt, cfg.train)
    objective = get_objective(resolve_name(objective_name, fmt))
    objective.check_format(fmt, cfg.train)
    rows_read = len(train_rows)
    if cfg.validation:
        val_rows = read_rows(cfg.validation)
        validate_rows(val_rows, fmt, cfg.validation)
        rows_read += len(val_rows)
    else:
        train_rows, val_rows = split_rows(train_rows, cfg.val_split, seed)
    stats = {"rows": rows_read, "truncated": 0, "dropped": 0}
    train = encode_rows(train_rows, fmt, tokenizer, cfg, cfg.train, stats, objective)
    validation = encode_rows(val_rows, fmt, tokenizer, cfg, cfg.validation or cfg.train, stats, objective)
    if not train:
        raise UserError(
            f"Every training row of {cfg.train} was dropped: no answer token fits in data.max_seq_len="
            f"{cfg.max_seq_len}. Raise data.max_seq_len or shorten the prompts."
        )
    return Prepared(train, validation, fmt, stats, objective.name)


def split_rows(rows: list[Row], val_split: float, seed: int) -> tuple[list[Row], list[Row]]:
    """Hold out round(val_split * n) rows (at least one if val_split > 0, never all), chosen by the seed.

    Both parts keep file order; shuffling for training happens per epoch in `epoch_order`.
    """
    n_val = min(max(round(val_split * len(rows)), 1 if val_split > 0 else 0), len(rows) - 1)
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed)).tolist()
    held_out = set(order[:n_val])
    train = [r for i, r in enumerate(rows) if i not in held_out]
    validation = [r for i, r in enumerate(rows) if i in held_out]
    return train, validation


def encode_rows(rows: list[Row], fmt: str, tokenizer, cfg: DataConfig, path: str | Path, stats: dict,
                objective) -> list[dict]:
    """Encode rows as the objective does, counting truncations and dropping (and counting) rows that teach nothing."""
    examples = []
    for row in rows:
        try:
            example = objective.encode(row.fields, fmt, tokenizer, cfg)
        except UserError as e:
            raise UserError(f"{path} {row.location}: {e}") from None
        stats["truncated"] += example["truncated"]
        if objective.keeps(example):
            examples.append(example)
        else:
            stats["dropped"] += 1
    return examples


def has_target(labels: list[int]) -> bool:
    """Position 0 is never predicted (nothing comes before it), so only labels from position 1 count."""
    return any(label != IGNORE for label in labels[1:])


def collate(examples: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a list of examples into (B, T) tensors; padding is masked from attention and loss."""
    width = max(len(e["input_ids"]) for e in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)  # (B, T)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)  # (B, T)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)  # (B, T)
    for i, example in enumerate(examples):
        n = len(example["input_ids"])
        input_ids[i, :n] = torch.tensor(example["input_ids"], dtype=torch.long)
        labels[i, :n] = torch.tensor(example["labels"], dtype=torch.long)
        attention_mask[i, :n] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The row order of one epoch: a permutation that depends only on (seed, epoch), so resume is exact."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
