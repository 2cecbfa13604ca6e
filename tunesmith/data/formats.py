"""The row formats, how one is recognised, and what makes a row valid.

    text               {"text": "..."}                                    every token is trained on
    alpaca             {"instruction", "input" (optional), "output"}      the output is trained on
    prompt_completion  {"prompt", "completion"}                           the completion is trained on
    messages           {"messages": [{"role", "content"}, ...]}           every assistant turn is trained on
    preference         {"prompt", "chosen", "rejected"}                   a better and a worse answer (DPO ...)
    unpaired           {"prompt", "completion", "label": true|false}      one answer, good or bad (KTO)
    prompt             {"prompt", any other fields}                       online RL (GRPO): the model answers,
                                                                          the rewards score (other fields go to them)

In the last two, the prompt is a string (one user message) or a conversation ending with a user
message, and each answer a string or, as in TRL's conversational format, a list holding the one
assistant message: {"prompt": [{"role": "user", ...}], "chosen": [{"role": "assistant", ...}], ...}.

Rows are checked before any tokenizer or model is touched, so a typo on line 7 costs a second,
not a model load. The check reports up to MAX_PROBLEMS problems at once: fixing a file one
error per run is slow, and a hundred copies of the same error hide the first one.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Callable

from tunesmith.data.readers import Row
from tunesmith.errors import UserError

FORMATS = {
    "text": "text",
    "alpaca": "instruction, input (optional), output",
    "prompt_completion": "prompt, completion",
    "messages": "messages: [{role, content}, ...]",
    "preference": "prompt, chosen, rejected (strings or message lists), margin (optional number)",
    "unpaired": "prompt, completion, label (true or false)",
    "prompt": "prompt (a string or message list), any other fields for the rewards",
}
ROLES = ("system", "user", "assistant")
MAX_PROBLEMS = 5


def detect_format(rows: list[Row], path: str | Path) -> str:
    """The format whose fields the first row has; messages wins over alpaca over preference and unpaired over
    prompt_completion over prompt (a prompt without an answer) over text."""
    if not rows:
        raise UserError(f"{path}: no rows, so the data format cannot be detected.")
    fields = rows[0].fields
    if "messages" in fields:
        return "messages"
    if "instruction" in fields and "output" in fields:
        return "alpaca"
    if "prompt" in fields and "chosen" in fields and "rejected" in fields:
        return "preference"
    if "prompt" in fields and "completion" in fields and "label" in fields:
        return "unpaired"
    if "prompt" in fields and "completion" in fields:
        return "prompt_completion"
    if "prompt" in fields:
        return "prompt"
    if "text" in fields:
        return "text"
    known = "; ".join(f"{name} ({needs})" for name, needs in FORMATS.items())
    seen = ", ".join(sorted(fields)) or "none"
    raise UserError(
        f"{path} {rows[0].location}: cannot tell the data format from its fields ({seen}). "
        f"Known formats: {known}. Rename the fields or set data.format."
    )


def validate_rows(rows: list[Row], fmt: str, path: str | Path) -> None:
    """Raise one UserError listing the first problems in `rows`, or return if every row is valid."""
    if fmt not in FORMATS:
        raise UserError(f"Unknown data format {fmt!r}; known formats: {', '.join(FORMATS)}.")
    check = CHECKS[fmt]
    problems, bad_rows = [], 0
    for row in rows:
        found = check(row.fields)
        if found:
            bad_rows += 1
            problems += [f"{path} {row.location}: {p}" for p in found]
    if not problems:
        return
    listed = problems[:MAX_PROBLEMS]
    more = len(problems) - len(listed)
    tail = [f"... and {more} more problem(s)"] if more else []
    head = [] if len(problems) == 1 else [f"{bad_rows} malformed {fmt} row(s) in {path}:"]
    raise UserError("\n".join(head + listed + tail))


def shown(value: Any) -> str:
    """A value as it looked in the file (JSON), cut short."""
    text = json.dumps(value, ensure_ascii=False, default=str)
    return text if len(text) <= 60 else text[:57] + "..."


def _string(fields: dict, name: str, required: bool = True, non_empty: bool = True) -> list[str]:
    if name not in fields or fields[name] is None:
        return [f'missing field "{name}"'] if required else []
    value = fields[name]
    if not isinstance(value, str) or (non_empty and not value.strip()):
        kind = "a non-empty string" if non_empty else "a string"
        return [f'field "{name}" must be {kind} (got {shown(value)})']
    return []


def check_text(fields: dict) -> list[str]:
    return _string(fields, "text")


def check_alpaca(fields: dict) -> list[str]:
    optional_input = _string(fields, "input", required=False, non_empty=False)
    return _string(fields, "instruction") + optional_input + _string(fields, "output")


def check_prompt_completion(fields: dict) -> list[str]:
    return _string(fields, "prompt") + _string(fields, "completion")


def check_messages(fields: dict) -> list[str]:
    """Roles known; contents strings; system only first; a user turn before any answer; at least one answer."""
    messages = fields.get("messages")
    if "messages" not in fields:
        return ['missing field "messages"']
    if not isinstance(messages, list) or not messages:
        return [f'field "messages" must be a non-empty list of {{role, content}} objects (got {shown(messages)})']
    problems = []
    for i, message in enumerate(messages):
        problems += _check_message(i, message)
    if problems:
        return problems
    roles = [m["role"] for m in messages]
    if "system" in roles[1:]:
        problems.append(f'messages[{roles.index("system", 1)}]: a system message may only come first')
    if "assistant" not in roles:
        problems.append("messages: no assistant message, so there is nothing to train on")
    elif roles.index("assistant") < (roles.index("user") if "user" in roles else len(roles)):
        problems.append("messages: an assistant message comes before any user message")
    return problems


def check_preference(fields: dict) -> list[str]:
    """A prompt and two answers; answers that are the same text teach no preference."""
    problems = _prompt(fields) + _answer(fields, "chosen") + _answer(fields, "rejected") + _margin(fields)
    if not problems and answer_text(fields["chosen"]) == answer_text(fields["rejected"]):
        problems.append('fields "chosen" and "rejected" are the same answer, so there is no preference to learn')
    return problems


def _margin(fields: dict) -> list[str]:
    """An optional number: how much better chosen is than rejected (the reward model's margin)."""
    m = fields.get("margin")
    if m is None or (isinstance(m, (int, float)) and not isinstance(m, bool) and math.isfinite(m)):
        return []
    return [f'field "margin" must be a finite number when given (got {shown(m)})']


def check_unpaired(fields: dict) -> list[str]:
    return _prompt(fields) + _answer(fields, "completion") + _boolean(fields, "label")


# Keywords a reward function is called with (tunesmith/rl/rewards.py), so no column may have these names.
REWARD_KEYWORDS = ("prompts", "completions", "completion_ids", "trainer_state")


def check_prompt(fields: dict) -> list[str]:
    """A prompt to answer (a string, or a conversation ending with the user message); the other fields go to the
    rewards as keyword lists, so none may be named like the call's own keywords."""
    taken = [name for name in REWARD_KEYWORDS if name in fields]
    return _prompt(fields) + [f'field "{name}" clashes with a keyword of the reward call (prompts, completions, '
                              "...); rename the column" for name in taken]


def answer_text(value: str | list[dict]) -> str:
    """A validated answer field (a string, or a list holding the assistant message) as its text."""
    return value if isinstance(value, str) else value[0]["content"]


def _prompt(fields: dict) -> list[str]:
    """A non-empty string, or a conversation that ends with the user message to answer."""
    messages = fields.get("prompt")
    if not isinstance(messages, list):
        return _string_or_list(fields, "prompt")
    if not messages:
        return ['field "prompt" must be a non-empty string or a non-empty list of {role, content} messages (got [])']
    problems = [p for i, message in enumerate(messages) for p in _check_message(i, message, "prompt")]
    if problems:
        return problems
    roles = [m["role"] for m in messages]
    if "system" in roles[1:]:
        problems.append(f'prompt[{roles.index("system", 1)}]: a system message may only come first')
    if roles[-1] != "user":
        problems.append(f'prompt: the last message must be the user message to answer (got role "{roles[-1]}")')
    return problems


def _answer(fields: dict, name: str) -> list[str]:
    """A non-empty string, or a list holding exactly one assistant message (the conversation is in "prompt")."""
    messages = fields.get(name)
    if not isinstance(messages, list):
        return _string_or_list(fields, name)
    problems = [p for i, message in enumerate(messages) for p in _check_message(i, message, name)]
    if problems:
        return problems
    roles = [m["role"] for m in messages]
    for i, role in enumerate(roles):
        if role != "assistant":
            return [f'{name}[{i}]: a {role} message; "{name}" holds only the answer (earlier turns go in "prompt")']
    if len(roles) != 1:
        return [f'field "{name}" must hold exactly one assistant message, the answer (got {len(roles)})']
    return []


def _string_or_list(fields: dict, name: str) -> list[str]:
    if name not in fields or fields[name] is None or isinstance(fields[name], str):
        return _string(fields, name)
    return [f'field "{name}" must be a non-empty string or a list of {{role, content}} messages '
            f"(got {shown(fields[name])})"]


def _boolean(fields: dict, name: str) -> list[str]:
    if name not in fields or fields[name] is None:
        return [f'missing field "{name}"']
    value = fields[name]
    if isinstance(value, bool):
        return []
    hint = " (a string: CSV cells always are, so use .jsonl or .parquet)" if isinstance(value, str) else ""
    return [f'field "{name}" must be true or false (got {shown(value)}){hint}']


def _check_message(i: int, message: Any, field: str = "messages") -> list[str]:
    where = f"{field}[{i}]"
    if not isinstance(message, dict):
        return [f"{where} must be an object with role and content (got {shown(message)})"]
    role = message.get("role")
    if role not in ROLES:
        return [f'{where}: field "role" must be one of {", ".join(ROLES)} (got {shown(role)})']
    content = message.get("content")
    if not isinstance(content, str):
        return [f'{where}: field "content" must be a string (got {shown(content)})']
    if role == "assistant" and not content.strip():
        return [f"{where}: an assistant message must not be empty"]
    return []


CHECKS: dict[str, Callable[[dict], list[str]]] = {
    "text": check_text,
    "alpaca": check_alpaca,
    "prompt_completion": check_prompt_completion,
    "messages": check_messages,
    "preference": check_preference,
    "unpaired": check_unpaired,
    "prompt": check_prompt,
}
