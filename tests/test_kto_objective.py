"""The kto objective's plumbing on a tiny model: KL partners fixed in dataset order, the loss w / 2 at the
reference, z0 over the whole window (so 1 x 8, 2 x 4 and 8 x 1 give the same loss and gradient), validation
with one z0 for the set, the precomputed reference (equal to switching the adapters off, recomputed when stale,
a kill during its computation resumed bit-exact), LoRA and full runs, and objective auto on unpaired rows."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from conftest import assert_resumes_bit_exact, build_tiny_model, build_tiny_tokenizer, killed_after, lora_model
from tunesmith.config import ObjectiveConfig, TrainConfig, build_config
from tunesmith.data.preference import encode_unpaired
from tunesmith.methods.registry import get_method
from tunesmith.objectives.kto import assign_kl_partners, batch_kl, collate_unpaired, filler, kto_losses
from tunesmith.objectives.lm import IGNORE
from tunesmith.objectives.preference import REFERENCE_FILE, answer_logps
from tunesmith.objectives.registry import get_objective
from tunesmith.train import faults
from tunesmith.train.checkpoint import checkpoint_tensors
from tunesmith.train.loop import train, train_step
from tunesmith.train.optim import build_optimizer
from tunesmith.train.validate import held_out_score


def examples(n: int, seed: int = 0) -> list[dict]:
    """Hand-built encoded unpaired examples, labels only on the answer; every other one desirable; KL partners
    assigned (what the objective's prepare step does)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        prompt = torch.randint(3, 300, (3 + i % 3,), generator=g).tolist()
        answer = torch.randint(3, 300, (2 + i % 2,), generator=g).tolist()
        out.append({"prompt_len": len(prompt), "input_ids": prompt + answer,
                    "labels": [IGNORE] * len(prompt) + answer, "label": i % 2 == 0, "truncated": False})
    assign_kl_partners(out)
    return out


def sequences_of(batch: dict, prefix: str = "") -> list[list[int]]:
    """The token ids of each sequence of a collated batch (or of its KL sequences, prefix "kl."), in order."""
    ids, owner = batch[prefix + "input_ids"], batch[prefix + "sequence_ids"]
    return [ids[owner == s].tolist() for s in range(int(owner.max()) + 1)]


@pytest.mark.parametrize("pack_len", [0, 10_000], ids=["padded", "packed"])
def test_the_kl_sequences_are_each_prompt_with_the_previous_answer_in_dataset_order(pack_len):
    tok = build_tiny_tokenizer()
    rows = [{"prompt": f"Question {q}?", "completion": a, "label": q % 2 == 0}
            for q, a in enumerate(["alpha", "beta gamma", "delta", "epsilon zeta eta"])]
    encoded = [encode_unpaired(r, tok, 256) for r in rows]
    assign_kl_partners(encoded)
    batch = collate_unpaired(encoded, pad_id=2, pack_len=pack_len)
    assert sequences_of(batch) == [e["input_ids"] for e in encoded]
    assert batch["desirable"].tolist() == [True, False, True, False]
    assert batch["example_weight"].tolist() == [1.0] * 4
    kl = sequences_of(batch, "kl.")
    for i in range(4):
        text = tok.decode(kl[i])
        assert f"Question {i}?" in text and text.endswith(rows[i - 1]["completion"] + "<|im_end|>")
        assert text == tok.decode(encoded[i]["input_ids"][: encoded[i]["prompt_len"]]) + \
            tok.decode(encoded[i - 1]["input_ids"][encoded[i - 1]["prompt_len"]:])
    labelled = batch["kl.labels"][:, 1:] != IGNORE  # labels on the answers only
    counts = torch.bincount(batch["kl.sequence_ids"][:, 1:][labelled], minlength=4).tolist()
    answers = [len(e["input_ids"]) - e["prompt_len"] for e in encoded]
    assert counts == [answers[i - 1] for i in range(4)]
    # the partner is the previous example of the split, whatever micro-batch the example lands in
    alone = collate_unpaired(encoded[2:3], pad_id=2, pack_len=pack_len)
    assert sequences_of(alone, "kl.") == [kl[2]]


def test_a_lone_example_is_its_own_partner_and_unprepared_examples_are_refused():
    one = examples(1)
    assert one[0]["kl_input_ids"] == one[0]["input_ids"] and one[0]["kl_labels"] == one[0]["labels"]
    raw = [{k: v for k, v in e.items() if not k.startswith("kl_")} for e in examples(2)]
    with pytest.raises(ValueError, match="prepare step"):
        collate_unpaired(raw, 2)


def kto(method=None, **options):
    return get_objective("kto").configured(ObjectiveConfig(name="kto", **options), method)


def perturb(model, std: float, seed: int = 4) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, std, generator=torch.Generator().manual_seed(seed))


def loss_of(objective, model, window):
    """Each micro-batch's (loss sum, units, metrics) after the objective's before_window hook."""
    return [objective.loss(model, b) for b in objective.before_window(model, window)]


@pytest.mark.parametrize("weights", [(1.0, 1.0), (1.33, 0.7)])
def test_at_initialisation_each_loss_is_half_its_weight_and_z0_is_zero(weights):
    model, method = lora_model()  # B = 0: the policy is the reference
    wd, wu = weights
    batch_examples = examples(6)  # 3 desirable, 3 undesirable
    objective = kto(method, desirable_weight=wd, undesirable_weight=wu)
    [(total, units, metrics)] = loss_of(objective, model, [collate_unpaired(batch_examples, 2)])
    assert units == 6
    expected = sum((wd if e["label"] else wu) / 2 for e in batch_examples) / 6
    assert abs(float(total.detach()) / units - expected) < 1e-6
    assert metrics == {"reward_desirable": 0.0, "reward_undesirable": 0.0, "kl": 0.0}


def test_the_loss_follows_the_formula_with_z0_from_the_kl_sequences_and_needs_the_hook():
    model, method = lora_model()
    perturb(model, 0.5, seed=25)  # a seed whose z0 is not clamped to 0
    batch = collate_unpaired(examples(5), 2)
    objective = kto(method, beta=0.3)
    [(total, units, metrics)] = loss_of(objective, model, [batch])
    base = build_tiny_model()  # the reference: no adapter at all
    kl = {k.removeprefix("kl."): v for k, v in batch.items() if k.startswith("kl.")}
    z0 = batch_kl(answer_logps(model, kl, 5)[0].detach(), answer_logps(base, kl, 5)[0].detach())
    logps, ref = answer_logps(model, batch, 5)[0].detach(), answer_logps(base, batch, 5)[0].detach()
    losses, rewards = kto_losses(logps, ref, batch["desirable"], z0, 0.3)
    assert abs(float(total.detach()) - float(losses.sum())) < 1e-5 and units == 5
    assert abs(metrics["kl"] - 5 * float(z0)) < 1e-4 and float(z0) > 0
    desirable = batch["desirable"]
    assert abs(metrics["reward_desirable"] - float(rewards[desirable].sum())) < 1e-4
    assert abs(metrics["reward_undesirable"] - float(rewards[~desirable].sum())) < 1e-4
    with pytest.raises(ValueError, match="before_window"):
        objective.loss(model, batch)


def test_a_filler_adds_no_loss_no_unit_and_nothing_to_z0():
    model, method = lora_model()
    perturb(model, 0.5, seed=25)
    objective = kto(method)
    some = examples(3)
    [plain] = loss_of(objective, model, [collate_unpaired(some, 2)])
    [padded] = loss_of(objective, model, [collate_unpaired(some + [filler(some[0])], 2)])
    assert padded[1] == plain[1] == 3
    assert abs(float(padded[0].detach()) - float(plain[0].detach())) < 1e-6
    assert padded[2] == pytest.approx(plain[2], abs=1e-6)
    # a micro-batch holding only a filler adds nothing and takes the window's z0
    first, alone = loss_of(objective, model, [collate_unpaired(some, 2), collate_unpaired([filler(some[0])], 2)])
    assert alone[1] == 0 and float(alone[0].detach()) == 0.0 and alone[2]["kl"] == 0.0
    assert first[2]["kl"] == pytest.approx(plain[2]["kl"], abs=1e-6)


def window_grads(micro_batches):
    """(the step's result, the gradients) of one accumulation window: the hook, then the loop's train_step."""
    model, method = lora_model()
    perturb(model, 0.1, seed=11)  # a seed whose z0 is not clamped to 0
    objective = kto(method)
    params = [p for p in model.parameters() if p.requires_grad]
    window = objective.before_window(model, micro_batches)
    result = train_step(model, build_optimizer(params, TrainConfig()), window, 0, objective.loss, objective)
    return result, [p.grad.clone() for p in params]


def test_accumulation_gives_the_loss_and_gradient_of_one_big_batch():
    """z0 belongs to the window: 1 x 8, 2 x 4 and 8 x 1 give the same loss, metrics and gradient."""
    data = examples(8)
    one, g1 = window_grads([collate_unpaired(data, 2)])
    assert one.units == 8 and one.metrics["kl"] > 0 and one.loss > 0
    for split in (4, 1):
        other, g = window_grads([collate_unpaired(data[i : i + split], 2) for i in range(0, 8, split)])
        assert abs(other.loss - one.loss) < 1e-6 and other.units == 8
        assert all(abs(other.metrics[k] - one.metrics[k]) < 1e-6 for k in one.metrics)
        assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(g1, g))


def test_validation_takes_one_z0_for_the_whole_set_whatever_the_batch_size():
    model, method = lora_model()
    perturb(model, 0.3, seed=7)  # a seed whose z0 is not clamped to 0
    objective, held_out = kto(method), examples(5, seed=2)
    scores = [held_out_score(model, held_out, size, 2, objective) for size in (1, 2, 5)]
    assert scores[0]["val_kl"] > 0
    for other in scores[1:]:
        assert other == pytest.approx(scores[0], abs=1e-6)


def prepare(model, train_examples, held_out, run_dir, reference="precomputed", method_name="lora"):
    """The objective's prepare step on a base model, with the given reference; returns the data."""
    cfg = build_config({"objective": {"name": "kto", "reference": reference}})
    data = SimpleNamespace(train=train_examples, validation=held_out)
    get_objective("kto").prepare(model, data, cfg, run_dir, 2, get_method(method_name))
    return data, cfg


def test_a_precomputed_reference_equals_switching_the_adapters_off(tmp_path):
    data, cfg = prepare(build_tiny_model(), examples(5), examples(2, seed=3), tmp_path)
    assert (tmp_path / REFERENCE_FILE).is_file()
    assert all(len(e["ref_logps"]) == 2 for e in data.train + data.validation)
    model, method = lora_model()
    perturb(model, 0.3, seed=25)  # a seed whose z0 is not clamped to 0
    window = [collate_unpaired(data.train[:3], 2), collate_unpaired(data.train[3:], 2)]
    switched = loss_of(kto(method), model, [{k: v for k, v in b.items() if "ref_logps" not in k} for b in window])
    stored = loss_of(get_objective("kto").configured(cfg.objective, method), model, window)
    assert stored[0][2]["kl"] > 0
    for a, b in zip(switched, stored):
        assert abs(float(a[0].detach()) - float(b[0].detach())) < 1e-5 and a[2] == pytest.approx(b[2], abs=1e-5)
    # the reference file is read back by a run over the same examples: no model needed
    again, _ = prepare(None, [{k: v for k, v in e.items() if k != "ref_logps"} for e in examples(5)],
                       examples(2, seed=3), tmp_path)
    assert [e["ref_logps"] for e in again.train] == [e["ref_logps"] for e in data.train]


def test_a_stale_reference_file_is_recomputed(tmp_path):
    old, _ = prepare(build_tiny_model(), examples(4), examples(2, seed=3), tmp_path / "run")
    new, _ = prepare(build_tiny_model(), examples(4, seed=7), examples(2, seed=3), tmp_path / "run")
    fresh, _ = prepare(build_tiny_model(), examples(4, seed=7), examples(2, seed=3), tmp_path / "fresh")
    assert [e["ref_logps"] for e in new.train] == [e["ref_logps"] for e in fresh.train]
    assert [e["ref_logps"] for e in new.train] != [e["ref_logps"] for e in old.train]


def interrupt():
    raise KeyboardInterrupt


def run(run_dir, monkeypatch, resume=False, kill_after=None, reference="auto", kill_in_reference=None):
    """A KTO LoRA run (dropout on) through the objective's prepare step and the loop; its checkpoint tensors."""
    cfg = build_config({"method": {"name": "lora", "r": 4, "alpha": 8, "dropout": 0.1},
                        "objective": {"name": "kto", "beta": 0.5, "reference": reference},
                        "train": {"max_steps": 4, "batch_size": 3, "save_every": 2, "lr": 0.01, "resume": resume},
                        "output": {"dir": str(run_dir)}})
    model, method = build_tiny_model(), get_method("lora")
    data = SimpleNamespace(train=examples(6), validation=examples(3, seed=1))
    with killed_after(monkeypatch, kill_after):
        if kill_in_reference:  # as killed_after does for steps: raise instead of killing the test process
            monkeypatch.setattr(faults, "ARMED", faults.Faults(kill_in_reference=kill_in_reference))
            monkeypatch.setattr(faults, "kill", interrupt)
        get_objective("kto").prepare(model, data, cfg, run_dir, 2, method)
        torch.manual_seed(0)
        method.apply(model, cfg.method)
        objective = get_objective("kto").configured(cfg.objective, method)
        train(model, data.train, data.validation, cfg, run_dir, pad_id=2, objective=objective)
    return checkpoint_tensors(model)


def test_kto_trains_logs_its_metrics_and_resumes_bit_exact(tmp_path, monkeypatch):
    records = assert_resumes_bit_exact(run, tmp_path, monkeypatch)
    steps = [r for r in records if "loss" in r]
    assert abs(steps[0]["loss"] - 0.5) < 1e-5  # the first step starts at the reference
    assert steps[-1]["loss"] < steps[0]["loss"]
    assert all(k in steps[-1] for k in ("reward_desirable", "reward_undesirable", "kl"))
    assert "val_kl" in records[-1]


def test_a_run_killed_during_the_reference_precompute_resumes_bit_exact(tmp_path, monkeypatch):
    """Killed after the first reference batch (no file written), resumed, killed after step 2, resumed again:
    the weights of one uninterrupted run with the precomputed reference."""
    whole = run(tmp_path / "a", monkeypatch, reference="precomputed")
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "b", monkeypatch, reference="precomputed", kill_in_reference=1)
    assert not (tmp_path / "b" / REFERENCE_FILE).exists() and not (tmp_path / "b" / "checkpoints").exists()
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "b", monkeypatch, resume=True, kill_after=2, reference="precomputed")
    resumed = run(tmp_path / "b", monkeypatch, resume=True, reference="precomputed")
    assert whole.keys() == resumed.keys() and whole
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)


def train_command(tmp_path, *overrides):
    from conftest import tiny_run_files
    from tunesmith.commands.train import train as train_command
    from tunesmith.config import load_config

    model_dir, files = tiny_run_files(tmp_path, n_train=8, n_validation=2, n_test=2)
    cfg = load_config(None, [f"model.name_or_path={model_dir}", f"data.train={files['unpaired_train']}",
                             f"data.validation={files['unpaired_validation']}", "train.max_steps=2",
                             "train.batch_size=2", f"output.dir={tmp_path / 'run'}", "data.cache=false", *overrides])
    summary = train_command(cfg)
    steps = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines() if '"loss"' in l]
    return summary, steps


def test_the_train_command_picks_kto_for_the_demo_unpaired_rows(tmp_path):
    summary, steps = train_command(tmp_path)
    assert summary["objective"] == "kto" and summary["unit"] == "examples" and summary["tokens_seen"] == 4
    assert abs(steps[0]["loss"] - 0.5) < 1e-5 and "kl" in steps[0] and "reward_desirable" in steps[0]
    assert (tmp_path / "run" / "adapter" / "adapter_config.json").is_file()
    assert not (tmp_path / "run" / REFERENCE_FILE).exists()  # adapters off: no precomputed reference


def test_full_fine_tuning_runs_kto_with_a_precomputed_reference(tmp_path):
    summary, steps = train_command(tmp_path, "method.name=full", "train.lr=1e-3")
    assert summary["objective"] == "kto" and (tmp_path / "run" / REFERENCE_FILE).is_file()
    assert abs(steps[0]["loss"] - 0.5) < 1e-5  # the base model is its own reference at step 1
