"""A model's answers on the test rows, scored by every metric of eval.metrics, with bootstrap intervals.

    score_answers(names, inputs)      -> Evaluation: the scores, and each metric bound to the rows
    compare([A, B, ...], ...)         -> each one's intervals, and each one's paired difference from A
    evaluation.examples(k)            -> the k best and k worst rows by a per-row metric

Nothing here runs a model (evaluate/task.py does), so all of it is tested on strings.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tunesmith.evaluate.metrics import Inputs, Metric, canonical_name, get_metric, is_user_function
from tunesmith.evaluate.metrics.bootstrap import percentile_interval, resampled


class Bound:
    """A registered metric on given rows: their statistics, summed over the rows asked for, then aggregated."""

    def __init__(self, key: str, metric: Metric, inputs: Inputs):
        self.key, self.metric = key, metric
        self.stats = metric.stats(inputs)  # (n, k)

    def values(self, idx: np.ndarray | None = None) -> dict[str, float]:
        rows = self.stats if idx is None else self.stats[idx]
        return {self.key: float(self.metric.aggregate(rows.sum(axis=0)))}

    def row_values(self) -> np.ndarray:
        return np.array([self.metric.aggregate(row) for row in self.stats], dtype=np.float64)


class Recomputed:
    """A user function (module:function) on given rows: called again on every subset of them."""

    def __init__(self, spec: str, inputs: Inputs):
        from tunesmith.evaluate.metrics import user

        self.spec, self.inputs, self.function = spec, inputs, user.load(spec)

    def values(self, idx: np.ndarray | None = None) -> dict[str, float]:
        from tunesmith.evaluate.metrics.user import as_scores

        pick = list if idx is None else (lambda items: [items[i] for i in idx])
        inputs = self.inputs
        return as_scores(self.spec, self.function(pick(inputs.predictions), pick(inputs.references), pick(inputs.rows)))


def needs(names: list[str]) -> set[str]:
    """What the metrics named need from the model: {"predictions"} and/or {"likelihood"}."""
    return {"predictions" if is_user_function(n) else get_metric(n).needs for n in names}


@dataclass
class Evaluation:
    """The scores of one model on the test rows (flat: name -> number, undefined ones left out), and what they
    came from: the answers, the reference log-likelihoods and each metric bound to the rows (absent for scores
    that came from elsewhere, e.g. a reward model's pair accuracy)."""

    scores: dict[str, float]
    inputs: Inputs | None = None
    bound: list[Any] = field(default_factory=list)

    @property
    def rows(self) -> int:
        return len(self.inputs.references) if self.inputs is not None else 0

    def percent(self, key: str) -> bool:
        """Whether score `key` is a share of 0-100 (shown with one decimal): as its metric says; scores from
        elsewhere (a reward model's pair accuracy) are; a user function's are not known to be."""
        for m in self.bound:
            if isinstance(m, Bound) and m.key == key:
                return m.metric.percent
        return not self.bound

    def values(self, idx: np.ndarray | None = None) -> dict[str, float]:
        return {k: v for m in self.bound for k, v in m.values(idx).items()}

    def to_json(self) -> dict:
        """What before.json keeps: the scores, and the answers and likelihoods to score them again."""
        out: dict[str, Any] = {"scores": self.scores}
        if self.inputs is not None:
            out["predictions"] = list(self.inputs.predictions)
            if self.inputs.likelihoods is not None:
                out["likelihoods"] = np.asarray(self.inputs.likelihoods).tolist()
        return out

    def examples(self, k: int) -> list[dict]:
        """The k best and then the k worst rows (no row twice) by the first per-row metric of the answers (a graded
        one first: token_f1, rouge_l, chrf, json_fields), each {rank, metric, value, prompt, reference,
        prediction}; ties keep the rows' order. Where every row scores the same, the first k, ranked "sample"."""
        if self.inputs is None or not k:
            return []
        rankable = [m for m in self.bound if isinstance(m, Bound) and m.metric.needs == "predictions"]
        if not rankable:
            return []
        by = next((m for m in rankable if m.metric.graded), rankable[0])
        values = by.row_values()
        order = [int(i) for i in np.argsort(-values, kind="stable") if np.isfinite(values[i])]
        if len({values[i] for i in order}) <= 1:  # every row scores the same: none is best or worst
            return [self.example(i, "sample", by.key, values[i]) for i in order[:k]]
        best = order[:k]
        worst = [i for i in reversed(order) if i not in best][:k]
        return [self.example(i, rank, by.key, values[i]) for rank, rows in (("best", best), ("worst", worst))
                for i in rows]

    def example(self, i: int, rank: str, metric: str, value: float) -> dict:
        prompts = self.inputs.prompts or []
        return {"rank": rank, "metric": metric, "value": float(value), "prompt": prompts[i] if prompts else "",
                "reference": self.inputs.references[i], "prediction": self.inputs.predictions[i]}


def score_answers(names: list[str], inputs: Inputs) -> Evaluation:
    """Every metric of `names` on the rows of `inputs`; a score undefined on them (nan) is left out."""
    bound = [Recomputed(n, inputs) if is_user_function(n) else Bound(n, get_metric(canonical_name(n)), inputs)
             for n in names]
    evaluation = Evaluation({}, inputs, bound)
    evaluation.scores = {k: v for k, v in evaluation.values().items() if np.isfinite(v)}
    return evaluation


def compare(evaluations: list[Evaluation], resamples: int = 1000, seed: int = 0, level: float = 0.95) -> list[dict]:
    """For each evaluation (all of the same test rows), {"intervals": {score: [low, high]}, "difference": {score:
    {"value": this - first, "interval": [low, high]}}}: percentile intervals over `resamples` bootstrap resamples
    of the rows, the same drawn rows for every evaluation, so the differences are paired (bootstrap.py). The
    first evaluation has no difference; an evaluation without rows (scores from elsewhere) has neither."""
    scored = [e for e in evaluations if e.bound]
    n = scored[0].rows if scored else 0
    if any(e.rows != n for e in scored):
        raise ValueError(f"compared evaluations have {sorted({e.rows for e in scored})} rows; a paired bootstrap "
                         "needs the same rows")
    draws = iter(resampled([e.values for e in scored], n, resamples, seed))
    drawn = [next(draws) if e.bound else {} for e in evaluations]
    out = []
    for i, (evaluation, values) in enumerate(zip(evaluations, drawn)):
        intervals = {k: percentile_interval(values[k], level) for k in evaluation.scores if k in values}
        result: dict[str, Any] = {"intervals": {k: v for k, v in intervals.items() if v is not None}}
        first, first_values = evaluations[0], drawn[0]
        if i > 0 and evaluation.bound and first.bound:
            result["difference"] = {
                k: {"value": evaluation.scores[k] - first.scores[k],
                    "interval": percentile_interval(values[k] - first_values[k], level)}
                for k in evaluation.scores if k in first.scores and k in values and k in first_values}
        out.append(result)
    return out
