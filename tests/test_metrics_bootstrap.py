"""Bootstrap intervals and paired differences (tunesmith/evaluate/metrics/bootstrap.py, scoring.compare) on
synthetic data with known answers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import sacrebleu

from tunesmith.config import EvalConfig
from tunesmith.evaluate.metrics import Inputs
from tunesmith.evaluate.metrics.bootstrap import resample_indices
from tunesmith.evaluate.metrics.scoring import compare, score_answers


def bernoulli_answers(rng: np.random.Generator, n: int, p: float) -> tuple[list[str], list[str]]:
    """n rows, each answered right with probability p: exact match is a Bernoulli(p) mean."""
    right = rng.random(n) < p
    return ["yes" if r else "no" for r in right], ["yes"] * n


def evaluation(names, predictions, references, **options):
    return score_answers(names, Inputs(predictions, references, [{} for _ in references], EvalConfig(**options)))


def test_bernoulli_interval_covers_the_truth_with_the_expected_width():
    n, p = 400, 0.3
    predictions, references = bernoulli_answers(np.random.default_rng(1), n, p)
    got = evaluation(["exact_match"], predictions, references)
    low, high = compare([got], resamples=2000, seed=0)[0]["intervals"]["exact_match"]
    assert low <= 100 * p <= high
    expected_width = 100 * 2 * 1.96 * math.sqrt(p * (1 - p) / n)  # the normal approximation: 8.98 points
    assert high - low == pytest.approx(expected_width, rel=0.12)
    assert low < got.scores["exact_match"] < high


def test_bernoulli_intervals_cover_the_truth_about_95_percent_of_the_time():
    rng, p, covered, trials = np.random.default_rng(7), 0.3, 0, 150
    for trial in range(trials):
        predictions, references = bernoulli_answers(rng, 80, p)
        low, high = compare([evaluation(["exact_match"], predictions, references)], 300, trial)[0]["intervals"][
            "exact_match"]
        covered += low <= 100 * p <= high
    assert 0.88 <= covered / trials <= 0.99, covered / trials


def test_identical_answers_differ_by_exactly_zero():
    predictions, references = bernoulli_answers(np.random.default_rng(2), 50, 0.5)
    names = ["exact_match", "token_f1", "bleu", "chrf"]
    before = evaluation(names, predictions, references)
    after = evaluation(names, list(predictions), references)
    difference = compare([before, after], 500, 0)[1]["difference"]
    assert set(difference) == set(names)
    for d in difference.values():
        assert d == {"value": 0.0, "interval": [0.0, 0.0]}


def test_the_difference_is_paired_on_the_same_rows():
    """After fixes 10 of 100 rows and breaks none: every resample's difference is >= 0, so the paired interval
    starts at 0 or above, while the two unpaired intervals overlap."""
    predictions, references = bernoulli_answers(np.random.default_rng(3), 100, 0.5)
    fixed = list(predictions)
    for i in [i for i, p in enumerate(predictions) if p == "no"][:10]:
        fixed[i] = "yes"
    before, after = evaluation(["exact_match"], predictions, references), evaluation(["exact_match"], fixed,
                                                                                         references)
    out = compare([before, after], 1000, 0)
    d = out[1]["difference"]["exact_match"]
    assert d["value"] == pytest.approx(10.0) and 0.0 <= d["interval"][0] < d["interval"][1] <= 20.0
    assert out[0]["intervals"]["exact_match"][1] > out[1]["intervals"]["exact_match"][0]  # unpaired: they overlap


def test_corpus_metrics_are_recomputed_on_each_resample():
    """A resample's BLEU and chrF are sacrebleu's on the drawn rows, not a mean of row scores."""
    predictions = ["the cat sat on the mat", "a dog barked twice", "rain fell all day long", "we went home early"]
    references = ["the cat is on the mat", "the dog barked twice", "rain fell all day", "we went home"]
    got = evaluation(["bleu", "chrf"], predictions, references)
    for idx in list(resample_indices(len(predictions), 5, 0)):
        drawn_p, drawn_r = [predictions[i] for i in idx], [references[i] for i in idx]
        values = got.values(idx)
        assert values["bleu"] == pytest.approx(sacrebleu.corpus_bleu(drawn_p, [drawn_r]).score, abs=1e-9)
        assert values["chrf"] == pytest.approx(sacrebleu.corpus_chrf(drawn_p, [drawn_r]).score, abs=1e-9)


def test_resamples_depend_only_on_seed_and_rows():
    a = [list(i) for i in resample_indices(20, 3, 5)]
    assert a == [list(i) for i in resample_indices(20, 3, 5)] and a != [list(i) for i in resample_indices(20, 3, 6)]
    assert list(resample_indices(0, 3, 5)) == []
    empty = evaluation(["exact_match"], [], [])
    assert empty.scores == {"exact_match": 0.0} and compare([empty], 10, 0) == [{"intervals": {}}]


def test_user_functions_are_called_on_each_resample(tmp_path, monkeypatch):
    (tmp_path / "resampled_metric.py").write_text(
        "calls = []\n"
        "def share_yes(predictions, references, rows):\n"
        "    calls.append(len(predictions))\n"
        "    return 100 * sum(p == 'yes' for p in predictions) / len(predictions)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import resampled_metric

    predictions, references = bernoulli_answers(np.random.default_rng(4), 30, 0.5)
    got = evaluation(["resampled_metric:share_yes", "exact_match"], predictions, references)
    out = compare([got], 40, 0)[0]["intervals"]
    assert resampled_metric.calls == [30] * 41  # once on all rows, then once per resample
    assert out["share_yes"] == out["exact_match"]  # the same statistic on the same drawn rows
