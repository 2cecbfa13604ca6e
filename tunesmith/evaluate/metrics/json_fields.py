"""json_fields (alias field_accuracy, the demo task's name): the share (%) of the references' JSON fields that
the answers get right.

Each reference that is a JSON object is flattened to its leaf fields ("address.city",
"items[0].price", see `leaves`); a field is right when the parsed answer has the same value at
the same place (JSON equality: 3 == 3.0, but true is not 1). Over all rows,

    json_fields = 100 * (fields right) / (fields in the references)

so a row with more fields weighs more. Rows whose reference is not a JSON object add nothing;
without any, the score is undefined and left out.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from tunesmith.evaluate.metrics import Inputs, Metric
from tunesmith.evaluate.metrics.json_valid import parse_object


def leaves(value: Any, path: str = "") -> dict[str, Any]:
    """Flatten nested objects and lists to {"a.b[0].c": leaf}, so each fact is scored on its own."""
    if isinstance(value, dict) and (value or not path):  # an empty object at the top has no fields
        named = ((f"{path}.{key}" if path else key, child) for key, child in value.items())
        return {k: v for name, child in named for k, v in leaves(child, name).items()}
    if isinstance(value, list) and value:
        return {k: v for i, child in enumerate(value) for k, v in leaves(child, f"{path}[{i}]").items()}
    return {path: value}


def same(a: Any, b: Any) -> bool:
    """JSON equality: 3 == 3.0, but true is not 1."""
    return a == b and isinstance(a, bool) == isinstance(b, bool)


def row_stats(prediction: str, reference: str) -> tuple[int, int]:
    """(fields of the reference the prediction has right, fields of the reference)."""
    ref = parse_object(reference)
    if ref is None:
        return 0, 0
    expected, got = leaves(ref), leaves(parse_object(prediction) or {})
    return sum(path in got and same(got[path], value) for path, value in expected.items()), len(expected)


def stats(inputs: Inputs) -> np.ndarray:
    rows = [row_stats(p, r) for p, r in zip(inputs.predictions, inputs.references)]
    return np.array(rows, dtype=np.float64).reshape(-1, 2)


METRIC = Metric("json_fields", stats, lambda sums: 100.0 * sums[0] / sums[1] if sums[1] else float("nan"),
                graded=True)
