"""exact_match: the share of rows (%) whose answer equals the reference.

    exact_match = 100 * mean_i [ norm(prediction_i) == norm(reference_i) ]

norm strips surrounding whitespace and applies the steps listed in eval.normalize (text.py:
case, punctuation, articles, whitespace; all four are SQuAD's exact match). The default, none,
is a strict comparison, the demo task's: `{"age": 34}` and `{"age":34}` differ.
"""

from __future__ import annotations

from tunesmith.evaluate.metrics import Inputs, mean_metric
from tunesmith.evaluate.metrics.text import normalize


def matches(inputs: Inputs) -> list[float]:
    steps = inputs.options.normalize
    return [float(normalize(p, steps) == normalize(r, steps)) for p, r in zip(inputs.predictions, inputs.references)]


METRIC = mean_metric("exact_match", matches)
