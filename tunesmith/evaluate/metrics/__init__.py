"""Task metrics of the test split, chosen by `eval.metrics` (docs/evaluation.md has the list).

Every metric turns the test rows into per-row sufficient statistics, an (n, k) array, and its
score is a function of their column sums:

    score = aggregate(sum over rows of stats_i)

A mean metric (exact match, token F1, ROUGE-L, ...) has stats_i = (value_i, 1). A corpus-level
one keeps what its formula sums over the corpus: BLEU the n-gram matches, n-gram totals and the
two lengths; chrF the character n-gram counts; perplexity the answer's log-likelihood and token
count. The bootstrap (bootstrap.py) therefore resamples rows, sums their statistics and
aggregates, which for BLEU and chrF is exactly recomputing them on the resampled corpus. A user
function (user.py) has no statistics: it is called again on each resample.

A metric needs either the generated answers (`needs="predictions"`) or the model's
log-likelihood of each reference answer (`needs="likelihood"`, teacher-forced; evaluate/task.py
computes it), so a list of likelihood metrics alone generates nothing.

Adding a metric is one file that defines `METRIC = Metric(...)` and one line in METRICS below.
"""

from __future__ import annotations

import importlib
import json
from dataclasses import dataclass
from typing import Any, Callable

# name -> the module that defines METRIC. Imported on first use: validating a config needs no numpy.
METRICS: dict[str, str] = {
    "exact_match": "tunesmith.evaluate.metrics.exact_match",
    "contains": "tunesmith.evaluate.metrics.contains",
    "token_f1": "tunesmith.evaluate.metrics.token_f1",
    "rouge_l": "tunesmith.evaluate.metrics.rouge_l",
    "bleu": "tunesmith.evaluate.metrics.bleu",
    "chrf": "tunesmith.evaluate.metrics.chrf",
    "json_valid": "tunesmith.evaluate.metrics.json_valid",
    "json_fields": "tunesmith.evaluate.metrics.json_fields",
    "regex": "tunesmith.evaluate.metrics.regex",
    "perplexity": "tunesmith.evaluate.metrics.perplexity",
    "log_likelihood": "tunesmith.evaluate.metrics.log_likelihood",
}

# Other names of the same metric. The demo task's scores have carried these names since the first
# release (summary.json, report.md, the docs), so its defaults keep them.
ALIASES = {"valid_json": "json_valid", "field_accuracy": "json_fields"}

# What a test split gets when eval.metrics is empty (see default_metrics).
JSON_DEFAULTS = ["exact_match", "valid_json", "field_accuracy"]
TEXT_DEFAULTS = ["exact_match", "token_f1", "perplexity"]


@dataclass(frozen=True)
class Inputs:
    """What a metric sees: the rows' answers and references, the rows themselves (their fields as read from
    the test file), the eval options, the reference answers' log-likelihoods ((n, 2): sum of log p over the
    answer's tokens, number of tokens) when a metric needs them, and the prompts (for showing examples)."""

    predictions: list[str]
    references: list[str]
    rows: list[dict]
    options: Any  # tunesmith.config.EvalConfig (normalize, regex)
    likelihoods: Any = None  # numpy (n, 2) or None
    prompts: list[str] | None = None  # the last user message of each row


@dataclass(frozen=True)
class Metric:
    """A metric as sums of per-row statistics. `stats(inputs)` -> (n, k) array; `aggregate(sums (k,))` -> the
    score (nan where undefined, e.g. field accuracy without a JSON reference; an undefined score is left out)."""

    name: str
    stats: Callable[[Inputs], Any]
    aggregate: Callable[[Any], float]
    needs: str = "predictions"  # or "likelihood"
    percent: bool = True  # a share of 0-100 (formatted with one decimal); else a plain number
    graded: bool = False  # per-row values between the extremes, not only 0 or 100: good to rank rows by
    higher_is_better: bool = True


def canonical_name(name: str) -> str:
    return ALIASES.get(name, name)


def is_user_function(name: str) -> bool:
    """`module:function` (a user metric) rather than a registered name."""
    module, sep, function = name.partition(":")
    return bool(sep and module and function)


def check_name(name: str) -> str:
    """`name` if it is a metric eval.metrics accepts; else ValueError naming the known ones."""
    if canonical_name(name) in METRICS or is_user_function(name):
        return name
    known = ", ".join([*METRICS, *ALIASES])
    raise ValueError(f"unknown metric {name!r}; known: {known}, or module:function for your own")


def get_metric(name: str) -> Metric:
    """The registered metric `name` (or alias). User functions are loaded by user.py instead."""
    check_name(name)
    return importlib.import_module(METRICS[canonical_name(name)]).METRIC


def default_metrics(references: list[str]) -> list[str]:
    """eval.metrics left empty: the metrics follow the data. A test split whose every reference answer is a JSON
    object is a JSON-extraction task like the demo task (`tunesmith data demo`) and keeps the demo's metrics and
    names (exact_match, valid_json, field_accuracy); any other split gets exact_match, token_f1 and perplexity."""
    if references and all(isinstance(parse_json(r), dict) for r in references):
        return list(JSON_DEFAULTS)
    return list(TEXT_DEFAULTS)


def parse_json(text: str) -> Any:
    """The JSON value of `text` (surrounding whitespace allowed), or None when it is not JSON."""
    try:
        return json.loads(text.strip())
    except (json.JSONDecodeError, RecursionError):
        return None


# --- helpers of the metric files -------------------------------------------------------------------


def mean_metric(name: str, value: Callable[[Inputs], list[float]], graded: bool = False) -> Metric:
    """A percentage: the mean of a per-row value in [0, 1] computed from the inputs (options included)."""
    import numpy as np

    def stats(inputs: Inputs):
        return np.array([[v, 1.0] for v in value(inputs)], dtype=np.float64).reshape(-1, 2)

    return Metric(name, stats, lambda sums: 100.0 * sums[0] / sums[1] if sums[1] else 0.0, graded=graded)
