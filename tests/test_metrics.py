"""The task metrics (tunesmith/evaluate/metrics/) on fixed strings: BLEU and chrF equal sacrebleu's corpus scores,
ROUGE-L equals rouge-score's rougeL, token F1 and exact match follow SQuAD; edge cases included (empty strings,
Unicode, no overlap). sacrebleu and rouge-score are test-only references: tunesmith never imports them."""

from __future__ import annotations

import math

import numpy as np
import pytest
import sacrebleu
from rouge_score import rouge_scorer

from tunesmith.config import EvalConfig, load_config
from tunesmith.errors import UserError
from tunesmith.evaluate.metrics import Inputs, default_metrics
from tunesmith.evaluate.metrics.scoring import score_answers


def scores(names, predictions, references, likelihoods=None, rows=None, **options):
    inputs = Inputs(list(predictions), list(references), rows or [{} for _ in references], EvalConfig(**options),
                    likelihoods)
    return score_answers(names, inputs).scores


CORPORA = {  # name -> (predictions, references)
    "plain": (["The cat sat on the mat.", "A quick brown fox jumps over the lazy dog!", "It rained all day."],
              ["The cat is on the mat.", "The quick brown fox jumped over the lazy dog.", "It rained all day long."]),
    "empty prediction": (["", "the same words here and there"], ["some reference", "the same words here and there"]),
    "all empty": (["", ""], ["", ""]),
    "no overlap": (["abc def ghi"], ["xyz uvw rst"]),
    "unicode": (["Héllo wörld, ça va ? 日本語のテキストです。", "Ünïcödé — “quotes” …"],
                ["Hello world, ça va? 日本語のテキスト。", "Unicode – \"quotes\" ..."]),
    "13a escapes and numbers": (["It costs $4.50 - or 3-4 euros & more, 1,000.5 in all.", "x < y > z"],
                                ["It costs $4.50, or 3-4 euros &amp; more, 1,000.5 total.", "x &lt; y &gt; z"]),
    "short (no 4-grams)": (["a b", "c d e"], ["a b", "c d e"]),
    "multi-line": (["first line\nsecond line-\nbroken", "tabs\tand  spaces  "], ["first line second linebroken",
                                                                                "tabs and spaces"]),
}


@pytest.mark.parametrize("corpus", sorted(CORPORA))
def test_bleu_and_chrf_equal_sacrebleu_corpus_scores(corpus):
    predictions, references = CORPORA[corpus]
    ours = scores(["bleu", "chrf"], predictions, references)
    assert ours["bleu"] == pytest.approx(sacrebleu.corpus_bleu(predictions, [references]).score, abs=1e-9)
    assert ours["chrf"] == pytest.approx(sacrebleu.corpus_chrf(predictions, [references]).score, abs=1e-9)


def test_bleu_is_corpus_level_not_a_mean_of_sentences():
    predictions, references = CORPORA["plain"]
    corpus = scores(["bleu"], predictions, references)["bleu"]
    mean = np.mean([scores(["bleu"], [p], [r])["bleu"] for p, r in zip(predictions, references)])
    assert corpus != pytest.approx(mean)


@pytest.mark.parametrize("corpus", sorted(CORPORA))
def test_rouge_l_equals_rouge_score(corpus):
    predictions, references = CORPORA[corpus]
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    expected = 100 * np.mean([scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(predictions, references)])
    assert scores(["rouge_l"], predictions, references)["rouge_l"] == pytest.approx(expected, abs=1e-9)


def test_token_f1_follows_squad():
    # normalised: "cat sat" vs "cat sat down": precision 1, recall 2/3, F1 0.8
    assert scores(["token_f1"], ["The Cat sat!"], ["a cat sat down"])["token_f1"] == pytest.approx(80.0)
    assert scores(["token_f1"], ["the"], ["a"])["token_f1"] == 100.0  # both empty after normalising: 1
    assert scores(["token_f1"], [""], ["Paris"])["token_f1"] == 0.0
    assert scores(["token_f1"], ["Lyon"], ["Paris"])["token_f1"] == 0.0
    # repeated tokens count as often as both sides have them: common {paris: 1}; p = 1/2, r = 1
    assert scores(["token_f1"], ["Paris Paris"], ["Paris"])["token_f1"] == pytest.approx(100 * 2 / 3)
    # Unicode punctuation goes too (¿, ?, «»), letters stay
    assert scores(["token_f1"], ["«¿Dónde está?»"], ["dónde está"])["token_f1"] == 100.0
    assert scores(["token_f1"], ["x", "Paris"], ["x", "Paris"])["token_f1"] == 100.0


def test_exact_match_and_contains_normalise_as_configured():
    predictions, references = ["  The answer: Paris. ", "paris"], ["the answer: Paris.", "Paris"]
    assert scores(["exact_match"], predictions, references)["exact_match"] == 0.0  # strict by default
    assert scores(["exact_match"], predictions, references, normalize=["case"])["exact_match"] == 100.0
    squad = ["case", "punctuation", "articles", "whitespace"]
    assert scores(["exact_match"], ["An  answer:Paris"], ["answer paris"], normalize=squad)["exact_match"] == 0.0
    assert scores(["exact_match"], ["The answer: Paris!"], ["answer  paris"], normalize=squad)["exact_match"] == 100.0
    assert scores(["exact_match"], ["ÉTÉ"], ["été"], normalize=["case"])["exact_match"] == 100.0
    found = scores(["contains"], ["It is Paris, France.", "Lyon", "anything"], ["paris", "Paris", ""],
                   normalize=["case"])
    assert found["contains"] == pytest.approx(200 / 3)  # an empty reference is contained in every answer


def test_json_metrics_keep_the_demo_names_and_numbers():
    ref = '{"name": "Ada", "age": 36}'
    predictions = [ref, '{"name": "Ada", "age": 37}', "Sure! " + ref, "[1, 2]"]
    old = scores(["exact_match", "valid_json", "field_accuracy"], predictions, [ref] * 4)
    assert old == {"exact_match": 25.0, "valid_json": 50.0, "field_accuracy": pytest.approx(100 * 3 / 8)}
    new = scores(["json_valid", "json_fields"], predictions, [ref] * 4)
    assert new == {"json_valid": old["valid_json"], "json_fields": old["field_accuracy"]}
    assert scores(["json_fields"], ["{}"], ["plain text"]) == {}  # no JSON reference: undefined, left out


def test_regex_checks_a_format_or_compares_the_captured_answer():
    predictions, references = ["2024-05-01", "May 1st", "The answer: 42", "answer: 41"], ["", "", "#", "answer: 42"]
    assert scores(["regex"], predictions, references, regex=r"^\d{4}-\d{2}-\d{2}$")["regex"] == 25.0
    # group: the answer's capture against the reference's capture, or the whole reference where it has none
    extracted = scores(["regex"], ["The answer: 42", "answer: 41", "answer: 7"], ["answer: 42", "answer: 42", "7"],
                       regex=r"answer: (\d+)")
    assert extracted["regex"] == pytest.approx(200 / 3)


def test_likelihood_metrics_are_token_weighted():
    likelihoods = np.array([[-2.0, 2.0], [-6.0, 3.0]])  # (sum log p, tokens) per row
    got = scores(["perplexity", "log_likelihood"], ["", ""], ["a", "b"], likelihoods=likelihoods)
    assert got["log_likelihood"] == pytest.approx(-8.0 / 5)
    assert got["perplexity"] == pytest.approx(math.exp(8.0 / 5))


def test_user_function_metric(tmp_path, monkeypatch):
    (tmp_path / "my_metrics.py").write_text(
        "def length_ratio(predictions, references, rows):\n"
        "    return sum(len(p) for p in predictions) / max(1, sum(len(r) for r in references))\n"
        "def by_topic(predictions, references, rows):\n"
        "    hits = [p == r for p, r in zip(predictions, references)]\n"
        "    return {t: 100 * sum(h for h, row in zip(hits, rows) if row['topic'] == t) / "
        "sum(row['topic'] == t for row in rows) for t in sorted({row['topic'] for row in rows})}\n"
        "def broken(predictions, references, rows):\n"
        "    return 'high'\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    rows = [{"topic": "a"}, {"topic": "a"}, {"topic": "b"}]
    got = scores(["my_metrics:length_ratio", "my_metrics:by_topic", "exact_match"], ["xx", "y", "z"], ["x", "y", "w"],
                 rows=rows)
    assert got == {"length_ratio": pytest.approx(4 / 3), "a": 50.0, "b": 0.0, "exact_match": pytest.approx(100 / 3)}
    with pytest.raises(UserError, match="returned 'high'"):
        scores(["my_metrics:broken"], ["x"], ["x"])
    with pytest.raises(UserError, match="has no function"):
        scores(["my_metrics:missing"], ["x"], ["x"])


def test_defaults_follow_the_data():
    assert default_metrics(['{"a": 1}', ' {"b": [2]} ']) == ["exact_match", "valid_json", "field_accuracy"]
    assert default_metrics(['{"a": 1}', "Paris"]) == ["exact_match", "token_f1", "perplexity"]
    assert default_metrics(["[1, 2]"]) == ["exact_match", "token_f1", "perplexity"]  # JSON, but not an object


@pytest.mark.parametrize("override, message", [
    ("eval.metrics=[blue]", "unknown metric 'blue'"),
    ("eval.metrics=[regex]", "set eval.regex"),
    ("eval.metrics=[valid_json, json_valid]", "listed twice"),
    ("eval.regex='('", "not a valid Python regular expression"),
    ("eval.top_p=0.9", "eval.temperature above 0"),
    ("eval.normalize=[stemming]", "eval.normalize"),
])
def test_config_names_the_bad_eval_option(override, message):
    with pytest.raises(UserError, match=message):
        load_config(None, [override])
    assert load_config(None, ["eval.metrics=[bleu, pkg.mod:fn]", "eval.temperature=0.7", "eval.top_p=0.9"])
