"""The task score of the test split: its rows as (prompt messages, reference answer), a model's answers and
its log-likelihood of each reference, scored by eval.metrics (evaluate/metrics/).

    test_rows(data config)                        -> the cases: prompt messages, reference, the row's fields
    evaluate_model(model, tokenizer, cfg, label)  -> Evaluation: scores, and what the intervals need
    evaluation_summary(cfg, before, after)        -> summary.json's "evaluation": intervals, paired
                                                     differences, generation settings
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tunesmith.config import Config, DataConfig, EvalConfig
from tunesmith.data.formats import detect_format, validate_rows
from tunesmith.data.readers import read_rows
from tunesmith.data.tokenize import to_messages
from tunesmith.errors import UserError
from tunesmith.evaluate.metrics import Inputs, default_metrics
from tunesmith.evaluate.metrics.scoring import Evaluation, compare, needs, score_answers

LEVEL = 0.95  # of every interval


@dataclass(frozen=True)
class Case:
    messages: list[dict]  # the conversation before the answer
    reference: str  # the answer expected
    fields: dict  # the row as read from the test file (what a user metric may look at)


def test_rows(cfg: DataConfig, max_samples: int = 0) -> list[Case]:
    """Every test row split into the conversation before its last answer, and that answer: for preference rows
    the chosen one; unpaired rows count only where their label is true. The first max_samples (0: all)."""
    rows = read_rows(cfg.test)
    fmt = detect_format(rows, cfg.test) if cfg.format == "auto" else cfg.format
    if fmt == "text":
        raise UserError(f"{cfg.test}: the task score needs prompts and answers; text rows have neither.")
    validate_rows(rows, fmt, cfg.test)
    cases = []
    for row in rows:
        if fmt == "unpaired" and not row.fields["label"]:
            continue  # a bad answer is no reference
        messages = to_messages(row.fields, fmt, cfg.system_prompt)
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        cases.append(Case(messages[:last], messages[last]["content"], row.fields))
    return cases[:max_samples] if max_samples else cases


def test_cases(cfg: DataConfig) -> list[tuple[list[dict], str]]:
    """(prompt messages, reference answer) of every test row (see test_rows)."""
    return [(c.messages, c.reference) for c in test_rows(cfg)]


def metric_names(cfg: EvalConfig, cases: list[Case]) -> list[str]:
    """eval.metrics, or the defaults of the data when it is empty (metrics/__init__.py: default_metrics)."""
    return list(cfg.metrics) or default_metrics([c.reference for c in cases])


def evaluate_model(model, tokenizer, cfg: Config, label: str) -> Evaluation:
    """Score the test split: generate an answer for every row (greedy, or sampled per eval.temperature) if a
    metric needs answers, compute the reference answers' log-likelihoods if one needs them. Under torchrun each
    process does its share of the rows (every process holds the whole model then); all score all."""
    from tunesmith.evaluate.generate import generate, render_prompt
    from tunesmith.train import distributed

    cases = test_rows(cfg.data, cfg.eval.max_samples)
    names = metric_names(cfg.eval, cases)
    wanted = needs(names)
    mine = distributed.share(cases)
    predictions = [""] * len(cases)
    if "predictions" in wanted:
        prompts = [render_prompt(tokenizer, c.messages) for c in mine]
        answers = generate(model, tokenizer, prompts, cfg.eval.max_new_tokens, cfg.eval.batch_size,
                           progress=distributed.is_main(), desc=f"score test ({label})",
                           temperature=cfg.eval.temperature, top_p=cfg.eval.top_p, seed=cfg.eval.seed)
        predictions = [p for share in distributed.gather_objects(answers) for p in share]  # in row order
    likelihoods = None
    if "likelihood" in wanted:
        rows = answer_likelihoods(model, tokenizer, mine, cfg.eval.batch_size)
        likelihoods = np.array([r for share in distributed.gather_objects(rows.tolist()) for r in share],
                               dtype=np.float64).reshape(-1, 2)
    return score_answers(names, inputs_of(cases, predictions, cfg.eval, likelihoods))


def inputs_of(cases: list[Case], predictions: list[str], cfg: EvalConfig, likelihoods=None) -> Inputs:
    prompts = [next((m["content"] for m in reversed(c.messages) if m["role"] == "user"), "") for c in cases]
    return Inputs(predictions, [c.reference for c in cases], [c.fields for c in cases], cfg, likelihoods, prompts)


def restore(saved: dict, cfg: Config) -> Evaluation | None:
    """An Evaluation from what Evaluation.to_json kept (before.json), scored again with the current eval.metrics;
    None when it cannot be: other rows, or a metric that needs what was not kept (then the caller computes it
    anew). A file of scores alone (a reward model's, or one written before answers were kept) is taken as is."""
    if "scores" not in saved:
        return Evaluation(dict(saved))  # written before before.json kept answers: the flat scores
    if "predictions" not in saved:
        return Evaluation(dict(saved["scores"]))
    cases = test_rows(cfg.data, cfg.eval.max_samples)
    names = metric_names(cfg.eval, cases)
    likelihoods = saved.get("likelihoods")
    if len(saved["predictions"]) != len(cases) or ("likelihood" in needs(names) and likelihoods is None):
        return None
    if likelihoods is not None:
        likelihoods = np.asarray(likelihoods, dtype=np.float64).reshape(-1, 2)
    return score_answers(names, inputs_of(cases, list(saved["predictions"]), cfg.eval, likelihoods))


def answer_sequence(tokenizer, messages: list[dict], answer: str) -> dict:
    """{input_ids, labels} of the prompt followed by `answer` as the assistant's turn, labelled on the answer and
    its end-of-turn token only, as training labels it (data/tokenize.py)."""
    from tunesmith.data.tokenize import IGNORE, answer_span, render, tokenize_with_starts
    from tunesmith.evaluate.generate import render_prompt

    prompt = render_prompt(tokenizer, messages)  # what generation continues from
    if getattr(tokenizer, "chat_template", None):
        text = render(tokenizer, [*messages, {"role": "assistant", "content": answer}])
        start, end = answer_span(text, prompt, text, "the reference answer",
                                 "Score with metrics that need no likelihood (no perplexity, log_likelihood).")
    else:  # a plain LM continues the text
        text = prompt + answer
        start, end = len(prompt), len(text)
    ids, starts = tokenize_with_starts(tokenizer, text, [(start, end)])
    return {"input_ids": ids, "labels": [t if start <= s < end else IGNORE for t, s in zip(ids, starts)]}


def answer_likelihoods(model, tokenizer, cases: list[Case], batch_size: int) -> np.ndarray:
    """(n, 2): the sum of log p(token | everything before it) over each reference answer's tokens, teacher-forced
    in one forward, and their number (objectives/preference.py: answer_logps, as DPO scores answers)."""
    import torch

    from tunesmith.objectives.preference import answer_logps, collate_sequences

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = []
    try:
        with torch.no_grad():
            for start in range(0, len(cases), batch_size):
                seqs = [answer_sequence(tokenizer, c.messages, c.reference) for c in cases[start : start + batch_size]]
                batch = {k: v.to(device) for k, v in collate_sequences(seqs, pad).items()}
                sums, counts = answer_logps(model, batch, len(seqs))
                out += [[float(s), float(c)] for s, c in zip(sums.cpu(), counts.cpu())]
    finally:
        model.train(was_training)
    return np.array(out, dtype=np.float64).reshape(-1, 2)


def generation_settings(cfg: EvalConfig) -> dict:
    """How the answers were produced, for summary.json and the reports."""
    settings = {"decoding": "sampled" if cfg.temperature > 0 else "greedy", "max_new_tokens": cfg.max_new_tokens,
                "batch_size": cfg.batch_size}
    if cfg.temperature > 0:
        settings.update(temperature=cfg.temperature, top_p=cfg.top_p, seed=cfg.seed)
    return settings


def evaluation_summary(cfg: Config, before: Evaluation | None, after: Evaluation | None) -> dict:
    """summary.json's "evaluation": the metrics, rows, generation settings, each score's interval before and
    after, and the paired difference after - before with its interval (metrics/bootstrap.py)."""
    pairs = [(label, e) for label, e in (("before", before), ("after", after)) if e is not None]
    scored = next((e for _, e in pairs if e.inputs is not None), None)
    if scored is None:  # scores from elsewhere (a reward model's pair accuracy): no rows to resample
        return {"metrics": sorted({k for _, e in pairs for k in e.scores})}
    out = {"metrics": [m.key for m in scored.bound], "rows": scored.rows, "generation": generation_settings(cfg.eval),
           "bootstrap": {"resamples": cfg.eval.bootstrap, "seed": cfg.eval.seed, "level": LEVEL}}
    if not cfg.eval.bootstrap:
        return out
    if before is not None and after is not None and before.rows != after.rows:
        pairs[0] = ("before", Evaluation(before.scores))  # other rows (eval.max_samples changed): no pairing
    compared = compare([e for _, e in pairs], cfg.eval.bootstrap, cfg.eval.seed, LEVEL)
    out["intervals"] = {label: c["intervals"] for (label, _), c in zip(pairs, compared)}
    if "difference" in compared[-1]:
        out["difference"] = compared[-1]["difference"]
    return out
