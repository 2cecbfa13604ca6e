"""GRPO with a reward model (objective.reward_model): its score is one more weighted reward, beside or instead of
reward functions (tunesmith/rl/reward_model.py objective_rewards), logged as reward_reward_model; folders that are
no reward model are refused before any training step."""

from __future__ import annotations

import pytest
import torch

from conftest import build_tiny_model, build_tiny_tokenizer
from tunesmith.config import ObjectiveConfig, build_config
from tunesmith.errors import UserError
from tunesmith.methods.registry import switch_adapters_off
from tunesmith.objectives import grpo
from tunesmith.rl.reward_model import RewardModelFunction, check_reward_model_folder, objective_rewards
from tunesmith.train.loop import rollout_generator

G = 4


def tiny_reward_model(folder, seed: int = 3):
    """The tiny model with a reward head (scores spread by a large head), saved as the reward objective exports it."""
    from tunesmith.objectives.reward import add_score_head, save_sequence_classifier

    model = build_tiny_model(seed=seed)
    torch.manual_seed(seed)
    add_score_head(model)
    with torch.no_grad():
        model.score.weight.mul_(50)
    save_sequence_classifier(model, build_tiny_tokenizer(), folder)
    return folder


def prompt_examples(tok, n: int = 4) -> list[dict]:
    cfg = build_config({}).data
    out = [grpo.encode({"prompt": f"Tell me {i} things about foxes.", "answer": str(i)}, "prompt", tok, cfg)
           for i in range(n)]
    grpo.number_examples(out)
    return out


def test_the_reward_models_score_is_a_weighted_reward_beside_functions(tmp_path):
    folder = tiny_reward_model(tmp_path / "rm")
    opts = ObjectiveConfig(name="grpo", reward_model=str(folder), reward_model_weight=0.5, rewards=["length"],
                           num_generations=G, max_new_tokens=6)
    rewards = objective_rewards(opts, "grpo")
    assert [(r.name, r.weight) for r in rewards] == [("reward_model", 0.5), ("length", 1.0)]
    tok, model = build_tiny_tokenizer(), build_tiny_model()
    data = prompt_examples(tok)
    run = grpo.Run(tok, data, tok.pad_token_id, stop_ids=(tok.eos_token_id,))
    completions, per_reward, total = grpo.draw(model, [0, 1], [11, 12], opts, rewards, run)
    texts = [tok.decode(c.token_ids, skip_special_tokens=True) for group in completions for c in group]
    prompts = [f"Tell me {i} things about foxes." for i in (0, 1) for _ in range(G)]
    expected = RewardModelFunction(folder)(prompts, texts)  # the model's score, as tunesmith score computes it
    assert per_reward[0].tolist() == pytest.approx(expected, abs=1e-6)
    assert float(per_reward[0].std()) > 1e-3  # the scores differ: a signal for the advantages
    torch.testing.assert_close(total, 0.5 * per_reward[0] + per_reward[1])

    objective = grpo.bind(opts, rewards, switch_adapters_off, run)
    assert {"reward_reward_model", "reward_reward_model_std", "reward_length"} <= set(objective.metrics)
    window = [grpo.collate(data[i : i + 2], 2) for i in (0, 2)]
    batches = objective.rollout(model, window, 0, rollout_generator(0, 0))
    units = sum(objective.units(b) for b in batches)
    means = {}
    for b in batches:
        for k, v in objective.loss(model, b)[2].items():
            means[k] = means.get(k, 0.0) + v / units
    assert means["reward"] == pytest.approx(0.5 * means["reward_reward_model"] + means["reward_length"], abs=1e-6)
    assert means["reward_reward_model_std"] > 0


def test_a_reward_model_alone_is_enough_for_grpo(tmp_path):
    folder = tiny_reward_model(tmp_path / "rm")
    cfg = build_config({"objective": {"name": "grpo", "reward_model": str(folder)}})
    assert [r.name for r in objective_rewards(cfg.objective, "grpo")] == ["reward_model"]
    with pytest.raises(UserError, match="needs objective.rewards .* or objective.reward_model"):
        build_config({"objective": {"name": "grpo"}})
    with pytest.raises(UserError, match="ppo needs a reward"):
        objective_rewards(ObjectiveConfig(name="ppo"), "ppo")


def test_folders_that_are_no_reward_model_are_refused_at_once(tmp_path):
    with pytest.raises(UserError, match="no config.json"):
        check_reward_model_folder(str(tmp_path / "missing"))
    policy = tmp_path / "policy"
    build_tiny_model().save_pretrained(policy)  # a causal LM: a policy's folder given by mistake
    with pytest.raises(UserError, match="is not a reward model .*LlamaForCausalLM"):
        check_reward_model_folder(str(policy))
    with pytest.raises(UserError, match="is not a reward model"):
        objective_rewards(ObjectiveConfig(name="grpo", reward_model=str(policy)), "grpo")
    check_reward_model_folder(str(tiny_reward_model(tmp_path / "rm")))  # the reward objective's export passes


def test_a_reward_function_may_not_take_the_reward_models_name(tmp_path, monkeypatch):
    import sys
    import types

    monkeypatch.setitem(sys.modules, "my_rewards", types.SimpleNamespace(reward_model=lambda **kw: [0.0]))
    folder = tiny_reward_model(tmp_path / "rm")
    opts = ObjectiveConfig(name="grpo", reward_model=str(folder), rewards=["my_rewards:reward_model"])
    with pytest.raises(UserError, match="named 'reward_model'"):
        objective_rewards(opts, "grpo")
