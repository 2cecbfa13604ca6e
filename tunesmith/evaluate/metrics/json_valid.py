"""json_valid (alias valid_json, the demo task's name): the share of rows (%) whose answer is a JSON object.

    json_valid = 100 * mean_i [ prediction_i parses as a JSON object ]

Strictly: surrounding whitespace is allowed, a code fence or a word of prose around the object is
not, and a JSON value that is not an object (a list, a number) does not count.
"""

from __future__ import annotations

from tunesmith.evaluate.metrics import Inputs, mean_metric, parse_json


def parse_object(text: str) -> dict | None:
    """The JSON object `text` holds, or None (not JSON, or JSON but not an object)."""
    value = parse_json(text)
    return value if isinstance(value, dict) else None


def valid(inputs: Inputs) -> list[float]:
    return [float(parse_object(p) is not None) for p in inputs.predictions]


METRIC = mean_metric("json_valid", valid)
