"""Online RL through `tunesmith train` (the CLI entry, in-process) on the tiny model and a tiny reward model folder:
PPO's logged keys, value head and reward curve; GRPO rewarded by the reward model alone; exit 2 with a clear message
when the reward model is missing or is not a reward model."""

from __future__ import annotations

import json
import re

import pytest

from conftest import tiny_run_files
from test_grpo_reward_model import tiny_reward_model
from tunesmith.cli import main

PPO_KEYS = {"loss", "policy_loss", "value_loss", "clipfrac", "value_clipfrac", "entropy", "approx_kl",
            "explained_variance", "score", "kl", "completion_length"}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The tiny policy folder, the demo's prompt rows and a tiny reward model folder."""
    root = tmp_path_factory.mktemp("rl-cli")
    model_dir, paths = tiny_run_files(root, n_train=4, n_validation=2, n_test=2)
    config = root / "rl.yaml"
    config.write_text(f"model:\n  name_or_path: {model_dir}\nmethod:\n  r: 2\n  dropout: 0.0\n"
                      f"data:\n  train: {paths['prompt_train']}\n  validation: {paths['prompt_validation']}\n"
                      "  cache: false\ntrain:\n  max_steps: 2\n  batch_size: 2\neval:\n  before_after: false\n")
    return {"config": config, "policy": model_dir, "reward_model": tiny_reward_model(root / "rm"), "root": root,
            "test": paths["test"]}


def records(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_ppo_through_the_cli_logs_its_keys_and_saves_the_value_head(files, tmp_path):
    from safetensors.torch import load_file

    run_dir = tmp_path / "ppo"
    code = main(["train", str(files["config"]), "objective.name=ppo", f"objective.reward_model={files['reward_model']}",
                 "objective.num_generations=2", "objective.max_new_tokens=4", "objective.ppo_epochs=2",
                 f"output.dir={run_dir}"])
    assert code == 0
    steps = [r for r in records(run_dir) if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2]
    for r in steps:
        assert PPO_KEYS <= set(r), PPO_KEYS - set(r)
    assert steps[0]["score"] != 0 and steps[0]["score"] == steps[1]["score"]  # ppo_epochs 2: one rollout, two steps
    assert "val_reward_reward_model" in records(run_dir)[-1]
    head = load_file(run_dir / "adapter" / "value_head.safetensors")
    assert list(head) == ["value_head.weight"] and tuple(head["value_head.weight"].shape) == (1, 32)
    assert (run_dir / "reward.png").stat().st_size > 1000
    assert json.loads((run_dir / "summary.json").read_text())["objective"] == "ppo"


def test_grpo_through_the_cli_with_the_reward_model_alone(files, tmp_path):
    run_dir = tmp_path / "grpo"
    code = main(["train", str(files["config"]), "objective.name=grpo",
                 f"objective.reward_model={files['reward_model']}", "objective.reward_model_weight=2",
                 "objective.num_generations=2", "objective.max_new_tokens=4",
                 f"data.test={files['test']}", "eval.before_after=true", "eval.max_new_tokens=4",
                 f"output.dir={run_dir}"])
    assert code == 0
    summary = json.loads((run_dir / "summary.json").read_text())  # the demo's test split scored before and after
    assert {"exact_match", "valid_json", "field_accuracy"} <= set(summary["before"]) == set(summary["after"])
    steps = [r for r in records(run_dir) if "loss" in r]
    assert len(steps) == 2
    for r in steps:
        assert r["reward"] == pytest.approx(2 * r["reward_reward_model"], abs=1e-6) and r["reward_reward_model_std"] > 0
    assert "val_reward_reward_model" in records(run_dir)[-1]
    assert (run_dir / "reward.png").is_file()
    assert "reward.png" in (run_dir / "report.md").read_text()


@pytest.mark.parametrize("reward_model, message", [
    (None, "ppo needs a reward: objective.reward_model"),
    ("missing", "is not a model folder \\(no config.json\\)"),
    ("policy", "is not a reward model .*LlamaForCausalLM"),
])
def test_ppo_without_a_reward_model_exits_2_with_the_reason(files, tmp_path, capsys, reward_model, message):
    folder = {None: None, "missing": tmp_path / "nowhere", "policy": files["policy"]}[reward_model]
    overrides = [f"objective.reward_model={folder}"] if folder is not None else []
    code = main(["train", str(files["config"]), "objective.name=ppo", *overrides, f"output.dir={tmp_path / 'run'}"])
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("tunesmith: error: objective.")
    assert re.search(message, err), err
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # stopped before any step


def test_the_reward_plot_is_drawn_only_for_runs_that_logged_a_reward(tmp_path):
    from tunesmith.evaluate.report import plot_reward

    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in (1, 2)))
    assert plot_reward(metrics, tmp_path / "sft.png") is None and not (tmp_path / "sft.png").exists()
    metrics.write_text("".join(json.dumps(r) + "\n" for r in [{"step": 1, "loss": 0.0, "score": 0.2},
                                                               {"step": 2, "loss": -0.1, "score": 0.5},
                                                               {"step": 2, "val_reward": 0.4}]))
    assert plot_reward(metrics, tmp_path / "ppo.png") == tmp_path / "ppo.png"  # PPO logs its reward as `score`
    assert (tmp_path / "ppo.png").stat().st_size > 1000
