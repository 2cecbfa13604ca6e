"""End to end through the real CLI on a tiny model saved to disk: train, report, kill, resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import tiny_run_files


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    model_dir, paths = tiny_run_files(root, n_train=48, n_validation=8, n_test=6)
    config = {
        "model": {"name_or_path": str(model_dir)},
        "method": {"name": "lora", "r": 4, "alpha": 8, "dropout": 0.1},
        "data": {"train": str(paths["train"]), "validation": str(paths["validation"]), "test": str(paths["test"]),
                 "max_seq_len": 256},
        "train": {"max_steps": 6, "batch_size": 4, "grad_accum": 2, "lr": 1e-2, "warmup_steps": 2,
                  "save_every": 2, "eval_every": 3, "seed": 3},
        "eval": {"max_new_tokens": 8},
    }
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return root, path


def run_cli(*args, env_extra=None, check=True):
    env = dict(os.environ, **(env_extra or {}))
    proc = subprocess.run([sys.executable, "-m", "tunesmith", *args], capture_output=True, text=True, env=env,
                          timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def adapter_weights(run_dir):
    return load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))


def test_train_writes_every_artifact(workspace):
    root, config = workspace
    run_dir = root / "full"
    run_cli("train", str(config), f"output.dir={run_dir}")
    for name in ("config.yaml", "metrics.jsonl", "loss.png", "report.md", "summary.json",
                 "adapter/adapter_config.json", "adapter/adapter_model.safetensors"):
        assert (run_dir / name).is_file(), name
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step-4", "step-6"]
    steps = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in steps if "loss" in r]
    assert [r["step"] for r in train_rows] == [1, 2, 3, 4, 5, 6]
    assert all({"loss", "lr", "tokens_per_s"} <= r.keys() for r in train_rows)
    assert any("val_loss" in r for r in steps)
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["output"]["dir"] == str(run_dir)
    report = (run_dir / "report.md").read_text()
    assert "before" in report and "after" in report
    # The run's own peak RSS: more than the torch it imported, less than this machine has.
    assert 100 < json.loads((run_dir / "summary.json").read_text())["peak_rss_mib"] < 16 * 1024


@pytest.mark.slow  # ~20 s: test_reliability's random SIGKILLs cover the same in make test
def test_killed_run_resumes_bit_exact(workspace):
    root, config = workspace
    straight, killed = root / "straight", root / "killed"
    run_cli("train", str(config), f"output.dir={straight}", "eval.before_after=false")
    proc = run_cli("train", str(config), f"output.dir={killed}", "eval.before_after=false",
                   env_extra={"TUNESMITH_TEST_KILL_AT_STEP": "3"}, check=False)
    assert proc.returncode == -signal.SIGKILL
    assert sorted(p.name for p in (killed / "checkpoints").iterdir()) == ["step-2"]
    run_cli("train", str(config), f"output.dir={killed}", "eval.before_after=false", "train.resume=true")
    a, b = adapter_weights(straight), adapter_weights(killed)
    assert a.keys() == b.keys() and len(a) > 0
    for key in a:
        assert torch.equal(a[key], b[key]), key
    losses = lambda d: [json.loads(l).get("loss") for l in (d / "metrics.jsonl").read_text().splitlines()]
    assert losses(straight) == losses(killed)


def test_user_errors_exit_2_without_traceback(workspace, tmp_path):
    root, config = workspace
    proc = run_cli("train", str(config), "train.lr=fast", check=False)
    assert proc.returncode == 2
    assert "train.lr" in proc.stderr and "Traceback" not in proc.stderr
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n{oops\n')
    proc = run_cli("train", str(config), f"data.train={bad}", f"output.dir={tmp_path / 'run'}", check=False)
    assert proc.returncode == 2
    assert "bad.jsonl" in proc.stderr and "line 2" in proc.stderr and "Traceback" not in proc.stderr


def test_help_documents_options():
    proc = run_cli("train", "--help")
    assert "train.max_steps" in proc.stdout and "method.target_modules" in proc.stdout
    for command in ("eval", "generate", "chat", "demo", "merge"):
        assert run_cli(command, "--help").stdout.startswith("usage:")


@pytest.mark.slow  # ~22 s
def test_kill_during_save_keeps_previous_checkpoint(workspace):
    """SIGKILL while step-4 is being written: step-2 survives intact and resume ignores the partial save."""
    import time

    root, config = workspace
    straight, killed = root / "straight-save", root / "killed-save"
    run_cli("train", str(config), f"output.dir={straight}", "eval.before_after=false")
    env = dict(os.environ, TUNESMITH_TEST_PAUSE_IN_SAVE="4:60")
    proc = subprocess.Popen([sys.executable, "-m", "tunesmith", "train", str(config), f"output.dir={killed}",
                             "eval.before_after=false"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    flag = killed / "checkpoints" / ".tmp-step-4.saving"
    deadline = time.time() + 120
    while not flag.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert flag.exists(), "the save of step 4 never started"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    checkpoints = killed / "checkpoints"
    assert (checkpoints / ".tmp-step-4").is_dir() and not (checkpoints / "step-4").exists()
    assert (checkpoints / "step-2" / "COMPLETE").is_file()
    run_cli("train", str(config), f"output.dir={killed}", "eval.before_after=false", "train.resume=true")
    assert not (checkpoints / ".tmp-step-4").exists()
    a, b = adapter_weights(straight), adapter_weights(killed)
    assert all(torch.equal(a[k], b[k]) for k in a)



@pytest.mark.slow  # ~65 s: five processes; make smoke runs generate and eval on a trained adapter in make test
def test_generate_chat_and_eval_use_the_trained_adapter(workspace):
    """The after-training commands run on the adapter the train command wrote."""
    root, config = workspace
    run_dir = root / "for-inference"
    run_cli("train", str(config), f"output.dir={run_dir}", "eval.before_after=false", "train.max_steps=2")
    model_dir = yaml.safe_load(config.read_text())["model"]["name_or_path"]
    adapter = str(run_dir / "adapter")

    out = run_cli("generate", "--model", model_dir, "--adapter", adapter, "--max-new-tokens", "5", "hello")
    assert out.returncode == 0 and out.stdout.endswith("\n") and "Traceback" not in out.stderr

    env = dict(os.environ)
    chat = subprocess.run([sys.executable, "-m", "tunesmith", "chat", "--model", model_dir, "--adapter", adapter,
                           "--max-new-tokens", "4"], input="hi there\nand again\n\n", capture_output=True,
                          text=True, env=env, timeout=300)
    assert chat.returncode == 0, chat.stderr
    assert chat.stdout.count("model> ") == 2  # one answer per message, then the empty line quits

    scored = run_cli("eval", str(config), "--adapter", adapter)
    scores = json.loads(scored.stdout[scored.stdout.index("{"):])
    assert 0 <= scores["exact_match"] <= 100 and "valid_json" in scores

    missing = run_cli("generate", "--adapter", str(root / "nope"), "--model", model_dir, "x", check=False)
    assert missing.returncode == 2 and "Traceback" not in missing.stderr


def test_uncached_hub_id_explains_offline_first(tmp_path, monkeypatch):
    from tunesmith.config import ModelConfig
    from tunesmith.errors import UserError
    from tunesmith.models.loading import resolve_model_folder

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(UserError, match="offline-first"):
        resolve_model_folder(ModelConfig(name_or_path="some-org/not-cached-model"))
