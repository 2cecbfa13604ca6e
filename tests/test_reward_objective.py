"""The reward model objective on a tiny model: the reward is read where transformers' sequence classifier
reads it, the loss starts at ln 2, a killed run resumes bit-exact, and the saved artifacts (a plain
AutoModelForSequenceClassification folder, and a PEFT SEQ_CLS adapter) give the very rewards training
computed; `tunesmith score` and `tunesmith eval` read them back. Accumulation invariance is tested with
the other pair objectives (test_preference_objective.py)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import assert_resumes_bit_exact, build_tiny_model, killed_after, tiny_run_files
from tunesmith.config import MethodConfig, build_config, load_config
from tunesmith.methods.registry import get_method
from tunesmith.objectives.lm import IGNORE
from tunesmith.objectives.registry import get_objective
from tunesmith.objectives.reward import (add_score_head, collate_reward_pairs, save_sequence_classifier,
                                         sequence_rewards)
from tunesmith.train.checkpoint import checkpoint_tensors
from tunesmith.train.loop import train

PAD = 2  # the tiny model's pad id, also its end-of-turn token (as SmolLM2's)


def pairs(n: int, seed: int = 0) -> list[dict]:
    """Encoded pairs whose answers end with the pad id, as SmolLM2's end-of-turn token does."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        prompt = torch.randint(3, 300, (3 + i % 3,), generator=g).tolist()
        chosen = torch.randint(3, 300, (2 + i % 2,), generator=g).tolist() + [PAD]
        rejected = torch.randint(3, 300, (3 + i % 3,), generator=g).tolist() + [PAD]
        out.append({"prompt_len": len(prompt), "margin": 0.0, "truncated": False,
                    "chosen_ids": prompt + chosen, "chosen_labels": [IGNORE] * len(prompt) + chosen,
                    "rejected_ids": prompt + rejected, "rejected_labels": [IGNORE] * len(prompt) + rejected})
    return out


def reward_model(method_name: str = "lora"):
    """The tiny model with a method (its update made non-zero) and a score head."""
    model = build_tiny_model()
    method = get_method(method_name)
    torch.manual_seed(0)
    method.apply(model, MethodConfig(name=method_name, r=4, alpha=8, dropout=0.0, target_modules="all-linear"))
    add_score_head(model)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(4))
    return model, method


@pytest.mark.parametrize("pack_len", [0, 10_000], ids=["padded", "packed"])
def test_the_reward_is_read_where_transformers_sequence_classifier_reads_it(tmp_path, tiny_tokenizer, pack_len):
    """The exported AutoModelForSequenceClassification, given each sequence alone, scores what training
    computed on the packed (or padded) pairs: the last token that is not the pad token."""
    from transformers import AutoModelForSequenceClassification

    model, method = reward_model()
    model.eval()
    examples = pairs(5)
    with torch.no_grad():
        ours = sequence_rewards(model, collate_reward_pairs(examples, PAD, pack_len))
    save_sequence_classifier(method.merge(model), tiny_tokenizer, tmp_path / "rm")
    classifier = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm").eval()
    assert classifier.config.num_labels == 1 and classifier.config.pad_token_id == PAD
    sequences = [ids for e in examples for ids in (e["chosen_ids"], e["rejected_ids"])]
    with torch.no_grad():
        theirs = torch.cat([classifier(torch.tensor([ids])).logits[:, 0] for ids in sequences])
    assert torch.allclose(ours, theirs, atol=1e-5), (ours - theirs).abs().max()


def test_at_initialisation_with_a_zero_head_the_loss_is_ln2_and_margin_shifts_it():
    model, _ = reward_model()
    model.eval()  # no dropout: the same rewards on every call
    torch.nn.init.zeros_(model.score.weight)
    objective = get_objective("reward")
    batch = objective.collate(pairs(4), PAD, 0)
    loss, units, metrics = objective.loss(model, batch)
    assert units == 4 and abs(float(loss.detach()) / 4 - math.log(2)) < 1e-6 and metrics["accuracy"] == 0
    batch["margin"] = torch.full((4,), 1.0)  # -log sigmoid(0 - 1) per pair
    assert abs(float(objective.loss(model, batch)[0].detach()) / 4 - (-math.log(1 / (1 + math.e)))) < 1e-6
    centred = objective.configured(build_config({"objective": {"name": "reward", "reward_center": 0.5}}).objective)
    with torch.no_grad():
        model.score.weight.fill_(0.01)
    rewards = sequence_rewards(model, batch)
    expected = -torch.nn.functional.logsigmoid(rewards[0::2] - rewards[1::2] - 1) + 0.5 * (rewards[0::2] + rewards[1::2]) ** 2
    assert abs(float(centred.loss(model, batch)[0].detach()) - float(expected.detach().sum())) < 1e-5


def test_the_head_trains_with_any_method_and_an_untied_lm_head_is_frozen():
    for method_name in ("lora", "freeze", "full"):
        model = build_tiny_model(tie=False)
        get_method(method_name).apply(model, MethodConfig(name=method_name, r=4, target_modules="all-linear"))
        add_score_head(model)
        assert model.score.weight.requires_grad and not model.lm_head.weight.requires_grad
        assert "lora_A" not in str(type(model.score))  # added after the method: never adapted itself


def run(run_dir, monkeypatch, resume=False, kill_after=None):
    model, _ = reward_model()
    cfg = build_config({"method": {"name": "lora", "r": 4, "alpha": 8, "dropout": 0.1},
                        "objective": {"name": "reward"},
                        "train": {"max_steps": 4, "batch_size": 2, "save_every": 2, "lr": 0.01, "resume": resume},
                        "output": {"dir": str(run_dir)}})
    with killed_after(monkeypatch, kill_after):
        train(model, pairs(6), pairs(2, seed=1), cfg, run_dir, pad_id=PAD, objective=get_objective("reward"))
    return checkpoint_tensors(model)


def test_reward_trains_logs_pair_metrics_and_resumes_bit_exact(tmp_path, monkeypatch):
    records = assert_resumes_bit_exact(run, tmp_path, monkeypatch)
    steps = [r for r in records if "loss" in r]
    assert steps[-1]["loss"] < steps[0]["loss"] and "margin" in steps[-1] and "val_accuracy" in records[-1]
    assert "score.weight" in checkpoint_tensors_names(tmp_path / "a")


def checkpoint_tensors_names(run_dir) -> set[str]:
    from tunesmith.files import read_safetensors
    from tunesmith.train.checkpoint import complete_checkpoints

    return set(read_safetensors(complete_checkpoints(run_dir)[-1] / "trainable.safetensors", "weights"))


@pytest.mark.parametrize("method_name, quantization", [("lora", "none"), ("full", "none"), ("lora", "nf4")])
def test_the_train_command_exports_a_reward_model_that_scores_as_trained(tmp_path, method_name, quantization, capsys):
    """A reward run on the demo pairs: pair accuracy before and after, the reward_model folder and (lora) the
    PEFT SEQ_CLS adapter give the rewards of the trained model; `tunesmith score` and `eval` read it back.
    Over an nf4 base the export is merged into the dequantized weights the adapter was trained against."""
    from transformers import AutoModelForSequenceClassification

    from tunesmith.cli import main
    from tunesmith.commands.score import score_file
    from tunesmith.commands.train import train as train_command

    model_dir, files = tiny_run_files(tmp_path, n_train=8, n_validation=2, n_test=6)
    run_dir = tmp_path / "run"
    overrides = [f"model.name_or_path={model_dir}", f"data.train={files['preference_train']}",
                 f"data.validation={files['preference_validation']}", f"data.test={files['preference_test']}",
                 "objective.name=reward", f"method.name={method_name}", f"model.quantization={quantization}",
                 "train.max_steps=3", "train.batch_size=2",
                 f"output.dir={run_dir}", "data.cache=false"]
    summary = train_command(load_config(None, overrides))
    assert summary["objective"] == "reward" and set(summary["after"]) == set(summary["before"]) == {"pair_accuracy"}
    rows, scored = score_file(str(run_dir / "reward_model"), files["preference_test"])
    assert scored["pair_accuracy"] == pytest.approx(summary["after"]["pair_accuracy"])
    assert len(rows) == 6 and all("score_chosen" in r and "score_rejected" in r for r in rows)
    if quantization == "none" and method_name == "lora":
        from peft import PeftModel

        config = json.loads((run_dir / "adapter" / "adapter_config.json").read_text())
        assert config["task_type"] == "SEQ_CLS" and config["modules_to_save"] == ["score"]
        base = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1, pad_token_id=PAD)
        peft_model = PeftModel.from_pretrained(base, run_dir / "adapter").eval()
        merged = AutoModelForSequenceClassification.from_pretrained(run_dir / "reward_model").eval()
        ids = torch.tensor([[5, 17, 42, 9, PAD]])
        with torch.no_grad():
            assert torch.allclose(peft_model(ids).logits, merged(ids).logits, atol=1e-5)
    config_path = run_dir / "config.yaml"
    capsys.readouterr()
    assert main(["eval", str(config_path)]) == 0
    assert json.loads(capsys.readouterr().out)["pair_accuracy"] == pytest.approx(scored["pair_accuracy"])


def test_score_command_scores_answers_and_names_a_bad_row(tmp_path, tiny_tokenizer, capsys):
    from tunesmith.cli import main

    model, method = reward_model()
    save_sequence_classifier(method.merge(model), tiny_tokenizer, tmp_path / "rm")
    rows = tmp_path / "answers.jsonl"
    rows.write_text('{"prompt": "a b", "completion": "c"}\n{"prompt": "a b", "completion": "d e"}\n')
    out = tmp_path / "scored.jsonl"
    assert main(["score", str(tmp_path / "rm"), str(rows), "--out", str(out)]) == 0
    scored = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["completion"] for r in scored] == ["c", "d e"] and all(isinstance(r["score"], float) for r in scored)
    assert scored[0]["score"] != scored[1]["score"]
    rows.write_text('{"prompt": "a b", "completion": "c"}\n{"prompt": 3, "completion": "d"}\n')
    assert main(["score", str(tmp_path / "rm"), str(rows)]) == 2
    assert "line 2" in capsys.readouterr().err
