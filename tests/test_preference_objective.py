"""The pair objectives' plumbing on a tiny model: one packed forward for chosen and rejected, answer
log-probabilities equal to a plain per-sequence computation, the reference as the method switched off,
accumulation invariance, filler pairs, metrics, and a killed DPO run resumed bit-exact."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import assert_resumes_bit_exact, build_tiny_model, killed_after, lora_model
from tunesmith.config import ObjectiveConfig, build_config
from tunesmith.methods.registry import get_method
from tunesmith.objectives.lm import IGNORE
from tunesmith.objectives.preference import answer_logps, collate_pairs, filler
from tunesmith.objectives.registry import get_objective
from tunesmith.train.checkpoint import checkpoint_tensors
from tunesmith.train.loop import train, train_step
from tunesmith.train.optim import build_optimizer
from tunesmith.config import TrainConfig


def pairs(n: int, seed: int = 0) -> list[dict]:
    """Hand-built encoded pairs: a shared prompt, then each answer; labels only on the answers."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        prompt = torch.randint(3, 300, (3 + i % 3,), generator=g).tolist()
        chosen = torch.randint(3, 300, (2 + i % 2,), generator=g).tolist()
        rejected = torch.randint(3, 300, (3 + i % 3,), generator=g).tolist()
        out.append({"prompt_len": len(prompt),
                    "chosen_ids": prompt + chosen, "chosen_labels": [IGNORE] * len(prompt) + chosen,
                    "rejected_ids": prompt + rejected, "rejected_labels": [IGNORE] * len(prompt) + rejected,
                    "truncated": False})
    return out


def plain_logp(model, ids: list[int], labels: list[int]) -> torch.Tensor:
    """log pi(answer | prompt) from the full logits of the sequence alone."""
    logits = model(torch.tensor([ids])).logits[0, :-1].float()
    logps = F.log_softmax(logits, dim=-1)
    target = torch.tensor(labels[1:])
    keep = target != IGNORE
    return logps[keep].gather(1, target[keep].unsqueeze(1)).sum()


@pytest.mark.parametrize("pack_len", [0, 10_000], ids=["padded", "packed"])
def test_answer_logps_equal_each_sequence_alone(pack_len):
    from tunesmith.models.attention import use_varlen_attention

    model = build_tiny_model()
    model.set_attn_implementation("sdpa")
    examples = pairs(4)
    expected = torch.stack([plain_logp(model, e[k + "_ids"], e[k + "_labels"])
                            for e in examples for k in ("chosen", "rejected")])
    if pack_len:
        use_varlen_attention(model)
    batch = collate_pairs(examples, pad_id=2, pack_len=pack_len)
    got, counts = answer_logps(model, batch)
    assert torch.allclose(got, expected, atol=1e-5)
    assert counts.tolist() == [len(e[k + "_ids"]) - e["prompt_len"] for e in examples for k in ("chosen", "rejected")]


def dpo(method=None, **options):
    return get_objective("dpo").configured(ObjectiveConfig(name="dpo", **options), method)


def test_at_initialisation_the_dpo_loss_is_ln2_and_rewards_are_zero():
    model, method = lora_model()  # B = 0: the policy is the reference
    objective = dpo(method, beta=0.1)
    total, units, metrics = objective.loss(model, collate_pairs(pairs(6), 2))
    assert units == 6
    assert abs(float(total.detach()) / units - math.log(2)) < 1e-6
    assert metrics["reward_chosen"] == metrics["reward_rejected"] == metrics["margin"] == 0.0
    assert metrics["accuracy"] == 0.0


def test_the_reference_is_the_model_with_the_method_switched_off():
    model, method = lora_model()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    batch = collate_pairs(pairs(4), 2)
    objective = dpo(method, beta=0.5)
    _, _, metrics = objective.loss(model, batch)
    policy = answer_logps(model, batch)[0]
    base = answer_logps(build_tiny_model(), batch)[0]  # the same weights without any adapter
    rewards = 0.5 * (policy - base)
    assert abs(metrics["reward_chosen"] - float(rewards[0::2].sum())) < 1e-4
    assert abs(metrics["margin"] - float((rewards[0::2] - rewards[1::2]).sum())) < 1e-4
    assert metrics["reward_chosen"] != 0.0


def test_a_filler_pair_adds_no_loss_no_unit_and_no_gradient():
    model, method = lora_model()
    objective = dpo(method)
    examples = pairs(3)
    plain = objective.loss(model, collate_pairs(examples, 2))
    padded = objective.loss(model, collate_pairs(examples + [filler(examples[0])], 2))
    assert padded[1] == plain[1] == 3
    assert abs(float(padded[0]) - float(plain[0])) < 1e-6 and padded[2] == pytest.approx(plain[2], abs=1e-6)


def grads(windows, objective_name="dpo"):
    model, method = lora_model()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(4))
    objective = get_objective(objective_name).configured(ObjectiveConfig(name=objective_name), method)
    if objective.add_head is not None:  # the reward model's score
        objective.add_head(model, None)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = build_optimizer(params, TrainConfig())
    result = train_step(model, opt, windows, 0, objective.loss, objective)
    return result, [p.grad.clone() for p in params]


@pytest.mark.parametrize("name", ["dpo", "orpo", "simpo", "reward"])
def test_accumulation_gives_the_gradient_of_one_big_batch(name):
    examples, collate = pairs(8), get_objective(name).collate
    one, g1 = grads([collate(examples, 2, 10_000)], name)
    two, g2 = grads([collate(examples[:4], 2, 0), collate(examples[4:], 2, 0)], name)
    eight, g8 = grads([collate([e], 2, 0) for e in examples], name)
    assert len(one.metrics) == len(get_objective(name).metrics) and one.loss > 0
    for other, g in ((two, g2), (eight, g8)):
        assert abs(other.loss - one.loss) < 1e-6 and other.units == one.units == 8
        assert all(abs(other.metrics[k] - one.metrics[k]) < 1e-6 for k in one.metrics)
        assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(g1, g))


def run(run_dir, monkeypatch, resume=False, kill_after=None):
    model, method = lora_model()
    cfg = build_config({"method": {"name": "lora", "r": 4, "alpha": 8, "dropout": 0.1},
                        "objective": {"name": "dpo", "beta": 0.5},
                        "train": {"max_steps": 4, "batch_size": 2, "save_every": 2, "lr": 0.01, "resume": resume},
                        "output": {"dir": str(run_dir)}})
    with killed_after(monkeypatch, kill_after):
        train(model, pairs(6), pairs(2, seed=1), cfg, run_dir, pad_id=2, objective=dpo(method, beta=0.5))
    return checkpoint_tensors(model)


def test_dpo_trains_logs_its_metrics_and_resumes_bit_exact(tmp_path, monkeypatch):
    records = assert_resumes_bit_exact(run, tmp_path, monkeypatch)
    steps = [r for r in records if "loss" in r]
    assert abs(steps[0]["loss"] - math.log(2)) < 1e-5  # the first step starts at the reference
    assert steps[-1]["loss"] < steps[0]["loss"] and steps[-1]["margin"] > 0
    assert all(k in steps[-1] for k in ("reward_chosen", "reward_rejected", "accuracy", "chosen_logp_drift"))
    assert "val_accuracy" in records[-1]


def test_a_precomputed_reference_equals_switching_the_adapters_off(tmp_path):
    from types import SimpleNamespace

    from tunesmith.objectives.preference import REFERENCE_FILE, precompute_reference

    examples, held_out = pairs(5), pairs(2, seed=3)
    cfg = build_config({"objective": {"name": "dpo", "reference": "precomputed"}})
    data = SimpleNamespace(train=examples, validation=held_out)
    precompute_reference(build_tiny_model(), data, cfg, tmp_path, pad_id=2, batch_size=2)
    assert (tmp_path / REFERENCE_FILE).is_file() and all(len(e["ref_logps"]) == 2 for e in examples + held_out)
    model, method = lora_model()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    batch = collate_pairs(examples, 2)
    switched = dpo(method).loss(model, {k: v for k, v in batch.items() if k != "ref_logps"})
    stored = get_objective("dpo").configured(cfg.objective, method).loss(model, batch)
    assert abs(float(switched[0].detach()) - float(stored[0].detach())) < 1e-5
    assert stored[2] == pytest.approx(switched[2], abs=1e-5)
    # a second run over the same examples reads the file instead of computing again
    again = SimpleNamespace(train=[dict(e, ref_logps=None) for e in examples], validation=held_out)
    precompute_reference(None, again, cfg, tmp_path, pad_id=2)  # no model: it must not be needed
    assert [e["ref_logps"] for e in again.train] == [e["ref_logps"] for e in examples]


def test_the_train_command_runs_dpo_on_the_demo_pairs(tmp_path):
    """objective.name=auto on preference rows is dpo; the run dir has its metrics; the test split scores."""
    from conftest import tiny_run_files
    from tunesmith.commands.train import train as train_command
    from tunesmith.config import load_config

    model_dir, files = tiny_run_files(tmp_path, n_train=8, n_validation=2, n_test=2)
    cfg = load_config(None, [f"model.name_or_path={model_dir}", f"data.train={files['preference_train']}",
                             f"data.validation={files['preference_validation']}",
                             f"data.test={files['preference_test']}", "train.max_steps=2", "train.batch_size=2",
                             "eval.max_new_tokens=4", f"output.dir={tmp_path / 'run'}", "data.cache=false"])
    summary = train_command(cfg)
    assert summary["objective"] == "dpo" and summary["unit"] == "pairs" and summary["tokens_seen"] == 4
    assert summary["before"] is not None and summary["after"] is not None
    steps = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert abs(steps[0]["loss"] - math.log(2)) < 1e-5 and "margin" in steps[0]
    assert (tmp_path / "run" / "adapter" / "adapter_config.json").is_file()


def test_orpo_and_simpo_follow_their_formulas_and_need_no_reference():
    """Reference-free: computed from the policy's mean answer log-probabilities alone, so `full` can run them."""
    model = build_tiny_model()
    batch = collate_pairs(pairs(4), 2)
    logps, counts = answer_logps(model, batch)
    a = logps / counts
    aw, al = a[0::2].double(), a[1::2].double()
    orpo = get_objective("orpo").configured(ObjectiveConfig(name="orpo", beta=0.25), get_method("full"))
    log_odds = (aw - al) - (torch.log1p(-torch.exp(aw)) - torch.log1p(-torch.exp(al)))
    expected = (-aw - 0.25 * F.logsigmoid(log_odds)).sum()
    total, units, metrics = orpo.loss(model, batch)
    assert units == 4 and abs(float(total) - float(expected)) < 1e-4
    assert abs(metrics["log_odds_ratio"] - float(log_odds.sum())) < 1e-4
    simpo = get_objective("simpo").configured(ObjectiveConfig(name="simpo", beta=2.0, gamma_beta_ratio=0.5))
    expected = (-F.logsigmoid(2.0 * (aw - al) - 1.0)).sum()  # gamma = 0.5 * 2.0
    assert abs(float(simpo.loss(model, batch)[0]) - float(expected)) < 1e-4


def test_simpo_margin_takes_one_scale_only():
    from tunesmith.errors import UserError
    from tunesmith.config import load_config

    with pytest.raises(UserError, match="set one of them"):
        load_config(None, ["objective.name=simpo", "objective.gamma=1", "objective.gamma_beta_ratio=0.5"])
    with pytest.raises(UserError, match="label_smoothing applies to loss cdpo or robust"):
        load_config(None, ["objective.name=dpo", "objective.label_smoothing=0.1"])


def test_full_fine_tuning_runs_dpo_with_a_precomputed_reference(tmp_path):
    from conftest import tiny_run_files
    from tunesmith.commands.train import train as train_command
    from tunesmith.config import load_config
    from tunesmith.objectives.preference import REFERENCE_FILE

    model_dir, files = tiny_run_files(tmp_path, n_train=6, n_validation=2, n_test=1)
    cfg = load_config(None, [f"model.name_or_path={model_dir}", f"data.train={files['preference_train']}",
                             f"data.validation={files['preference_validation']}", "method.name=full",
                             "objective.name=dpo", "train.max_steps=2", "train.batch_size=2", "train.lr=1e-3",
                             f"output.dir={tmp_path / 'run'}", "data.cache=false"])
    summary = train_command(cfg)
    assert (tmp_path / "run" / REFERENCE_FILE).is_file() and summary["objective"] == "dpo"
    steps = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines() if '"loss"' in l]
    assert abs(steps[0]["loss"] - math.log(2)) < 1e-4  # the base model is its own reference at step 1


def test_likelihood_displacement_is_warned_once(tmp_path, caplog):
    """A tiny drift_warning makes the first step that lowers the chosen answers warn, and only once."""
    import logging

    model, method = lora_model()
    cfg = build_config({"objective": {"name": "dpo", "beta": 0.5, "drift_warning": 1e-6},
                        "train": {"max_steps": 4, "batch_size": 2, "lr": 0.05}, "output": {"dir": str(tmp_path)}})
    objective = get_objective("dpo").configured(cfg.objective, method)
    with caplog.at_level(logging.WARNING):
        train(model, pairs(6), [], cfg, tmp_path, pad_id=2, objective=objective)
    drifts = [json.loads(l)["chosen_logp_drift"] for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert min(drifts) < -1e-6
    assert caplog.text.count("likelihood displacement") == 1
    assert get_objective("dpo").configured(ObjectiveConfig(name="dpo"), method).check_step(
        {"chosen_logp_drift": -1.0}) is None  # the default margin (5 nats) is not crossed
