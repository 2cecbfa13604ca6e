"""What online RL carries between steps is checkpointed (tunesmith/rl/carry.py): reward call counters, stateful
rewards, the no-signal warning's streak; and the progress bar shows the rollout and update phases with their
tokens per second (tunesmith/train/progress.py). The SIGKILL tests are in tests/test_rl_chaos.py."""

from __future__ import annotations

import json
import logging
from functools import partial

import pytest
import torch

from conftest import assert_resumes_bit_exact, build_tiny_tokenizer, killed_after, lora_model
from tunesmith.config import ObjectiveConfig, build_config
from tunesmith.methods.registry import switch_adapters_off
from tunesmith.objectives import grpo
from tunesmith.rl.carry import Carry
from tunesmith.rl.rewards import Reward
from tunesmith.train import loop
from tunesmith.train.checkpoint import checkpoint_tensors


class Counting:
    """A reward with a state: the vowel share, tilted by its own call count and by trainer_state.reward_calls, so a
    resume that lost either trains on other rewards."""

    def __init__(self):
        self.calls, self.seen = 0, []

    def state_dict(self):
        return {"calls": self.calls}

    def load_state_dict(self, state):
        self.calls = state["calls"]

    def __call__(self, prompts, completions, trainer_state, scale=0.1, **columns):
        self.calls += 1
        self.seen.append((trainer_state.global_step, trainer_state.reward_calls))
        tilt = self.calls % 3 + trainer_state.reward_calls % 2
        return [sum(ch in "aeiou" for ch in c) / max(1, len(c)) + scale * tilt * (i % 2)
                for i, c in enumerate(completions)]


def constant(prompts, completions, **columns):
    return [1.0] * len(completions)


def examples(tok, n: int = 4) -> list[dict]:
    cfg = build_config({}).data
    out = [grpo.encode({"prompt": f"Say {i} things about foxes."}, "prompt", tok, cfg) for i in range(n)]
    grpo.number_examples(out)
    return out


def run_grpo(run_dir, monkeypatch, resume=False, kill_after=None, reward=None, steps=4, **options):
    tok, (model, _) = build_tiny_tokenizer(), lora_model()
    data = examples(tok)
    cfg = build_config({"method": {"name": "lora", "dropout": 0.0}, "output": {"dir": str(run_dir)},
                        "objective": {"name": "grpo", "rewards": ["length"]},
                        "train": {"max_steps": steps, "batch_size": 2, "save_every": 1, "lr": 0.05,
                                  "resume": resume}})
    opts = ObjectiveConfig(name="grpo", rewards=["length"], num_generations=4, max_new_tokens=6, **options)
    reward = reward or Reward("counting", partial(Counting(), scale=0.1))
    obj = grpo.bind(opts, [reward], switch_adapters_off, grpo.Run(tok, data, 2, run_dir))
    with killed_after(monkeypatch, kill_after):
        train_state = loop.train(model, data, [], cfg, run_dir, pad_id=2, objective=obj)
    run_grpo.last = (obj, train_state)
    return checkpoint_tensors(model)


def test_reward_counters_and_reward_state_are_checkpointed_and_restored(tmp_path, monkeypatch):
    """Killed after step 2 and resumed: the reward's own count and trainer_state.reward_calls are restored, so
    the run ends bit for bit as the uninterrupted one (the reward depends on both)."""
    records = assert_resumes_bit_exact(run_grpo, tmp_path, monkeypatch)
    obj, _ = run_grpo.last
    assert obj.carry.reward_calls == 4  # 4 steps, one rollout each (num_iterations 1)
    counting = obj.carry.rewards[0].function.func
    assert counting.calls == 4 and counting.seen == [(2, 2), (3, 3)]  # the resumed run went on from step 2
    saved = json.loads((tmp_path / "b" / "checkpoints" / "step-4" / "state.json").read_text())
    assert saved["train_state"]["objective"] == {"reward_calls": 4, "global_step": 3, "redraws": 0, "flat_streak": 0,
                                                 "rewards": {"counting": {"calls": 4}}}
    assert len({r["reward"] for r in records}) == 4


def test_a_resume_that_loses_the_counters_would_differ(tmp_path, monkeypatch):
    """The control: the same kill and resume with the carry's restore switched off ends elsewhere."""
    whole = run_grpo(tmp_path / "a", monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        run_grpo(tmp_path / "b", monkeypatch, kill_after=2)
    monkeypatch.setattr(Carry, "load_state_dict", lambda self, state: None)
    resumed = run_grpo(tmp_path / "b", monkeypatch, resume=True)
    assert any(not torch.equal(whole[k], resumed[k]) for k in whole)


def test_the_no_signal_streak_survives_a_resume(tmp_path, monkeypatch, caplog):
    """Every group flat from step 1: the warning comes at step FLAT_STEPS (5), in the resumed run too."""
    flat = Reward("constant", constant)
    with pytest.raises(KeyboardInterrupt):
        run_grpo(tmp_path, monkeypatch, kill_after=3, reward=flat, steps=6)
    with caplog.at_level(logging.WARNING, logger="tunesmith"):
        run_grpo(tmp_path, monkeypatch, resume=True, reward=flat, steps=6)
    warnings = [r.getMessage() for r in caplog.records if "no signal" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].startswith(f"step {grpo.FLAT_STEPS}:"), warnings


def test_carry_round_trips_and_ignores_stateless_rewards():
    counting = Counting()
    carry = Carry([Reward("counting", partial(counting, scale=1.0)), Reward("constant", constant)])
    carry.called(0), carry.called(0)
    carry.redraws, carry.streak[0], counting.calls = 3, 2, 7
    state = json.loads(json.dumps(carry.state_dict()))  # JSON-able: it goes into state.json
    other_counting = Counting()
    other = Carry([Reward("counting", other_counting), Reward("constant", constant)])
    other.load_state_dict(state)
    assert (other.reward_calls, other.redraws, other.streak, other_counting.calls) == (2, 3, [2], 7)
    assert other.called(5) == carry.called(5)
    Carry().load_state_dict({})  # a checkpoint written before the carry existed


class RecordingBar:
    """Stands in for tqdm in the loop: records what the bar would show."""

    shown: list = []

    def __init__(self, *args, **kwargs):
        self.shown.clear()

    def set_description(self, desc, refresh=True):
        self.shown.append(("desc", desc))

    def set_postfix(self, **postfix):
        self.shown.append(("postfix", postfix))

    def update(self, n=1):
        pass

    def write(self, text):
        pass

    def close(self):
        pass


def test_the_bar_shows_rollout_and_update_phases_with_their_token_rates(tmp_path, monkeypatch):
    monkeypatch.setattr(loop, "tqdm", RecordingBar)
    run_grpo(tmp_path, monkeypatch, steps=2, num_iterations=2)
    descs = [v for kind, v in RecordingBar.shown if kind == "desc"]
    for phase in ("rollout", "generate", "score", "update"):
        assert f"train [{phase}]" in descs, descs
    assert descs[-1] == "train"  # back to the plain name between steps
    # the generate and score phases run inside the rollout, the update after it
    assert descs.index("train [generate]") < descs.index("train [score]") < descs.index("train [update]")
    postfixes = [v for kind, v in RecordingBar.shown if kind == "postfix"]
    assert len(postfixes) == 2 and all(float(p["gen_tok_s"]) > 0 and float(p["upd_tok_s"]) > 0 for p in postfixes)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert "generate_tokens_per_s" in records[0] and "generate_tokens_per_s" not in records[1]  # step 2: no sampling
    assert all(r["update_tokens_per_s"] > 0 for r in records)
