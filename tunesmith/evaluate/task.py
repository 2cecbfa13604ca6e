"""Test cases for the before/after task score: (prompt messages, reference answer) per row."""

from __future__ import annotations

from tunesmith.config import DataConfig
from tunesmith.data.formats import detect_format, validate_rows
from tunesmith.data.readers import read_rows
from tunesmith.data.tokenize import to_messages
from tunesmith.errors import UserError


def test_cases(cfg: DataConfig) -> list[tuple[list[dict], str]]:
    """Every test row split into the conversation before its last answer, and that answer: for preference rows
    the chosen one; unpaired rows count only where their label is true."""
    rows = read_rows(cfg.test)
    fmt = detect_format(rows, cfg.test) if cfg.format == "auto" else cfg.format
    if fmt == "text":
        raise UserError(f"{cfg.test}: the task score needs prompts and answers; text rows have neither.")
    validate_rows(rows, fmt, cfg.test)
    cases = []
    for row in rows:
        if fmt == "unpaired" and not row.fields["label"]:
            continue  # a bad answer is no reference
        messages = to_messages(row.fields, fmt, cfg.system_prompt)
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        cases.append((messages[:last], messages[last]["content"]))
    return cases
