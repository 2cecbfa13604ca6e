"""chrf: corpus chrF (0-100), equal to sacrebleu's `corpus_chrf` with its defaults (character n-grams up to 6,
no word n-grams, beta 2, case kept, whitespace left out, no epsilon smoothing; one reference per row).

Whitespace is removed from both texts, then for n = 1..6 each row adds to the corpus sums: the
prediction's character n-grams h_n, the reference's r_n, and the matches m_n (each n-gram
counted at most as often as in the other text). A prediction's n-grams count in h_n only when
the reference has n-grams of that order. With the orders where h_n > 0 and r_n > 0 (N of them),

    P = (1/N) sum_n m_n / h_n       R = (1/N) sum_n m_n / r_n
    chrF = 100 * (1 + beta^2) P R / (beta^2 P + R),  beta = 2   (0 when N = 0 or P + R = 0)

Popović (2015), chrF: character n-gram F-score for automatic MT evaluation.
"""

from __future__ import annotations

from collections import Counter

import numpy as np

from tunesmith.evaluate.metrics import Inputs, Metric

ORDER = 6
BETA = 2


def char_ngrams(text: str, n: int) -> Counter:
    return Counter(text[i : i + n] for i in range(len(text) - n + 1))


def row_stats(prediction: str, reference: str) -> list[int]:
    """[h_1, r_1, m_1, ..., h_6, r_6, m_6] of one row."""
    hyp, ref = "".join(prediction.split()), "".join(reference.split())
    out = []
    for n in range(1, ORDER + 1):
        h, r = char_ngrams(hyp, n), char_ngrams(ref, n)
        matched = sum(min(count, r[gram]) for gram, count in h.items() if gram in r)
        out += [sum(h.values()) if r else 0, sum(r.values()), matched]
    return out


def stats(inputs: Inputs) -> np.ndarray:
    rows = [row_stats(p, r) for p, r in zip(inputs.predictions, inputs.references)]
    return np.array(rows, dtype=np.float64).reshape(-1, 3 * ORDER)


def chrf(sums) -> float:
    precision = recall = 0.0
    orders = 0
    for n in range(ORDER):
        h, r, m = sums[3 * n : 3 * n + 3]
        if h > 0 and r > 0:
            precision, recall, orders = precision + m / h, recall + m / r, orders + 1
    if orders == 0:
        return 0.0
    precision, recall = precision / orders, recall / orders
    if precision + recall == 0:
        return 0.0
    factor = BETA**2
    return 100 * (1 + factor) * precision * recall / (factor * precision + recall)


METRIC = Metric("chrf", stats, chrf, graded=True)
