"""The GRPO demo (tunesmith/configs/grpo_demo.yaml) on the real default model: a few steps raise the mean reward
(field accuracy of the demo task) and the greedy test score. Minutes on 2 cores: marked integration and slow; the
full run and its numbers are in docs/rl.md."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]

CONFIG = Path(__file__).resolve().parent.parent / "tunesmith" / "configs" / "grpo_demo.yaml"
STEPS, EDGE = 8, 2  # steps trained; the reward of the first and of the last EDGE steps is compared


def test_grpo_demo_raises_the_reward_on_the_default_model(tmp_path):
    from tunesmith.commands.train import train
    from tunesmith.config import load_config
    from tunesmith.data.demo import write_demo

    paths = write_demo(tmp_path / "data")
    validation = tmp_path / "data" / "prompt_validation_24.jsonl"  # a shorter greedy validation
    validation.write_text("".join(paths["prompt_validation"].read_text().splitlines(keepends=True)[:24]))
    run_dir = tmp_path / "run"
    cfg = load_config(CONFIG, [f"data.train={paths['prompt_train']}", f"data.validation={validation}",
                               f"data.test={paths['test']}", "eval.max_samples=30", f"train.max_steps={STEPS}",
                               "train.eval_every=0", "train.save_every=0", f"output.dir={run_dir}"])
    summary = train(cfg)
    steps = [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    rewards = [r["reward"] for r in steps]
    first, last = sum(rewards[:EDGE]) / EDGE, sum(rewards[-EDGE:]) / EDGE
    print(f"reward per step: {[round(r, 3) for r in rewards]}; test before {summary['before']}, "
          f"after {summary['after']}")
    assert len(steps) == STEPS and all(0 <= r <= 1 for r in rewards)
    assert 0.05 < first < 0.9  # the base is neither always right nor always wrong: the groups carry a signal
    assert last > first + 0.05, rewards  # a loose margin: the reward rose
    assert summary["after"]["field_accuracy"] > summary["before"]["field_accuracy"]
    assert (run_dir / "reward.png").stat().st_size > 1000
