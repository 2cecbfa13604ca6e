"""One row -> token ids and labels, with everything but the answers masked out.

Raw text is trained on every token (causal LM). Instruction rows become a conversation, are
rendered with the model's own chat template (the format it was tuned on and will be prompted
with), and only the assistant turns carry labels:

    <|im_start|>user\\nExtract ...<|im_end|>\\n<|im_start|>assistant\\n{"name": "Ada"}<|im_end|>\\n
    -100 ...........................................................  ^^^^^^^^^^^^^^^^^^^^^^^^^^
                                                                      answer + end-of-turn token

The end-of-turn token after each answer is labelled too: it is how the model learns to stop.

Where does an answer start and end? Chat templates differ too much to hard-code their markers,
so we ask the template itself: rendering the first i messages with the generation prompt gives
the text up to where answer i starts, and rendering the first i+1 messages gives the text up to
where it ends. The full conversation is tokenized once, with character offsets, and a token is
labelled when it starts inside an answer span. Templates that rewrite earlier turns (so a
prefix does not render as a prefix) are refused rather than masked wrongly.
"""

from __future__ import annotations

from typing import Any

from tunesmith.errors import UserError

IGNORE = -100  # the label cross-entropy skips


def to_messages(fields: dict[str, Any], fmt: str, system_prompt: str | None = None) -> list[dict[str, str]]:
    """A validated instruction row as a chat conversation, with `system_prompt` added if it has no system turn.

    A preference row becomes its prompt and the chosen answer; an unpaired row its prompt and its
    completion, whatever its label."""
    if fmt == "messages":
        messages = [{"role": m["role"], "content": m["content"]} for m in fields["messages"]]
    elif fmt == "alpaca":
        user = fields["instruction"] + (f"\n\n{fields['input']}" if fields.get("input") else "")
        messages = [{"role": "user", "content": user}, {"role": "assistant", "content": fields["output"]}]
    elif fmt == "prompt_completion":
        messages = [
            {"role": "user", "content": fields["prompt"]},
            {"role": "assistant", "content": fields["completion"]},
        ]
    elif fmt in ("preference", "unpaired"):
        answer = fields["chosen" if fmt == "preference" else "completion"]
        messages = as_messages(fields["prompt"], "user") + as_messages(answer, "assistant")
    else:
        raise UserError(f"The {fmt} format has no prompts and answers, so it cannot be turned into a conversation.")
    if system_prompt and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": system_prompt})
    return messages


def as_messages(value: str | list[dict], role: str) -> list[dict[str, str]]:
    """A prompt or answer field: a string is one message from `role`, a list is already messages."""
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    return [{"role": m["role"], "content": m["content"]} for m in value]


def encode_row(
    fields: dict[str, Any],
    fmt: str,
    tokenizer,
    max_seq_len: int,
    train_on_prompt: bool = False,
    system_prompt: str | None = None,
) -> dict[str, Any]:
    """Token ids, labels (IGNORE where not trained on) and whether the row was cut to max_seq_len."""
    if fmt == "text":
        input_ids = encode_text(fields["text"], tokenizer)
        labels = list(input_ids)
    else:
        messages = to_messages(fields, fmt, system_prompt)
        input_ids, labels = encode_conversation(messages, tokenizer, train_on_prompt)
    return {
        "input_ids": input_ids[:max_seq_len],
        "labels": labels[:max_seq_len],
        "truncated": len(input_ids) > max_seq_len,
    }


def encode_text(text: str, tokenizer) -> list[int]:
    """The tokenizer's usual special tokens (a BOS for Llama-style models), then EOS so documents end."""
    ids = list(tokenizer(text, add_special_tokens=True)["input_ids"])
    eos = tokenizer.eos_token_id
    if eos is not None and (not ids or ids[-1] != eos):
        ids.append(eos)
    return ids


def encode_conversation(
    messages: list[dict[str, str]], tokenizer, train_on_prompt: bool = False
) -> tuple[list[int], list[int]]:
    """Render with the chat template; label the tokens that start inside an assistant answer (or all)."""
    text = render(tokenizer, messages)
    spans = [(0, len(text))] if train_on_prompt else assistant_spans(messages, tokenizer, text)
    input_ids, starts = tokenize_with_starts(tokenizer, text, spans)
    labels = [tok if any(a <= s < b for a, b in spans) else IGNORE for tok, s in zip(input_ids, starts)]
    return input_ids, labels


def render(tokenizer, messages: list[dict[str, str]], add_generation_prompt: bool = False) -> str:
    if not getattr(tokenizer, "chat_template", None):
        raise UserError(
            "The tokenizer has no chat template, which instruction data needs (alpaca, prompt_completion, "
            "messages). Use an instruct/chat model, or put the data in the text format."
        )
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except Exception as e:  # jinja2 errors, or a template's own raise_exception("roles must alternate")
        raise UserError(f"The model's chat template rejected this conversation: {e}") from None


def assistant_spans(messages: list[dict[str, str]], tokenizer, text: str) -> list[tuple[int, int]]:
    """Character spans [start, end) of each answer plus its end-of-turn marker in `text`."""
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = render(tokenizer, messages[:i], add_generation_prompt=True)
        through = render(tokenizer, messages[: i + 1])
        fix = "Use data.train_on_prompt=true, the text format, or a model with a simpler template."
        spans.append(answer_span(text, before, through, f"assistant message {i}", fix))
    return spans


def answer_span(text: str, before: str, through: str, which: str, fix: str) -> tuple[int, int]:
    """[start, end) of an answer and its end-of-turn marker in `text`, from two renderings that must be prefixes of
    it: `before`, the conversation up to the answer with the generation prompt, and `through`, up to its end."""
    if not (text.startswith(before) and text.startswith(through) and len(before) < len(through)):
        raise UserError(
            "The chat template's turn boundaries cannot be found: rendering the conversation up to "
            f"{which} is not a prefix of rendering all of it (the template rewrites earlier turns). {fix}"
        )
    # Keep the end-of-turn token but not the newline templates put between turns.
    return len(before), len(through.rstrip())


def tokenize_with_starts(tokenizer, text: str, spans: list[tuple[int, int]]) -> tuple[list[int], list[int]]:
    """Token ids of `text` and the character where each token starts.

    No special tokens are added: the template already writes the ones the model expects (a BOS
    included), and generation tokenizes prompts the same way.
    """
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        return list(enc["input_ids"]), [start for start, _ in enc["offset_mapping"]]
    # Tokenizers without offsets: encode the pieces between span edges separately, which can differ
    # from encoding the whole text only at those edges.
    cuts = sorted({0, len(text), *(edge for span in spans for edge in span)})
    ids, starts = [], []
    for a, b in zip(cuts, cuts[1:]):
        piece = tokenizer(text[a:b], add_special_tokens=False)["input_ids"]
        ids += piece
        starts += [a] * len(piece)
    return ids, starts
