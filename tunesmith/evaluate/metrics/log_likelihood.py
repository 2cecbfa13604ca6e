"""log_likelihood: the mean token log-likelihood of the reference answers (nats per token, teacher-forced).

    log_likelihood = (sum over rows and tokens of log p) / T  =  - log(perplexity)

with the same tokens as perplexity.py (the answer and its end-of-turn token, given the prompt and
the answer so far). 0 is a model certain of every reference token; higher is better.
"""

from __future__ import annotations

from tunesmith.evaluate.metrics import Metric
from tunesmith.evaluate.metrics.perplexity import stats

METRIC = Metric("log_likelihood", stats, lambda sums: sums[0] / sums[1] if sums[1] else float("nan"),
                needs="likelihood", percent=False)
