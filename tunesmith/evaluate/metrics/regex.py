"""regex: the share of rows (%) that the pattern eval.regex accepts (Python `re`, searched anywhere).

Without a capturing group: the rows whose answer contains a match,

    regex = 100 * mean_i [ re.search(pattern, prediction_i) ]

for a format check (e.g. `^\\d{4}-\\d{2}-\\d{2}$`). With one: the rows whose answer's first group
equals the reference's first group (or the whole stripped reference, where the pattern does not
match it), for extracting a final answer: `answer: (\\S+)` or GSM8K's `#### (\\-?[0-9.,]+)`.
"""

from __future__ import annotations

import re

from tunesmith.evaluate.metrics import Inputs, mean_metric


def accepted(inputs: Inputs) -> list[float]:
    pattern = re.compile(inputs.options.regex)
    if pattern.groups == 0:
        return [float(pattern.search(p) is not None) for p in inputs.predictions]
    out = []
    for prediction, reference in zip(inputs.predictions, inputs.references):
        got, expected = pattern.search(prediction), pattern.search(reference)
        want = expected.group(1) if expected else reference.strip()
        out.append(float(got is not None and got.group(1) == want))
    return out


METRIC = mean_metric("regex", accepted)
