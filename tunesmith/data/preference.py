"""Preference and unpaired rows -> one prompt's token ids and its answers', labels only on the answers.

A preference row (data/formats.py) holds a prompt and two answers, chosen and rejected; an
unpaired row one answer and a label saying whether it is good. The prompt is rendered once with
the model's chat template and the generation prompt, and tokenised once; each answer is what
rendering the prompt with that answer adds to it: the answer and its end-of-turn marker, without
the newline templates put between turns. Each answer is tokenised on its own and appended to the
prompt's ids:

    |<------------------------- prompt_len tokens ------------------------->|
    <|im_start|>user\\nExtract ...<|im_end|>\\n<|im_start|>assistant\\n         {"name": "Ada"}<|im_end|>   chosen
    <|im_start|>user\\nExtract ...<|im_end|>\\n<|im_start|>assistant\\n         {"name": "Ava"}<|im_end|>   rejected
    -100 ....................................................................  the answer's own ids

So the prompt's ids are the same in both sequences by construction (tokenising each whole text
could merge tokens across the boundary differently per answer), and the two answers are scored
in exactly the same context. Labels are built from lengths, never by looking for special
tokens: SmolLM2's pad token is its end-of-turn token, and a mask built from the pad id would hide
the very token that teaches the model to stop.

Too long for data.max_seq_len: the answer matters more than the start of the prompt, so the
prompt is cut from the left first, down to max(max_seq_len // 2, max_seq_len - answer length)
(the longer answer of a pair), then the answer's end; both answers of a pair keep the same
prompt tokens, and `truncated` says that something was cut.
"""

from __future__ import annotations

from typing import Any

from tunesmith.data.tokenize import IGNORE, answer_span, as_messages, render, to_messages


def encode_pair(fields: dict[str, Any], tokenizer, max_seq_len: int, system_prompt: str | None = None) -> dict:
    """A validated preference row -> {prompt_len, chosen_ids, chosen_labels, rejected_ids, rejected_labels,
    truncated}; the first prompt_len ids of both sequences are the prompt's, and the same."""
    prompt = to_messages(fields, "preference", system_prompt)[:-1]  # without the chosen answer
    prompt_ids, (chosen, rejected), truncated = encode_answers(
        prompt, [fields["chosen"], fields["rejected"]], tokenizer, max_seq_len
    )
    return {
        "prompt_len": len(prompt_ids),
        "chosen_ids": prompt_ids + chosen,
        "chosen_labels": [IGNORE] * len(prompt_ids) + chosen,
        "rejected_ids": prompt_ids + rejected,
        "rejected_labels": [IGNORE] * len(prompt_ids) + rejected,
        "margin": float(fields.get("margin") or 0.0),  # read by the reward model only
        "truncated": truncated,
    }


def encode_unpaired(fields: dict[str, Any], tokenizer, max_seq_len: int, system_prompt: str | None = None) -> dict:
    """A validated unpaired row -> {prompt_len, input_ids, labels, label, truncated}; `label` is the row's
    true (a good answer) or false."""
    prompt = to_messages(fields, "unpaired", system_prompt)[:-1]  # without the completion
    prompt_ids, (answer,), truncated = encode_answers(prompt, [fields["completion"]], tokenizer, max_seq_len)
    return {
        "prompt_len": len(prompt_ids),
        "input_ids": prompt_ids + answer,
        "labels": [IGNORE] * len(prompt_ids) + answer,
        "label": bool(fields["label"]),
        "truncated": truncated,
    }


def encode_answers(
    prompt: list[dict[str, str]], answers: list, tokenizer, max_seq_len: int
) -> tuple[list[int], list[list[int]], bool]:
    """(the prompt's ids, each answer's ids, whether anything was cut), fitted to max_seq_len together."""
    before = render(tokenizer, prompt, add_generation_prompt=True)
    prompt_ids = token_ids(tokenizer, before)
    answer_ids = [token_ids(tokenizer, continuation(tokenizer, prompt, before, a)) for a in answers]
    keep = prompt_kept(len(prompt_ids), max(map(len, answer_ids)), max_seq_len)
    room = max_seq_len - keep
    truncated = keep < len(prompt_ids) or any(len(ids) > room for ids in answer_ids)
    return prompt_ids[len(prompt_ids) - keep :], [ids[:room] for ids in answer_ids], truncated


def continuation(tokenizer, prompt: list[dict[str, str]], before: str, answer) -> str:
    """What rendering `prompt` with `answer` (a string or a list holding the assistant message) adds to `before`,
    the prompt rendered with the generation prompt: the answer and its end-of-turn marker."""
    full = render(tokenizer, prompt + as_messages(answer, "assistant"))
    fix = "Use a model with a simpler template."
    start, end = answer_span(full, before, full, "the answer", fix)
    return full[start:end]


def prompt_kept(prompt_len: int, answer_len: int, max_seq_len: int) -> int:
    """How many of the prompt's last tokens are kept: all if the prompt and the (longest) answer fit, else
    at most max(max_seq_len // 2, max_seq_len - answer_len)."""
    if prompt_len + answer_len <= max_seq_len:
        return prompt_len
    return min(prompt_len, max(max_seq_len // 2, max_seq_len - answer_len))


def token_ids(tokenizer, text: str) -> list[int]:
    """No special tokens added: the template already writes the ones the model expects (a BOS included)."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])
