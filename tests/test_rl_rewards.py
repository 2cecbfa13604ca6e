"""Rewards (tunesmith/rl/rewards.py): TRL's signature, built-ins for the demo task, loading, checks; and the
`prompt` data format they read their columns from."""

from __future__ import annotations

import json
import sys

import pytest

from tunesmith.config import build_config
from tunesmith.data.formats import detect_format, validate_rows
from tunesmith.data.readers import read_rows
from tunesmith.errors import UserError
from tunesmith.rl import rewards as R

ANSWER = '{"name": "Ada", "age": 36, "city": "London"}'


def test_demo_rewards_score_strings_and_messages_alike():
    texts = [ANSWER, '{"name": "Ada", "age": 63, "city": "London"}', "Here: " + ANSWER, ' ' + ANSWER + '\n']
    chats = [[{"role": "assistant", "content": t}] for t in texts]
    for completions in (texts, chats):
        kwargs = dict(prompts=["p"] * 4, completions=completions, answer=[ANSWER] * 4)
        assert R.exact_match(**kwargs) == [1.0, 0.0, 0.0, 1.0]
        assert R.valid_json(**kwargs) == [1.0, 1.0, 0.0, 1.0]
        assert R.field_accuracy(**kwargs) == pytest.approx([1.0, 2 / 3, 0.0, 1.0])


def test_generic_rewards():
    texts = ["<think>x</think> 42", "42", "a" * 300]
    assert R.regex_format(None, texts, pattern=r"<think>.*</think>\s*\d+") == [1.0, 0.0, 0.0]
    assert R.length(None, texts, max_chars=100) == [1.0, 1.0, pytest.approx(1 / 3)]


def write_module(tmp_path, monkeypatch, body: str, name: str = "my_rewards"):
    (tmp_path / f"{name}.py").write_text(body, encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop(name, None)


def test_load_module_function_with_weights_and_options(tmp_path, monkeypatch):
    write_module(tmp_path, monkeypatch, "def shout(prompts, completions, **kw):\n"
                 "    return [float(c.isupper()) for c in completions]\n")
    rewards = R.load_rewards(["my_rewards:shout", {"name": "length", "weight": 0.5, "options": {"max_chars": 2}}])
    assert [(r.name, r.weight) for r in rewards] == [("shout", 1.0), ("length", 0.5)]
    per, total = R.score(rewards, ["p", "p"], ["HI", "quiet"], {})
    assert per.tolist() == [[1.0, 0.0], [1.0, 0.4]]
    assert total.tolist() == [1.5, 0.2]


@pytest.mark.parametrize("returned, message", [
    ("1.0", "returned 1.0 .*must return a list"),
    ("[1.0]", "returned 1 values for 2 completions"),
    ("[1.0, float('nan')]", "returned nan for completion 1"),
    ("[1.0, None]", "returned None for completion 1"),
])
def test_a_bad_reward_stops_the_run_naming_it(tmp_path, monkeypatch, returned, message):
    write_module(tmp_path, monkeypatch, f"def broken(prompts, completions, **kw):\n    return {returned}\n",
                 name="bad_rewards")
    rewards = R.load_rewards(["bad_rewards:broken"])
    with pytest.raises(UserError, match=f"reward broken {message}"):
        R.score(rewards, ["p", "q"], ["a", "b"], {})


def test_reward_specs_are_checked_with_the_config():
    cfg = build_config({"objective": {"name": "grpo", "rewards": ["field_accuracy"]}})
    assert cfg.objective.beta is None and cfg.objective.loss_type == "dapo" and cfg.objective.num_generations == 8
    for bad, why in [({"name": "grpo"}, "needs objective.rewards"),
                     ({"name": "grpo", "rewards": ["nonsense"]}, "neither a built-in"),
                     ({"name": "grpo", "rewards": [{"name": "length", "wait": 1}]}, "unknown keys"),
                     ({"name": "dpo", "beta": 0}, "must be > 0 for dpo")]:
        with pytest.raises(UserError, match=why):
            build_config({"objective": bad})
    with pytest.raises(UserError, match="cannot import 'no_such_module'"):
        R.load_rewards(["no_such_module:f"])


def test_prompt_rows_are_detected_and_checked(tmp_path):
    path = tmp_path / "p.jsonl"
    rows = [{"prompt": "What is 2 + 2?", "answer": "4"},
            {"prompt": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
            {"prompt": "x", "completions": "clash"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    read = read_rows(path)
    assert detect_format(read, path) == "prompt"
    validate_rows(read[:1], "prompt", path)
    with pytest.raises(UserError) as e:
        validate_rows(read, "prompt", path)
    assert "line 2: prompt: the last message must be the user message" in str(e.value)
    assert 'line 3: field "completions" clashes' in str(e.value)


def test_demo_writes_prompt_rows_the_rewards_score(tmp_path):
    from tunesmith.data.demo import write_demo

    files = write_demo(tmp_path, seed=3, n_train=6, n_validation=2, n_test=2)
    rows = [r.fields for r in read_rows(files["prompt_train"])]
    sft = [r.fields["messages"] for r in read_rows(files["train"])]
    assert [r["prompt"] for r in rows] == [m[:-1] for m in sft]
    answers = [r["answer"] for r in rows]
    assert R.exact_match([r["prompt"] for r in rows], answers, answer=answers) == [1.0] * 6
