"""contains: the share of rows (%) whose answer contains the reference.

    contains = 100 * mean_i [ norm(reference_i) is a substring of norm(prediction_i) ]

With norm as for exact_match (eval.normalize). For answers that are right but wordy ("The capital
is Paris." for "Paris"). An empty reference is contained in every answer.
"""

from __future__ import annotations

from tunesmith.evaluate.metrics import Inputs, mean_metric
from tunesmith.evaluate.metrics.text import normalize


def contained(inputs: Inputs) -> list[float]:
    steps = inputs.options.normalize
    return [float(normalize(r, steps) in normalize(p, steps)) for p, r in zip(inputs.predictions, inputs.references)]


METRIC = mean_metric("contains", contained)
