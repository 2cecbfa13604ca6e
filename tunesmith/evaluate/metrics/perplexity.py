"""perplexity: the model's perplexity of the reference answers, teacher-forced (lower is better).

Each reference answer is appended to its prompt as the assistant's turn (the chat template, as in
training) and scored in one forward pass: log p of each of its tokens, the end-of-turn token
included, given everything before it (evaluate/task.py: answer_likelihoods). Over all rows, with
T the answer tokens,

    perplexity = exp( - (sum over rows and tokens of log p) / T )

a corpus-level, token-weighted mean, so a long answer weighs more than a short one. It judges the
model without generating: what it would have to say, not what it says.
"""

from __future__ import annotations

import math

import numpy as np

from tunesmith.evaluate.metrics import Inputs, Metric


def stats(inputs: Inputs) -> np.ndarray:
    """(sum of log p, tokens) per row."""
    return np.asarray(inputs.likelihoods, dtype=np.float64).reshape(-1, 2)


def perplexity(sums) -> float:
    return math.exp(-sums[0] / sums[1]) if sums[1] else float("nan")


METRIC = Metric("perplexity", stats, perplexity, needs="likelihood", percent=False, higher_is_better=False)
