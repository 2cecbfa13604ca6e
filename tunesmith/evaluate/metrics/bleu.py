"""bleu: corpus BLEU (0-100), equal to sacrebleu's `corpus_bleu` with its defaults (13a tokenizer, case kept,
smoothing `exp`, n-grams up to 4, one reference per row).

Each row adds to the corpus sums: c = the prediction's length in tokens, r = the reference's,
and for n = 1..4, m_n = the prediction's n-grams also in the reference (each counted at most as
often as it occurs there) and t_n = the prediction's n-grams. Then

    p_n = m_n / t_n                 (exp smoothing: the k-th order with m_n = 0 gets 1 / (2^k t_n))
    BP  = 1 if c >= r, else exp(1 - r / c)   (0 when c = 0)
    BLEU = 100 * BP * exp( (1/4) * sum_n log p_n )

It is 0 when no n-gram matches at all, and also when the corpus has no n-gram of some order
(every prediction shorter than 4 tokens): sacrebleu's corpus default, effective_order=False.
Papineni et al. (2002); Post (2018) for the reproducible variant.

13a tokenization (mteval-v13a.pl, as sacrebleu's tokenizer_13a): unescape &quot; &amp; &lt;
&gt;, then put spaces around punctuation and symbols, around . and , unless beside a digit, and
after a dash that follows a digit.
"""

from __future__ import annotations

import math
import re
from collections import Counter

import numpy as np

from tunesmith.evaluate.metrics import Inputs, Metric

ORDER = 4
# sacrebleu's TokenizerRegexp, in order.
RULES = [
    (re.compile(r"([\{-\~\[-\` -\&\(-\+\:-\@\/])"), r" \1 "),  # symbols and most punctuation
    (re.compile(r"([^0-9])([\.,])"), r"\1 \2 "),  # period and comma unless preceded by a digit
    (re.compile(r"([\.,])([^0-9])"), r" \1 \2"),  # period and comma unless followed by a digit
    (re.compile(r"([0-9])(-)"), r"\1 \2 "),  # dash when preceded by a digit
]


def tokenize_13a(line: str) -> list[str]:
    line = line.rstrip()  # sacrebleu strips the end of each segment before tokenizing
    line = line.replace("<skipped>", "").replace("-\n", "").replace("\n", " ")
    if "&" in line:
        line = line.replace("&quot;", '"').replace("&amp;", "&").replace("&lt;", "<").replace("&gt;", ">")
    line = f" {line} "
    for pattern, replacement in RULES:
        line = pattern.sub(replacement, line)
    return line.split()


def ngrams(tokens: list[str]) -> Counter:
    return Counter(tuple(tokens[i : i + n]) for n in range(1, ORDER + 1) for i in range(len(tokens) - n + 1))


def row_stats(prediction: str, reference: str) -> list[int]:
    """[c, r, m_1..m_4, t_1..t_4] of one row."""
    hyp, ref = tokenize_13a(prediction), tokenize_13a(reference)
    hyp_counts, ref_counts = ngrams(hyp), ngrams(ref)
    matches, totals = [0] * ORDER, [0] * ORDER
    for gram, count in hyp_counts.items():
        totals[len(gram) - 1] += count
        matches[len(gram) - 1] += min(count, ref_counts.get(gram, 0))
    return [len(hyp), len(ref), *matches, *totals]


def stats(inputs: Inputs) -> np.ndarray:
    rows = [row_stats(p, r) for p, r in zip(inputs.predictions, inputs.references)]
    return np.array(rows, dtype=np.float64).reshape(-1, 2 + 2 * ORDER)


def bleu(sums) -> float:
    c, r = sums[0], sums[1]
    matches, totals = sums[2 : 2 + ORDER], sums[2 + ORDER :]
    if not any(matches):
        return 0.0
    brevity = 1.0 if c >= r else (math.exp(1 - r / c) if c > 0 else 0.0)
    log_precisions, halvings = [], 1.0
    for m, t in zip(matches, totals):
        if t == 0:
            break  # no n-grams of this order or above: their precisions stay 0 (log 0 is floored, so BLEU is 0)
        if m == 0:
            halvings *= 2
            log_precisions.append(math.log(100.0 / (halvings * t)))
        else:
            log_precisions.append(math.log(100.0 * m / t))
    log_precisions += [-9999999999.0] * (ORDER - len(log_precisions))  # sacrebleu's floor of log 0
    return brevity * math.exp(sum(log_precisions) / ORDER)


METRIC = Metric("bleu", stats, bleu)
