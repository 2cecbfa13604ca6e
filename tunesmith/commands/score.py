"""`tunesmith score`: a reward model's score for every row of a file, as plain transformers computes it.

The model is any AutoModelForSequenceClassification folder with one label: output.dir/reward_model of
an `objective.name=reward` run, or a reward model from elsewhere. Rows are encoded exactly as training
encodes them (the prompt rendered with the chat template once, the answer and its end-of-turn token
appended; tunesmith/data/preference.py), and transformers reads the score at each sequence's last token
that is not the pad token, where the reward objective reads it.

    preference rows         both answers scored: score_chosen, score_rejected; pair accuracy printed
    prompt_completion,      the answer scored: score
    unpaired, messages      (messages: the last assistant message is the answer, the turns before it the prompt)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pydantic import Field

from tunesmith.commands.options import add_section_options, resolve_options
from tunesmith.config import Section
from tunesmith.errors import UserError


class ScoreConfig(Section):
    """`tunesmith score` (file section `score:`)."""

    out: str | None = Field(None, description="Write the rows with their scores here as JSONL (default: standard "
                            "output).")
    batch_size: int = Field(16, ge=1, description="Sequences per forward pass.")
    max_seq_len: int = Field(1024, ge=8, description="Longer sequences are cut as in training (the prompt's start "
                             "first).")
    system_prompt: str | None = Field(None, description="System prompt added to rows without one, as data."
                                      "system_prompt does in training.")


def register(subparsers) -> None:
    p = subparsers.add_parser("score", help="score prompt/answer rows with a reward model",
                              description="Score every row of a file with a reward model (an "
                              "AutoModelForSequenceClassification folder, e.g. output.dir/reward_model of an "
                              "objective.name=reward run). Preference rows get both answers scored and the pair "
                              "accuracy printed.")
    p.add_argument("model", help="reward model folder")
    p.add_argument("data", help="rows: preference, prompt_completion, unpaired or messages (.jsonl, .json, .csv, "
                   ".parquet)")
    add_section_options(p, "score", ScoreConfig)
    p.set_defaults(run=_run_score)


def _run_score(args: argparse.Namespace) -> None:
    o: ScoreConfig = resolve_options(args)
    rows, summary = score_file(args.model, args.data, o.batch_size, o.max_seq_len, o.system_prompt)
    lines = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    if o.out:
        from tunesmith.files import atomic_write_text

        atomic_write_text(Path(o.out), lines)
    else:
        sys.stdout.write(lines)
    print(json.dumps(summary), file=sys.stderr)


def score_file(model_dir: str, data: str, batch_size: int = 16, max_seq_len: int = 1024,
               system_prompt: str | None = None) -> tuple[list[dict], dict]:
    """(each row's fields with its score(s), {"rows", "mean_score", and for pairs "pair_accuracy"})."""
    from tunesmith.data.formats import detect_format, validate_rows
    from tunesmith.data.readers import read_rows

    model, tokenizer = load_reward_model(model_dir)
    rows = read_rows(data)
    fmt = detect_format(rows, data)
    if fmt == "text":
        raise UserError(f"{data}: text rows have no prompt and answer to score.")
    validate_rows(rows, fmt, data)
    sequences = [row_sequences(r.fields, fmt, tokenizer, max_seq_len, system_prompt) for r in rows]
    scores = iter(sequence_scores(model, [s for seqs in sequences for s in seqs], tokenizer.pad_token_id, batch_size))
    out = []
    for row, seqs in zip(rows, sequences):
        names = ("score_chosen", "score_rejected") if fmt == "preference" else ("score",)
        out.append({**row.fields, **{name: next(scores) for name in names[: len(seqs)]}})
    return out, summarise(out, fmt)


def summarise(rows: list[dict], fmt: str) -> dict:
    if fmt != "preference":
        return {"rows": len(rows), "mean_score": sum(r["score"] for r in rows) / max(1, len(rows))}
    wins = sum(r["score_chosen"] > r["score_rejected"] for r in rows)
    return {"rows": len(rows), "pair_accuracy": 100.0 * wins / max(1, len(rows)),
            "mean_margin": sum(r["score_chosen"] - r["score_rejected"] for r in rows) / max(1, len(rows))}


def load_reward_model(model_dir: str):
    """(AutoModelForSequenceClassification in eval mode, its tokenizer) from a local folder."""
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    folder = Path(model_dir)
    if not (folder / "config.json").is_file():
        raise UserError(f"{model_dir!r} is not a model folder (no config.json); pass output.dir/reward_model of a "
                        "reward run.")
    config = AutoConfig.from_pretrained(folder)
    if config.num_labels != 1:
        raise UserError(f"{model_dir!r} has {config.num_labels} labels; a reward model has one.")
    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if model.config.pad_token_id is None:
        raise UserError(f"{model_dir!r}: config.json sets no pad_token_id, so transformers cannot tell where each "
                        "sequence ends (set it to the tokenizer's pad token id).")
    return model, tokenizer


def row_sequences(fields: dict, fmt: str, tokenizer, max_seq_len: int, system_prompt: str | None) -> list[list[int]]:
    """The token ids of each answer of a row in its prompt: [chosen, rejected] for a preference row, else [one]."""
    from tunesmith.data.preference import encode_answers, encode_pair
    from tunesmith.data.tokenize import to_messages

    if fmt == "preference":
        pair = encode_pair(fields, tokenizer, max_seq_len, system_prompt)
        return [pair["chosen_ids"], pair["rejected_ids"]]
    messages = to_messages(fields, fmt, system_prompt)
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    prompt_ids, (answer,), _ = encode_answers(messages[:last], [messages[last]["content"]], tokenizer, max_seq_len)
    return [prompt_ids + answer]


def sequence_scores(model, sequences: list[list[int]], pad_id: int, batch_size: int) -> list[float]:
    """The model's score of each sequence, right-padded in batches (transformers finds each one's end)."""
    import torch

    from tunesmith.data.dataset import collate

    scores = []
    with torch.no_grad():
        for i in range(0, len(sequences), batch_size):
            chunk = [{"input_ids": ids, "labels": ids} for ids in sequences[i : i + batch_size]]
            batch = collate(chunk, pad_id)
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            scores += logits[:, 0].float().tolist()
    return scores
