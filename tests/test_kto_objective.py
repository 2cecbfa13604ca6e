"""The kto objective's plumbing on a tiny model: the mismatched KL sequences of a micro-batch, the loss w / 2
at the reference, z0 per micro-batch (so a window's gradient is the sum of its micro-batches', each with its
own z0), a LoRA run that lowers the loss and resumes bit-exact, and objective auto on unpaired rows."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import assert_resumes_bit_exact, build_tiny_model, build_tiny_tokenizer, killed_after
from tunesmith.config import MethodConfig, ObjectiveConfig, TrainConfig, build_config
from tunesmith.data.preference import encode_unpaired
from tunesmith.errors import UserError
from tunesmith.methods.registry import get_method
from tunesmith.objectives.kto import collate_unpaired, filler
from tunesmith.objectives.lm import IGNORE
from tunesmith.objectives.preference import answer_logps
from tunesmith.objectives.registry import get_objective
from tunesmith.train.checkpoint import checkpoint_tensors
from tunesmith.train.loop import train, train_step
from tunesmith.train.optim import build_optimizer


def examples(n: int, seed: int = 0) -> list[dict]:
    """Hand-built encoded unpaired examples, labels only on the answer; every other one desirable."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        prompt = torch.randint(3, 300, (3 + i % 3,), generator=g).tolist()
        answer = torch.randint(3, 300, (2 + i % 2,), generator=g).tolist()
        out.append({"prompt_len": len(prompt), "input_ids": prompt + answer,
                    "labels": [IGNORE] * len(prompt) + answer, "label": i % 2 == 0, "truncated": False})
    return out


def sequences_of(batch: dict) -> list[list[int]]:
    """The token ids of each sequence of a collated batch, in sequence order."""
    ids, owner = batch["input_ids"], batch["sequence_ids"]
    return [ids[owner == s].tolist() for s in range(int(owner.max()) + 1)]


@pytest.mark.parametrize("pack_len", [0, 10_000], ids=["padded", "packed"])
def test_the_kl_sequences_are_each_prompt_with_the_previous_answer(pack_len):
    tok = build_tiny_tokenizer()
    rows = [{"prompt": f"Question {q}?", "completion": a, "label": q % 2 == 0}
            for q, a in enumerate(["alpha", "beta gamma", "delta", "epsilon zeta eta"])]
    encoded = [encode_unpaired(r, tok, 256) for r in rows]
    batch = collate_unpaired(encoded, pad_id=2, pack_len=pack_len)
    seqs = sequences_of(batch)
    assert len(seqs) == 8 and batch["kl_prompt"].tolist() == [0, 1, 2, 3]
    assert seqs[:4] == [e["input_ids"] for e in encoded]
    assert batch["desirable"].tolist() == [True, False, True, False]
    assert batch["example_weight"].tolist() == [1.0] * 4
    for i in range(4):
        text = tok.decode(seqs[4 + i])
        assert f"Question {i}?" in text and text.endswith(rows[i - 1]["completion"] + "<|im_end|>")
        assert text == tok.decode(encoded[i]["input_ids"][: encoded[i]["prompt_len"]]) + \
            tok.decode(encoded[i - 1]["input_ids"][encoded[i - 1]["prompt_len"]:])
    # labels on the answers only, the KL sequences included
    labelled = (batch["labels"][:, 1:] != IGNORE)
    owner = batch["sequence_ids"][:, 1:]
    counts = torch.bincount(owner[labelled], minlength=8).tolist()
    answers = [len(e["input_ids"]) - e["prompt_len"] for e in encoded]
    assert counts == answers + [answers[i - 1] for i in range(4)]


def test_one_example_or_fillers_only_give_no_kl_sequences():
    one = collate_unpaired(examples(1), 2)
    assert one["kl_prompt"].numel() == 0 and sequences_of(one) == [examples(1)[0]["input_ids"]]
    some = examples(3)
    batch = collate_unpaired(some + [filler(some[0])], 2)  # the filler is left out of z0's pairs
    assert batch["kl_prompt"].tolist() == [0, 1, 2] and len(sequences_of(batch)) == 7
    assert batch["example_weight"].tolist() == [1.0, 1.0, 1.0, 0.0]


def lora_model():
    model = build_tiny_model()
    method = get_method("lora")
    torch.manual_seed(0)
    method.apply(model, MethodConfig(r=4, alpha=8, dropout=0.0))
    return model, method


def kto(method=None, **options):
    return get_objective("kto").configured(ObjectiveConfig(name="kto", **options), method)


def perturb(model, std: float, seed: int = 4) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, std, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("weights", [(1.0, 1.0), (1.33, 0.7)])
def test_at_initialisation_each_loss_is_half_its_weight_and_z0_is_zero(weights):
    model, method = lora_model()  # B = 0: the policy is the reference
    wd, wu = weights
    batch_examples = examples(6)  # 3 desirable, 3 undesirable
    total, units, metrics = kto(method, desirable_weight=wd, undesirable_weight=wu).loss(
        model, collate_unpaired(batch_examples, 2))
    assert units == 6
    expected = sum((wd if e["label"] else wu) / 2 for e in batch_examples) / 6
    assert abs(float(total.detach()) / units - expected) < 1e-6
    assert metrics == {"reward_desirable": 0.0, "reward_undesirable": 0.0, "kl": 0.0}


def test_the_loss_follows_the_formula_with_z0_from_the_mismatched_pairs():
    from tunesmith.objectives.kto import batch_kl, kto_losses

    model, method = lora_model()
    perturb(model, 0.5)
    batch_examples = examples(5)
    batch = collate_unpaired(batch_examples, 2)
    total, units, metrics = kto(method, beta=0.3).loss(model, batch)
    logps = answer_logps(model, batch, 10)[0].detach()
    base = answer_logps(build_tiny_model(), batch, 10)[0].detach()  # the reference: no adapter at all
    z0 = batch_kl(logps[5:], base[5:])
    losses, rewards = kto_losses(logps[:5], base[:5], batch["desirable"], z0, 0.3)
    assert abs(float(total.detach()) - float(losses.sum())) < 1e-5 and units == 5
    assert abs(metrics["kl"] - 5 * float(z0)) < 1e-4
    desirable = batch["desirable"]
    assert abs(metrics["reward_desirable"] - float(rewards[desirable].sum())) < 1e-4
    assert abs(metrics["reward_undesirable"] - float(rewards[~desirable].sum())) < 1e-4
    assert metrics["reward_desirable"] != 0.0


def test_a_filler_adds_no_loss_no_unit_and_a_single_example_takes_z0_zero():
    model, method = lora_model()
    perturb(model, 0.5)
    objective = kto(method)
    some = examples(3)
    plain = objective.loss(model, collate_unpaired(some, 2))
    padded = objective.loss(model, collate_unpaired(some + [filler(some[0])], 2))
    assert padded[1] == plain[1] == 3
    assert abs(float(padded[0].detach()) - float(plain[0].detach())) < 1e-6
    assert padded[2] == pytest.approx(plain[2], abs=1e-6)
    alone = objective.loss(model, collate_unpaired([filler(some[0])], 2))
    assert alone[1] == 0 and float(alone[0].detach()) == 0.0 and alone[2]["kl"] == 0.0
    single = objective.loss(model, collate_unpaired(some[:1], 2))
    assert single[1] == 1 and single[2]["kl"] == 0.0


def test_a_method_without_a_switch_is_refused():
    with pytest.raises(UserError, match="needs an adapter method"):
        kto(get_method("full"))


def window_grads(micro_batches):
    """(the step's result, the gradients) of one accumulation window through the loop's train_step."""
    model, method = lora_model()
    perturb(model, 0.1)
    objective = kto(method)
    params = [p for p in model.parameters() if p.requires_grad]
    result = train_step(model, build_optimizer(params, TrainConfig()), micro_batches, 0, objective.loss, objective)
    return result, [p.grad.clone() for p in params]


def separate_grads(micro_batches, window_units: int):
    """Each micro-batch's loss alone, divided by the window's examples, summed: what a window must give."""
    total, grads = 0.0, None
    for batch in micro_batches:
        model, method = lora_model()
        perturb(model, 0.1)
        loss_sum, _, _ = kto(method).loss(model, batch)
        (loss_sum / window_units).backward()
        total += float(loss_sum.detach())
        g = [p.grad.clone() for p in model.parameters() if p.requires_grad]
        grads = g if grads is None else [a + b for a, b in zip(grads, g)]
    return total / window_units, grads


def test_a_window_is_the_sum_of_its_micro_batches_each_with_its_own_z0():
    """z0 is per micro-batch, so 1 x 8 and 2 x 4 differ by design (as in TRL); the loop still normalises a
    window by all its examples."""
    data = examples(8)
    one, g1 = window_grads([collate_unpaired(data, 2)])
    two_batches = [collate_unpaired(data[:4], 2), collate_unpaired(data[4:], 2)]
    two, g2 = window_grads(two_batches)
    assert one.units == two.units == 8 and set(two.metrics) == {"reward_desirable", "reward_undesirable", "kl"}
    loss, expected = separate_grads(two_batches, 8)
    assert abs(two.loss - loss) < 1e-6
    assert all(torch.allclose(a, b, atol=1e-7) for a, b in zip(g2, expected))
    assert two.metrics["kl"] > 0 and one.metrics["kl"] != pytest.approx(two.metrics["kl"], abs=1e-9)


def run(run_dir, monkeypatch, resume=False, kill_after=None):
    model, method = lora_model()
    cfg = build_config({"method": {"name": "lora", "r": 4, "alpha": 8, "dropout": 0.1},
                        "objective": {"name": "kto", "beta": 0.5},
                        "train": {"max_steps": 4, "batch_size": 3, "save_every": 2, "lr": 0.01, "resume": resume},
                        "output": {"dir": str(run_dir)}})
    with killed_after(monkeypatch, kill_after):
        train(model, examples(6), examples(3, seed=1), cfg, run_dir, pad_id=2, objective=kto(method, beta=0.5))
    return checkpoint_tensors(model)


def test_kto_trains_logs_its_metrics_and_resumes_bit_exact(tmp_path, monkeypatch):
    records = assert_resumes_bit_exact(run, tmp_path, monkeypatch)
    steps = [r for r in records if "loss" in r]
    assert abs(steps[0]["loss"] - 0.5) < 1e-5  # the first step starts at the reference
    assert steps[-1]["loss"] < steps[0]["loss"]
    assert all(k in steps[-1] for k in ("reward_desirable", "reward_undesirable", "kl"))
    assert "val_kl" in records[-1]


def test_the_train_command_picks_kto_for_the_demo_unpaired_rows(tmp_path):
    from conftest import tiny_run_files
    from tunesmith.commands.train import train as train_command
    from tunesmith.config import load_config

    model_dir, files = tiny_run_files(tmp_path, n_train=8, n_validation=2, n_test=2)
    cfg = load_config(None, [f"model.name_or_path={model_dir}", f"data.train={files['unpaired_train']}",
                             f"data.validation={files['unpaired_validation']}", "train.max_steps=2",
                             "train.batch_size=2", f"output.dir={tmp_path / 'run'}", "data.cache=false"])
    summary = train_command(cfg)
    assert summary["objective"] == "kto" and summary["unit"] == "examples" and summary["tokens_seen"] == 4
    steps = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines() if '"loss"' in l]
    assert abs(steps[0]["loss"] - 0.5) < 1e-5 and "kl" in steps[0] and "reward_desirable" in steps[0]
    assert (tmp_path / "run" / "adapter" / "adapter_config.json").is_file()
