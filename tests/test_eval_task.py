"""Scoring a model on the test split (tunesmith/evaluate/task.py) on the tiny model: teacher-forced answer
likelihoods, metrics that need no generation, before.json kept and scored again, the report, the free-text task."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import build_tiny_model, build_tiny_tokenizer
from tunesmith.config import load_config
from tunesmith.evaluate import task
from tunesmith.evaluate.metrics.scoring import Evaluation

ROWS = [("What is the capital of France?", "Paris."), ("Name a colour.", "Blue is a colour, for example."),
        ("Say hello.", "hello world")]


@pytest.fixture
def test_file(tmp_path):
    path = tmp_path / "test.jsonl"
    path.write_text("".join(json.dumps({"prompt": q, "completion": a}) + "\n" for q, a in ROWS))
    return path


def direct_log_likelihood(model, ids: list[int], labels: list[int]) -> tuple[float, int]:
    """sum of log p(token t | tokens < t) over the labelled t, from one plain forward of the whole sequence."""
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)
    picked = [logp[t - 1, ids[t]].item() for t in range(1, len(ids)) if labels[t] != -100]
    return sum(picked), len(picked)


def test_answer_likelihoods_are_the_reference_tokens_log_probs():
    model, tok = build_tiny_model(), build_tiny_tokenizer()
    cases = [task.Case([{"role": "user", "content": q}], a, {}) for q, a in ROWS]
    seq = task.answer_sequence(tok, cases[0].messages, cases[0].reference)
    labelled = [t for t, label in zip(seq["input_ids"], seq["labels"]) if label != -100]
    assert tok.decode(labelled) == "Paris.<|im_end|>"  # the answer and its end-of-turn token, as in training
    got = task.answer_likelihoods(model, tok, cases, batch_size=2)  # rows of different lengths share a batch
    for case, (logp, count) in zip(cases, got):
        seq = task.answer_sequence(tok, case.messages, case.reference)
        expected, n = direct_log_likelihood(model, seq["input_ids"], seq["labels"])
        assert count == n and logp == pytest.approx(expected, abs=1e-4)


def test_likelihood_metrics_need_no_generation(test_file, monkeypatch):
    import tunesmith.evaluate.generate as generate

    monkeypatch.setattr(generate, "generate", lambda *a, **k: pytest.fail("generated answers nobody scores"))
    cfg = load_config(None, [f"data.test={test_file}", "eval.metrics=[perplexity, log_likelihood]"])
    model, tok = build_tiny_model(), build_tiny_tokenizer()
    result = task.evaluate_model(model, tok, cfg, "test")
    sums = task.answer_likelihoods(model, tok, task.test_rows(cfg.data), 8).sum(axis=0)
    assert result.scores["log_likelihood"] == pytest.approx(sums[0] / sums[1])
    assert result.scores["perplexity"] == pytest.approx(np.exp(-sums[0] / sums[1]))


def test_before_json_keeps_the_answers_to_score_them_again(test_file):
    cfg = load_config(None, [f"data.test={test_file}", "eval.max_new_tokens=3"])
    model, tok = build_tiny_model(), build_tiny_tokenizer()
    result = task.evaluate_model(model, tok, cfg, "before")
    assert list(result.scores) == ["exact_match", "token_f1", "perplexity"]  # free-text answers: these defaults
    saved = json.loads(json.dumps(result.to_json()))
    assert task.restore(saved, cfg).scores == result.scores
    more = load_config(None, [f"data.test={test_file}", "eval.metrics=[token_f1, rouge_l]"])
    assert set(task.restore(saved, more).scores) == {"token_f1", "rouge_l"}  # scored again, no model needed
    fewer = load_config(None, [f"data.test={test_file}", "eval.max_samples=2"])
    assert task.restore(saved, fewer) is None  # other rows: compute anew
    assert task.restore({"exact_match": 12.5}, cfg).scores == {"exact_match": 12.5}  # a before.json of old


def test_summary_intervals_and_the_report(test_file, tmp_path):
    from tunesmith.evaluate.report import write_report

    cfg = load_config(None, [f"data.test={test_file}", "eval.max_new_tokens=3", "eval.examples=1"])
    model, tok = build_tiny_model(), build_tiny_tokenizer()
    before = task.evaluate_model(model, tok, cfg, "before")
    after = task.restore(before.to_json(), cfg)  # the same answers
    evaluation = task.evaluation_summary(cfg, before, after)
    assert evaluation["rows"] == 3 and evaluation["generation"] == {"decoding": "greedy", "max_new_tokens": 3,
                                                                     "batch_size": 16}
    assert all(d["interval"] == [0.0, 0.0] for d in evaluation["difference"].values())
    summary = {"model": "tiny", "method": "lora", "trainable": 1, "total": 2, "steps": 1, "tokens_seen": 1,
               "train_seconds": 1.0, "data": "3 rows", "before": before.scores, "after": after.scores,
               "examples": after.examples(1), "evaluation": evaluation}
    report = write_report(tmp_path, summary).read_text()
    ppl = after.scores["perplexity"]
    assert f"| perplexity (lower is better) | {ppl:.3f} [" in report and "| +0.000 [0.000, 0.000] |" in report
    assert "3 test rows" in report and "decoding greedy" in report and "expected:" in report


def test_examples_are_the_best_and_worst_rows():
    from tunesmith.config import EvalConfig
    from tunesmith.evaluate.metrics import Inputs
    from tunesmith.evaluate.metrics.scoring import score_answers

    refs = ["a b c d", "a b c d", "a b c d", "a b c d"]
    preds = ["a b", "a b c d", "x", "a b c"]
    inputs = Inputs(preds, refs, [{}] * 4, EvalConfig(), None, ["q0", "q1", "q2", "q3"])
    result = score_answers(["exact_match", "token_f1"], inputs)
    examples = result.examples(2)
    assert [(e["rank"], e["prediction"]) for e in examples] == [("best", "a b c d"), ("best", "a b c"),
                                                                 ("worst", "x"), ("worst", "a b")]
    assert {e["metric"] for e in examples} == {"token_f1"} and examples[0]["prompt"] == "q1"
    tied = score_answers(["exact_match"], Inputs(["x", "y"], ["a", "b"], [{}] * 2, EvalConfig()))
    assert [e["rank"] for e in tied.examples(3)] == ["sample", "sample"]
    assert Evaluation({"pair_accuracy": 90.0}).examples(3) == []


def test_the_free_text_task(tmp_path):
    from tunesmith.data.qa import qa_rows, write_qa
    from tunesmith.evaluate.metrics import default_metrics

    rows = qa_rows(300, seed=3)
    assert rows == qa_rows(300, seed=3) and rows != qa_rows(300, seed=4)
    for row in rows:
        prompt, answer = (m["content"] for m in row["messages"])
        name = answer.split()[0]
        assert prompt.count("Question:") == 1 and name in prompt.split("Question:")[1]
        assert answer.endswith(".") and answer.count(".") == 1  # one sentence
    paths = write_qa(tmp_path, seed=1, n_train=40, n_validation=5, n_test=5)
    prompts = {split: {json.loads(line)["messages"][0]["content"] for line in open(path)}
               for split, path in paths.items()}
    assert [len(p) for p in prompts.values()] == [40, 5, 5]
    assert not (prompts["train"] & prompts["test"]) and not (prompts["train"] & prompts["validation"])
    references = [json.loads(line)["messages"][1]["content"] for line in open(paths["test"])]
    assert default_metrics(references) == ["exact_match", "token_f1", "perplexity"]
