"""GRPO as an objective (tunesmith/objectives/grpo.py) on the tiny model: the rollout's batches, flat groups
skipped with the gradient unchanged, the first update's ratio exactly 1, the rollout buffer surviving a kill,
and a run through the train command on the demo task's prompt rows."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import assert_resumes_bit_exact, build_tiny_model, build_tiny_tokenizer, killed_after, lora_model
from tunesmith.config import ObjectiveConfig, build_config
from tunesmith.data.dataset import collate as _unused  # noqa: F401 (the loop's module graph, imported once)
from tunesmith.data.tokenize import IGNORE
from tunesmith.methods.registry import switch_adapters_off
from tunesmith.objectives import grpo, grpo_rollout
from tunesmith.rl.rewards import Reward
from tunesmith.train.checkpoint import checkpoint_tensors
from tunesmith.train.loop import rollout_generator, train

G = 4


def vowels(prompts, completions, **columns):
    """A toy reward with a graded signal on a random model's output: the share of vowels in the text."""
    return [sum(ch in "aeiou" for ch in c) / max(1, len(c)) for c in completions]


def flat_for_odd(prompts, completions, answer, **columns):
    """Constant for the prompts whose answer is odd (flat groups), graded for the others."""
    return [1.0 if int(a) % 2 else len(c) / 10 for c, a in zip(completions, answer)]


def examples(tok, n: int = 4) -> list[dict]:
    cfg = build_config({}).data
    rows = [{"prompt": f"Say {i} things about foxes.", "answer": str(i)} for i in range(n)]
    out = [grpo.encode(r, "prompt", tok, cfg) for r in rows]
    grpo.number_examples(out)
    return out


def objective(tok, data, reward=vowels, run_dir=None, reference=switch_adapters_off, **options):
    opts = ObjectiveConfig(name="grpo", rewards=["length"], num_generations=G, max_new_tokens=6, **options)
    return grpo.bind(opts, [Reward(reward.__name__, reward)], reference, grpo.Run(tok, data, 2, run_dir))


def window(data, per_batch=2):
    return [grpo.collate(data[i : i + per_batch], 2) for i in range(0, len(data), per_batch)]


def test_a_rollout_batches_prompt_and_completion_with_labels_on_the_completion():
    tok, model = build_tiny_tokenizer(), build_tiny_model()
    data = examples(tok)
    obj = objective(tok, data)
    batches = obj.rollout(model, window(data), 0, rollout_generator(0, 0))
    assert len(batches) == 2 and all(b["input_ids"].shape[0] == 2 * G for b in batches)
    again = obj.rollout(model, window(data), 0, rollout_generator(0, 0))
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(batches, again))  # seeded by step
    other = obj.rollout(model, window(data), 1, rollout_generator(0, 1))
    assert not all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(batches, other))
    for k, b in enumerate(batches):
        for row in range(b["input_ids"].shape[0]):
            labelled = b["labels"][row] != IGNORE
            n = int(b["completion_mask"][row].sum())
            assert int(labelled.sum()) == n >= 1
            prompt_len = int(labelled.nonzero()[0])
            assert b["input_ids"][row, :prompt_len].tolist() == data[row // G + 2 * k]["input_ids"]
        assert torch.allclose(b["advantages"].view(-1, G).sum(1), torch.zeros(2), atol=1e-5)  # centred per group
        assert int(b["units"]) == int(b["completion_mask"].sum())  # dapo: completion tokens
    total, units, metrics = obj.loss(model, batches[0])
    assert units == int(batches[0]["units"]) and torch.isfinite(total)
    assert 0 <= metrics["reward"] * 2 / units <= 1 and metrics["completion_length"] > 0


def window_gradient(model, obj, batches):
    """The loop's gradient of a window: each micro-batch's loss sum / the window's units."""
    model.zero_grad()
    units = sum(obj.units(b) for b in batches)
    for b in batches:
        (obj.loss(model, b)[0] / units).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def as_loss_type(obj, batches, loss_type):
    """The batches and objective of another loss type: only the units differ (grpo_rollout.batch_units)."""
    opts = obj.loss.keywords["opts"].model_copy(update={"loss_type": loss_type})
    out = []
    for b in batches:
        seqs = int(b["skipped_sequences"]) + (b["input_ids"].shape[0] if "input_ids" in b else 0)
        tokens = int(b["skipped_tokens"]) + (int(b["completion_mask"].sum()) if "input_ids" in b else 0)
        out.append({**b, "units": torch.tensor(grpo_rollout.batch_units(loss_type, seqs, tokens))})
    return grpo.bind(opts, [], None, None), out


def test_flat_groups_are_skipped_and_the_gradient_is_unchanged(monkeypatch):
    tok, model = build_tiny_tokenizer(), build_tiny_model()
    model.train()
    data = examples(tok)
    obj = objective(tok, data, flat_for_odd, temperature=1.5)
    skipped = obj.rollout(model, window(data), 0, rollout_generator(0, 0))
    assert all(int(b["skipped_sequences"]) == G for b in skipped)  # prompt 1 and 3 of each micro-batch are flat
    assert all(b["input_ids"].shape[0] == G for b in skipped)
    stats = sum(float(b["stat/frac_reward_zero_std"]) for b in skipped) / sum(obj.units(b) for b in skipped)
    assert stats == pytest.approx(0.5)
    monkeypatch.setattr(grpo_rollout, "SKIP_FLAT", False)
    kept = obj.rollout(model, window(data), 0, rollout_generator(0, 0))
    assert all(b["input_ids"].shape[0] == 2 * G and int(b["skipped_sequences"]) == 0 for b in kept)
    for loss_type in ("grpo", "bnpo", "dr_grpo", "dapo"):
        typed, with_flat = as_loss_type(obj, kept, loss_type)
        _, without = as_loss_type(obj, skipped, loss_type)
        assert [typed.units(b) for b in with_flat] == [typed.units(b) for b in without]
        full, cut = window_gradient(model, typed, with_flat), window_gradient(model, typed, without)
        assert full.keys() == cut.keys() and full
        for name in full:
            torch.testing.assert_close(full[name], cut[name], atol=1e-7, rtol=1e-5)
        assert any(g.abs().max() > 0 for g in cut.values())


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_the_first_update_of_a_rollout_has_ratio_exactly_one(padding_side):
    """num_iterations > 1: the old log-probabilities come from the same forward as the loss, without gradient;
    the rollout's batches are right-padded, and a left-padded copy of a batch gives ratio 1 too."""
    tok, (model, _) = build_tiny_tokenizer(), lora_model()
    model.train()
    data = examples(tok)
    obj = objective(tok, data, num_iterations=2)
    batch = obj.rollout(model, window(data), 0, rollout_generator(0, 0))[0]
    if padding_side == "left":
        batch = left_padded(batch)
    logps, _ = grpo.completion_logps(model, batch)
    with torch.no_grad():
        old, _ = grpo.completion_logps(model, batch)
    assert torch.equal(logps.detach(), old)
    assert torch.equal(logps.detach(), batch["old_logps"]) or padding_side == "left"
    assert (torch.exp(logps - old)[batch["completion_mask"].bool()] == 1).all()


def left_padded(batch):
    """The batch with each row's padding moved to its start, position ids counted from the first real token."""
    out = dict(batch)
    width = batch["input_ids"].shape[1]
    n = batch["attention_mask"].sum(1)
    order = (torch.arange(width)[None, :] - (width - n)[:, None]) % width  # row-wise roll by the padding
    for key in ("input_ids", "attention_mask", "labels"):
        out[key] = batch[key].gather(1, order)
    out["position_ids"] = (out["attention_mask"].cumsum(1) - 1).clamp(min=0)
    return out


def run_grpo(run_dir, monkeypatch, resume=False, kill_after=None):
    tok, (model, _) = build_tiny_tokenizer(), lora_model()
    data = examples(tok)
    cfg = build_config({"method": {"name": "lora", "dropout": 0.0}, "output": {"dir": str(run_dir)},
                        "objective": {"name": "grpo", "rewards": ["length"]},
                        "train": {"max_steps": 4, "batch_size": 2, "save_every": 1, "lr": 0.05, "resume": resume}})
    obj = objective(tok, data, run_dir=run_dir, num_iterations=3, beta=0.04)
    with killed_after(monkeypatch, kill_after):
        train(model, data, [], cfg, run_dir, pad_id=2, objective=obj)
    return checkpoint_tensors(model)


def test_a_killed_and_resumed_grpo_run_equals_the_uninterrupted_one(tmp_path, monkeypatch):
    """Killed after step 2 of a 3-update rollout: the resumed run reads the rollout of step 1 from output.dir."""
    records = assert_resumes_bit_exact(run_grpo, tmp_path, monkeypatch)
    assert (tmp_path / "b" / "rollout").is_dir()
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    assert steps[0]["kl"] == 0 and steps[1]["kl"] > 0  # the policy leaves the reference after the first update
    assert steps[0]["clip_low"] == steps[0]["clip_high"] == 0
    assert steps[1]["completion_length"] == steps[0]["completion_length"]  # the same rollout, reused
    assert steps[3]["completion_length"] != steps[0]["completion_length"] or steps[3]["reward"] != steps[0]["reward"]


def test_the_no_signal_warning_needs_several_flat_steps_in_a_row():
    seen = [0]
    flat, mixed = {"frac_reward_zero_std": 0.95}, {"frac_reward_zero_std": 0.5}
    assert [grpo.no_signal_warning(m, seen) for m in [flat] * 4 + [mixed] + [flat] * 4] == [None] * 9
    assert "no signal" in grpo.no_signal_warning(flat, seen)


def test_grpo_through_the_train_command_on_demo_prompts(tmp_path):
    from conftest import tiny_run_files
    from tunesmith.commands.train import train as train_command
    from tunesmith.config import load_config

    model_dir, files = tiny_run_files(tmp_path, n_train=4, n_validation=2, n_test=2)
    cfg = load_config(None, [f"model.name_or_path={model_dir}", f"data.train={files['prompt_train']}",
                             f"data.validation={files['prompt_validation']}", "objective.name=grpo",
                             "objective.rewards=[valid_json, {name: length, options: {max_chars: 4}}]",
                             "objective.num_generations=2", "objective.max_new_tokens=4", "train.max_steps=2",
                             "train.batch_size=2", "eval.before_after=false", f"output.dir={tmp_path / 'run'}",
                             "data.cache=false", "method.r=2"])
    summary = train_command(cfg)
    assert summary["objective"] == "grpo" and summary["steps"] == 2
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert len(steps) == 2 and all({"reward_valid_json", "reward_length_std", "policy_loss"} <= set(r) for r in steps)
    assert "val_reward" in records[-1] and 0 <= records[-1]["val_reward_length"] <= 1
