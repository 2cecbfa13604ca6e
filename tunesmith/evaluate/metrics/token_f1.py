"""token_f1: SQuAD's token F1 (%), the mean over rows of the F1 of the two bags of tokens.

Both texts are normalised as SQuAD does (text.py: lower-case, no punctuation, no articles, single
spaces) and split on whitespace. With c the size of the multiset intersection of the tokens,

    precision = c / |prediction tokens|     recall = c / |reference tokens|
    F1 = 2 * precision * recall / (precision + recall)   (0 when c = 0)

and, as in SQuAD 2.0's script, a row where either side has no token scores 1 if both have none,
else 0.
"""

from __future__ import annotations

from collections import Counter

from tunesmith.evaluate.metrics import mean_metric
from tunesmith.evaluate.metrics.text import squad_tokens


def f1(prediction: str, reference: str) -> float:
    pred, ref = squad_tokens(prediction), squad_tokens(reference)
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


METRIC = mean_metric("token_f1", lambda inputs: [f1(p, r) for p, r in zip(inputs.predictions, inputs.references)],
                     graded=True)
