"""Read a data file into rows, each remembering where it came from.

Every later error about a row (a missing field, a bad role, a template that cannot be applied)
names the file and the place in it, so a row carries its location from the start: the 1-based
line for JSON lines and CSV, the 1-based row for a JSON array or a Parquet file.

We parse JSON and CSV ourselves rather than through `datasets.load_dataset`: it reports a broken
line without its number, infers column types (a CSV cell "007" would become 7), and writes a
cache and a progress bar on every read. Parquet is read with pyarrow, the reader `datasets`
itself uses (and depends on), without that cache.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunesmith.errors import UserError

SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")


@dataclass
class Row:
    """One record of a data file: its fields and where it is (`line 7` or `row 7`)."""

    fields: dict[str, Any]
    line: int
    unit: str = "line"

    @property
    def location(self) -> str:
        return f"{self.unit} {self.line}"


def read_rows(path: str | Path) -> list[Row]:
    """All rows of a .jsonl, .json, .csv or .parquet file; a UserError names what is wrong and where."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"Data file {str(p)!r} does not exist.")
    suffix = p.suffix.lower()
    if suffix not in SUFFIXES:
        raise UserError(f"Data file {str(p)!r} has an unknown extension; use one of {', '.join(SUFFIXES)}.")
    if suffix == ".parquet":
        rows = _read_parquet(p)
    else:
        text = _read_text(p)
        if suffix == ".csv":
            rows = _read_csv(p, text)
        elif suffix == ".json":
            rows = _read_json(p, text)
        else:
            rows = _read_json_lines(p, text)
    if not rows:
        raise UserError(f"Data file {str(p)!r} holds no rows.")
    return rows


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")  # -sig: tolerate the byte-order mark some editors write
    except UnicodeDecodeError as e:
        raise UserError(f"Data file {str(path)!r} is not UTF-8 text (bad byte at offset {e.start}).") from None


def _read_json_lines(path: Path, text: str) -> list[Row]:
    """One JSON object per line; blank lines are skipped, so a trailing newline is harmless.

    Lines are split at "\n" only: str.splitlines would also split at U+2028 and other characters
    that may stand unescaped inside a JSON string.
    """
    rows = []
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path} line {number}: not valid JSON ({e.msg} at column {e.colno}).") from None
        rows.append(Row(_as_object(value, path, f"line {number}"), number, "line"))
    return rows


def _read_json(path: Path, text: str) -> list[Row]:
    """A .json file is either one JSON array of objects or, as often happens, JSON lines."""
    if not text.lstrip().startswith("["):
        return _read_json_lines(path, text)
    try:
        values = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{path} line {e.lineno}: not valid JSON ({e.msg} at column {e.colno}).") from None
    return [Row(_as_object(v, path, f"row {i}"), i, "row") for i, v in enumerate(values, start=1)]


def _read_csv(path: Path, text: str) -> list[Row]:
    """A header row, then one row per record; every cell stays a string, exactly as written."""
    reader = csv.reader(io.StringIO(text, newline=""))  # newline="": the csv module handles \r\n itself
    try:
        header = next(reader, None)
        if header is None:
            return []
        rows = []
        start = reader.line_num + 1
        for cells in reader:
            if any(c.strip() for c in cells):
                if len(cells) != len(header):
                    raise UserError(f"{path} line {start}: {len(cells)} cells, but the header has {len(header)}.")
                rows.append(Row(dict(zip(header, cells)), start, "line"))
            start = reader.line_num + 1  # a quoted cell may span lines: the next record starts here
    except csv.Error as e:
        raise UserError(f"{path} line {reader.line_num}: not valid CSV ({e}).") from None
    return rows


def _read_parquet(path: Path) -> list[Row]:
    import pyarrow.parquet as pq

    try:
        records = pq.read_table(path).to_pylist()
    except Exception as e:  # pyarrow raises several types for a damaged file
        raise UserError(f"Data file {str(path)!r} is not a readable Parquet file ({e}).") from None
    return [Row(fields, i, "row") for i, fields in enumerate(records, start=1)]


def _as_object(value: Any, path: Path, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise UserError(f"{path} {where}: expected a JSON object with named fields, got {json_kind(value)}.")
    return value


def json_kind(value: Any) -> str:
    """The JSON name of a value's type, for error messages written in the user's terms."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    return "an array" if isinstance(value, list) else "an object"
