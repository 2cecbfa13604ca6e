"""Preference pairs: chosen and rejected in one forward pass, log-probabilities at answer tokens only.

What the pair objectives (dpo.py, and the others that learn from `preference` rows) share. A row
is encoded once (data/preference.py): the prompt rendered and tokenised once, then each answer
appended, with labels only on the answer and its end-of-turn token. A micro-batch of P pairs
becomes 2P sequences, chosen_i at index 2i and rejected_i at 2i + 1, packed into padding-free rows
(or padded, with data.packing=false), so both answers of every pair go through the same forward:

    row:          [ x1 y1+ | x1 y1- | x2 y2+ | x2 y2- | ... ]
    sequence_ids: [ 0 .. 0 | 1 .. 1 | 2 .. 2 | 3 .. 3 | ... ]   (-1: padding)

The sequence log-probability of an answer y given its prompt x is the sum over its labelled tokens,

    log pi(y | x) = sum_{t in answer} [ z_t[y_t] - logsumexp(z_t) ],   z_t = the logits before token t,

taken in chunks of labelled positions only (lm.head_chunks): the (2P x length x vocabulary)
logits tensor never exists, and prompt tokens cost no vocabulary projection.

The reference model costs no second copy: it is the same weights with the method switched off
(the method's `disable`), run without gradient; or, with objective.reference=precomputed (and
always for methods that train the base weights, which have no switch), the reference
log-probabilities are computed once on the base model before the method is applied, kept in
`output.dir/reference_logps.safetensors` (written atomically, by rank 0 under torchrun; a resumed run
reads them back, a stale file is computed again), and travel with the examples into each batch as
`ref_logps`. precompute_reference takes the sequences each example has (a pair's two answers here;
kto.py passes an example's answer and its KL sequence), so every objective shares one implementation.

A process left without a pair in a short last micro-batch runs a filler pair with weight 0: it
adds no loss, no metric and no unit, and a zero gradient (DDP and FSDP2 need every process).
"""

from __future__ import annotations

from typing import Callable

import torch

from tunesmith.data.dataset import collate, has_target
from tunesmith.data.packing import collate_packed
from tunesmith.objectives.lm import head_chunks, labelled_states
from tunesmith.objectives.registry import LossOutput, Objective
from tunesmith.train import distributed, faults

# Metrics of every pair objective, each a sum over pairs that the loop divides by the window's pairs.
PAIR_METRICS = ("reward_chosen", "reward_rejected", "margin", "accuracy")


def encode(fields: dict, fmt: str, tokenizer, cfg) -> dict:
    from tunesmith.data.preference import encode_pair

    return encode_pair(fields, tokenizer, cfg.max_seq_len, cfg.system_prompt)


def keeps(example: dict) -> bool:
    """Both answers keep at least one labelled token within data.max_seq_len."""
    return has_target(example["chosen_labels"]) and has_target(example["rejected_labels"])


def pair_sequences(example: dict) -> list[dict]:
    """A pair's two sequences ({input_ids, labels}): chosen, then rejected."""
    return [{"input_ids": example["chosen_ids"], "labels": example["chosen_labels"]},
            {"input_ids": example["rejected_ids"], "labels": example["rejected_labels"]}]


def sequences(examples: list[dict]) -> list[dict]:
    """The 2P sequences of P pairs: chosen_i at 2i, rejected_i at 2i + 1."""
    return [s for e in examples for s in pair_sequences(e)]


def collate_sequences(seqs: list[dict], pad_id: int, pack_len: int = 0) -> dict[str, torch.Tensor]:
    """Sequences ({input_ids, labels}) packed (pack_len > 0) or padded into one forward, with `sequence_ids`:
    the index in `seqs` of the sequence each token belongs to (-1: padding)."""
    if pack_len:
        return collate_packed(seqs, pad_id, pack_len, sequence_ids=True)
    batch = collate(seqs, pad_id)
    rows = torch.arange(len(seqs)).unsqueeze(1).expand_as(batch["input_ids"])  # (S, T)
    batch["sequence_ids"] = torch.where(batch["attention_mask"] == 1, rows, -1)
    return batch


def collate_pairs(examples: list[dict], pad_id: int, pack_len: int = 0) -> dict[str, torch.Tensor]:
    """One micro-batch: the pairs' sequences packed (pack_len > 0) or padded, which sequence each token
    belongs to, and each pair's weight (0 for a filler pair)."""
    batch = collate_sequences(sequences(examples), pad_id, pack_len)
    batch["pair_weight"] = torch.tensor([float(e.get("weight", 1.0)) for e in examples])  # (P,)
    if all("ref_logps" in e for e in examples):  # precomputed: (2P,), in the order of the sequences
        batch["ref_logps"] = torch.tensor([lp for e in examples for lp in e["ref_logps"]], dtype=torch.float32)
    return batch


def count_pairs(batch: dict[str, torch.Tensor]) -> int:
    return int(batch["pair_weight"].sum())


def filler(example: dict) -> dict:
    return {**example, "weight": 0.0}


def answer_logps(model, batch: dict[str, torch.Tensor], n: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(log pi(y | x) per sequence (n,) in float32, labelled tokens per sequence (n,)); n: the batch's sequences,
    by default 2P for P pairs (other objectives, e.g. kto.py, pass their own count)."""
    if n is None:
        n = 2 * batch["pair_weight"].numel()
    states, targets, keep = labelled_states(model, batch)
    owner = batch["sequence_ids"][:, 1:][keep]  # (N,): the token at t + 1 belongs to sequence owner[t]
    sums = states.new_zeros(n, dtype=torch.float32)
    for logits, chunk, start in head_chunks(model, states, targets):
        token_logps = logits.gather(1, chunk.unsqueeze(1)).squeeze(1) - torch.logsumexp(logits, dim=-1)
        sums = sums.index_add(0, owner[start : start + chunk.numel()], token_logps)
    return sums, torch.bincount(owner, minlength=n)


def reference_logps(model, batch: dict[str, torch.Tensor], reference, n: int | None = None) -> torch.Tensor:
    """The reference model's log pi(y | x) per sequence: the same weights inside `reference(model)` (the method
    switched off), without gradient; with no switch (reference None), those the batch carries. n: as answer_logps."""
    if reference is None:
        if "ref_logps" not in batch:
            raise ValueError("a precomputed reference was configured, but the batch carries no ref_logps "
                             "(the objective's prepare step did not run)")
        return batch["ref_logps"]
    with torch.no_grad(), reference(model):
        return answer_logps(model, batch, n)[0]


REFERENCE_FILE = "reference_logps.safetensors"


def uses_precomputed_reference(cfg, method) -> bool:
    """objective.reference=precomputed, or auto with a method that has no switch to turn off."""
    return cfg.reference == "precomputed" or (cfg.reference == "auto" and method is not None and method.disable is None)


@torch.no_grad()
def precompute_reference(model, data, cfg, run_dir, pad_id: int, method=None, batch_size: int = 8,
                         sequences_of: Callable[[dict], list[dict]] = pair_sequences) -> None:
    """Attach the base model's log pi(y|x) of each example's sequences (`sequences_of`, k per example: a pair's
    chosen and rejected answers by default) to every train and validation example as `ref_logps` (k floats),
    computed once before the method is applied and kept in the run directory, keyed by the model and the
    sequences of each split. Under torchrun rank 0 computes and writes the file, then the others read it."""
    from pathlib import Path

    from tunesmith.files import atomic_save_safetensors

    if not uses_precomputed_reference(cfg.objective, method):
        return
    splits = {"train": data.train, "validation": data.validation}
    key = reference_key(cfg.model.name_or_path, splits, sequences_of)
    path = Path(run_dir) / REFERENCE_FILE
    with distributed.main_first():
        stored = read_reference(path, key)
        if stored is None:  # none yet, a stale one (other data or model), or a run killed before writing it
            stored = {name: reference_table(model, examples, pad_id, batch_size, sequences_of)
                      for name, examples in splits.items()}
            if distributed.is_main():
                path.parent.mkdir(parents=True, exist_ok=True)
                atomic_save_safetensors({**stored, "key": torch.tensor(list(key.encode()), dtype=torch.uint8)}, path)
    for name, examples in splits.items():
        for example, logps in zip(examples, stored[name].tolist()):
            example["ref_logps"] = logps


def reference_key(model_name: str, splits: dict[str, list[dict]], sequences_of) -> str:
    """sha256 of the model's name and every token id and label of each split's sequences, split by split."""
    import hashlib
    import json

    tokens = {name: [[s["input_ids"], s["labels"]] for e in examples for s in sequences_of(e)]
              for name, examples in splits.items()}
    return hashlib.sha256(json.dumps([model_name, tokens]).encode()).hexdigest()


def read_reference(path, key: str) -> dict[str, torch.Tensor] | None:
    """The stored tables if `path` holds them for `key`, else None."""
    from tunesmith.files import read_safetensors

    if not path.is_file():
        return None
    stored = read_safetensors(path, "the reference log-probabilities")
    return stored if "key" in stored and bytes(stored["key"].tolist()).decode() == key else None


def reference_table(model, examples: list[dict], pad_id: int, batch_size: int,
                    sequences_of: Callable[[dict], list[dict]] = pair_sequences) -> torch.Tensor:
    """(len(examples), k): log pi(y | x) under `model` (in eval mode) of each example's k sequences."""
    if not examples:
        return torch.zeros((0, 1))
    was_training = model.training
    model.eval()
    rows = []
    for i in range(0, len(examples), batch_size):
        seqs = [s for e in examples[i : i + batch_size] for s in sequences_of(e)]
        rows.append(answer_logps(model, collate_sequences(seqs, pad_id), len(seqs))[0])
        faults.in_reference(len(rows))  # tests: die here, before the file is written
    model.train(was_training)
    return torch.cat(rows).view(len(examples), -1)


def pair_output(losses: torch.Tensor, chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor,
                weight: torch.Tensor, **extra: torch.Tensor) -> LossOutput:
    """(sum of the pairs' losses, pairs, metric sums), filler pairs weighted 0. `extra`: more per-pair
    metrics (P,), e.g. DPO's chosen_logp_drift, summed the same way."""
    w = weight.to(losses.dtype)
    summed = lambda t: float((t.detach().to(w.dtype) * w).sum())
    metrics = {
        "reward_chosen": summed(chosen_rewards),
        "reward_rejected": summed(rejected_rewards),
        "margin": summed(chosen_rewards - rejected_rewards),
        "accuracy": summed((chosen_rewards > rejected_rewards).float()),
        **{name: summed(values) for name, values in extra.items()},
    }
    return (losses * w).sum(), int(w.sum()), metrics


def pair_objective(name: str, loss, extra_metrics: tuple[str, ...] = (), configure=None) -> Objective:
    """An objective over `preference` rows whose loss is a function of the pairs' answer log-probabilities."""
    return Objective(name=name, formats=("preference",), unit="pairs", encode=encode, keeps=keeps,
                     collate=collate_pairs, units=count_pairs, filler=filler, loss=loss,
                     metrics=PAIR_METRICS + extra_metrics, configure=configure)
