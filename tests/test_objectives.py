"""Objectives are plug-ins: objective.name changes what is trained; the loop takes batching, units,
metrics and an optional rollout from the objective; a run that aborts leaves the model as it was."""

from __future__ import annotations

import dataclasses
import json
import logging

import pytest
import torch

from conftest import build_tiny_model, build_tiny_tokenizer, killed_after, tiny_run_files
from tunesmith.config import DataConfig, build_config, load_config
from tunesmith.data.dataset import collate, prepare_datasets
from tunesmith.errors import UserError
from tunesmith.objectives.lm import IGNORE, lm_loss
from tunesmith.objectives.registry import OBJECTIVES, get_objective, resolve_name
from tunesmith.train import faults
from tunesmith.train.checkpoint import checkpoint_tensors
from tunesmith.train.loop import train


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def chats(n: int) -> list[dict]:
    return [{"messages": [{"role": "user", "content": f"What is {i} plus one?"},
                          {"role": "assistant", "content": f"{i + 1}."}]} for i in range(n)]


def test_registry_lists_objectives_and_auto_follows_the_format():
    assert {"sft", "causal_lm"} <= set(OBJECTIVES)
    assert resolve_name("auto", "text") == "causal_lm"
    assert resolve_name("auto", "messages") == "sft"
    assert resolve_name("causal_lm", "messages") == "causal_lm"
    with pytest.raises(UserError, match="known: auto, sft, causal_lm"):
        get_objective("dpo-typo")


def test_every_objective_is_documented():
    from pathlib import Path

    page = (Path(__file__).parent.parent / "docs" / "objectives.md").read_text()
    assert all(f"| `{name}` |" in page for name in OBJECTIVES)


def test_causal_lm_on_chat_data_trains_the_prompt_too(tmp_path):
    path = write_jsonl(tmp_path / "chats.jsonl", chats(6))
    tok = build_tiny_tokenizer()
    cfg = DataConfig(train=path, val_split=0.0, cache=False)
    sft = prepare_datasets(cfg, tok, seed=0, objective="sft")
    lm = prepare_datasets(cfg, tok, seed=0, objective="causal_lm")
    auto = prepare_datasets(cfg, tok, seed=0)
    assert (sft.objective, lm.objective, auto.objective) == ("sft", "causal_lm", "sft")
    for masked, whole in zip(sft.train, lm.train):
        assert masked["input_ids"] == whole["input_ids"]
        assert whole["labels"] == whole["input_ids"]  # every token, the template's system and user turns too
        assert IGNORE in masked["labels"] and masked["labels"] != whole["labels"]
    assert auto.train == sft.train


def test_sft_refuses_raw_text_naming_the_file(tmp_path):
    path = write_jsonl(tmp_path / "text.jsonl", [{"text": "hello world"}] * 3)
    with pytest.raises(UserError, match="text.jsonl: objective.name=sft learns from alpaca"):
        prepare_datasets(DataConfig(train=path, cache=False), build_tiny_tokenizer(), seed=0, objective="sft")


def test_the_data_cache_keeps_objectives_apart(tmp_path, monkeypatch):
    monkeypatch.setenv("TUNESMITH_DATA_CACHE", str(tmp_path / "cache"))
    cfg = DataConfig(train=write_jsonl(tmp_path / "chats.jsonl", chats(6)), val_split=0.0)
    tok = build_tiny_tokenizer()
    sft = prepare_datasets(cfg, tok, seed=0, objective="sft")
    lm = prepare_datasets(cfg, tok, seed=0, objective="causal_lm")
    assert prepare_datasets(cfg, tok, seed=0, objective="causal_lm").train == lm.train != sft.train
    assert prepare_datasets(cfg, tok, seed=0, objective="sft").objective == "sft"


def test_objective_name_changes_what_the_train_command_trains_on(tmp_path):
    """Same data, same steps: causal_lm learns from many more tokens than sft (prompts included)."""
    from tunesmith.commands.train import train as train_command

    model_dir, files = tiny_run_files(tmp_path, n_train=8, n_validation=2, n_test=2)
    seen = {}
    for name in ("sft", "causal_lm"):
        cfg = load_config(None, [f"model.name_or_path={model_dir}", f"data.train={files['train']}",
                                 f"data.validation={files['validation']}", f"objective.name={name}",
                                 "train.max_steps=2", "train.batch_size=4", "eval.before_after=false",
                                 f"output.dir={tmp_path / name}", "data.cache=false"])
        summary = train_command(cfg)
        assert summary["objective"] == name
        seen[name] = summary["tokens_seen"]
        assert yaml_objective(tmp_path / name / "config.yaml") == name
    assert seen["causal_lm"] > 2 * seen["sft"] > 0


def yaml_objective(path) -> str:
    import yaml

    return yaml.safe_load(path.read_text())["objective"]["name"]


def examples(n: int = 6) -> list[dict]:
    g = torch.Generator().manual_seed(2)
    out = []
    for i in range(n):
        ids = torch.randint(3, 300, (5 + i % 3,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": [IGNORE] * 2 + ids[2:]})
    return out


def config(run_dir, **train_options):
    return build_config({"method": {"name": "full"}, "output": {"dir": str(run_dir)},
                         "train": {"max_steps": 4, "batch_size": 2, "save_every": 2, "lr": 0.01, **train_options}})


def test_token_accuracy_is_the_share_of_labels_argmax_predicts():
    model = build_tiny_model()
    batch = collate(examples(), 2)
    total, count, metrics = lm_loss(model, batch)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    labels = batch["labels"][:, 1:]
    keep = labels != IGNORE
    assert count == int(keep.sum())
    assert metrics["token_accuracy"] == float((logits.argmax(-1)[keep] == labels[keep]).sum())


def test_metrics_jsonl_has_the_objectives_metrics_and_each_steps_time(tmp_path):
    train(build_tiny_model(), examples(), examples(2), config(tmp_path), tmp_path, pad_id=2)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    assert all(r["step_time"] > 0 and 0 <= r["token_accuracy"] <= 1 for r in steps)
    validation = [r for r in records if "val_loss" in r]
    assert validation and 0 <= validation[-1]["val_token_accuracy"] <= 1


def replace_labels_rollout(calls: list):
    """A toy online objective: each step, the rollout relabels the window with tokens drawn from the
    generator it is given (as sampling from the model would), and records what it drew."""

    def rollout(model, window, step, generator):
        drawn = []
        for batch in window:
            labels = batch["labels"].clone()
            keep = labels != IGNORE
            labels[keep] = torch.randint(3, 300, (int(keep.sum()),), generator=generator)
            batch["labels"] = labels
            drawn.append(labels[keep].tolist())
        calls.append((step, drawn))
        return window

    return rollout


def run_online(run_dir, monkeypatch, calls, resume=False, kill_after=None):
    objective = dataclasses.replace(get_objective("sft"), rollout=replace_labels_rollout(calls))
    model = build_tiny_model()
    with killed_after(monkeypatch, kill_after):
        train(model, examples(), [], config(run_dir, resume=resume), run_dir, pad_id=2, objective=objective)
    return checkpoint_tensors(model)


def test_a_rollout_is_seeded_by_step_so_resume_samples_the_same(tmp_path, monkeypatch):
    whole_calls, killed_calls = [], []
    whole = run_online(tmp_path / "a", monkeypatch, whole_calls)
    with pytest.raises(KeyboardInterrupt):
        run_online(tmp_path / "b", monkeypatch, killed_calls, kill_after=2)
    resumed = run_online(tmp_path / "b", monkeypatch, killed_calls, resume=True)
    assert [s for s, _ in whole_calls] == [0, 1, 2, 3] and [s for s, _ in killed_calls] == [0, 1, 2, 3]
    assert killed_calls == whole_calls  # the same draws at every step, before and after the kill
    assert whole_calls[0][1] != whole_calls[1][1]  # and a new draw each step
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)


def test_an_aborted_run_leaves_the_model_as_it_was(tmp_path):
    model = build_tiny_model()
    model.set_attn_implementation("sdpa")

    def broken(m, batch):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        train(model, examples(), [], config(tmp_path, gradient_checkpointing=True), tmp_path, pad_id=2,
              loss_fn=broken)
    assert model.config._attn_implementation == "sdpa"  # the packed-row attention is switched back
    assert not model.is_gradient_checkpointing and not model.training


def test_armed_fault_hooks_warn_at_start(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("TUNESMITH_TEST_KILL_AT_STEP", "99")
    monkeypatch.setattr(faults, "ARMED", faults.Faults.from_env({"TUNESMITH_TEST_KILL_AT_STEP": "99"}))
    with caplog.at_level(logging.WARNING):
        train(build_tiny_model(), examples(), [], config(tmp_path, max_steps=1), tmp_path, pad_id=2)
    assert "TUNESMITH_TEST_KILL_AT_STEP" in caplog.text and "armed" in caplog.text


def test_fault_hooks_are_read_from_the_environment_once():
    armed = faults.Faults.from_env({"TUNESMITH_TEST_KILL_IN_STEP": "8:1", "TUNESMITH_TEST_PAUSE_IN_SAVE": "4:0.5"})
    assert armed.kill_in_step == (8, 1) and armed.pause_in_save == (4, 0.5) and armed.armed
    assert not faults.Faults.from_env({}).armed


def test_metrics_reader_skips_a_line_cut_short_by_a_kill(tmp_path):
    from tunesmith.evaluate.report import read_metrics

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\n\n{"step": 2, "loss": 1.5}\n{"step": 3, "lo', encoding="utf-8")
    assert [r["step"] for r in read_metrics(path)] == [1, 2]
