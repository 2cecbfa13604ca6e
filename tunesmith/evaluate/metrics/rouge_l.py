"""rouge_l: ROUGE-L F-measure (%), the mean over rows; equal to rouge-score's `rougeL` (RougeScorer defaults).

Tokens: the text lower-cased, every run of characters other than a-z and 0-9 turned into a
space, split (rouge-score's default tokenizer; no stemming, as its default use_stemmer=False).
Letters outside a-z are separators too, as in rouge-score: "café" gives the token "caf". With
LCS the length of the longest common subsequence of the two token lists,

    precision = LCS / |prediction tokens|     recall = LCS / |reference tokens|
    F = 2 * precision * recall / (precision + recall)   (0 when both are 0)

A row where either side has no token scores 0 (rouge-score's choice, even when both are empty).
"""

from __future__ import annotations

import re

from tunesmith.evaluate.metrics import mean_metric

SEPARATORS = re.compile(r"[^a-z0-9]+")


def tokens(text: str) -> list[str]:
    return SEPARATORS.sub(" ", text.lower()).split()


def lcs_length(a: list[str], b: list[str]) -> int:
    """Longest common subsequence by dynamic programming, one row of the table at a time."""
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def rouge_l(prediction: str, reference: str) -> float:
    pred, ref = tokens(prediction), tokens(reference)
    if not pred or not ref:
        return 0.0
    lcs = lcs_length(ref, pred)
    precision, recall = lcs / len(pred), lcs / len(ref)
    return 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0


METRIC = mean_metric("rouge_l", lambda inputs: [rouge_l(p, r) for p, r in zip(inputs.predictions, inputs.references)],
                     graded=True)
