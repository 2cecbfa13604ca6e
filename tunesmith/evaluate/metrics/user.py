"""module:function in eval.metrics: a metric of your own.

    def my_metric(predictions: list[str], references: list[str], rows: list[dict]) -> float | dict[str, float]

`rows` are the test rows' fields as read from data.test (every column, so a metric can use one the
prompt does not show). A float is reported under the function's name, a dict under its keys.
The module is imported by name from the Python path, the current folder included. Its score has
no per-row statistics, so the bootstrap calls the function again on each resample of the rows
(eval.bootstrap times): keep it fast, or set eval.bootstrap=0.
"""

from __future__ import annotations

import importlib
import math
import os
import sys
from typing import Callable

from tunesmith.errors import UserError


def load(spec: str) -> Callable:
    """The function `spec` (module:function) names."""
    module_name, _, function_name = spec.partition(":")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.append(os.getcwd())  # the `tunesmith` script does not put the current folder on the path
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise UserError(f"eval.metrics: cannot import {module_name!r} for the metric {spec!r}: {e}") from None
    function = getattr(module, function_name, None)
    if not callable(function):
        raise UserError(f"eval.metrics: {module_name!r} has no function {function_name!r} (metric {spec!r}).")
    return function


def as_scores(spec: str, value) -> dict[str, float]:
    """A user function's result as {name: float}; anything else is the user's error, named."""
    name = spec.partition(":")[2]
    if isinstance(value, dict):
        items = value.items()
    else:
        items = [(name, value)]
    out = {}
    for key, number in items:
        try:
            out[str(key)] = float(number)
        except (TypeError, ValueError):
            raise UserError(f"eval.metrics: {spec} returned {number!r} for {key!r}; a metric function returns a "
                            "number or a dict of numbers.") from None
        if math.isnan(out[str(key)]):
            del out[str(key)]  # undefined on these rows, as a built-in metric may be
    return out
