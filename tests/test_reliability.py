"""Nothing lost, nothing executed that should not be.

Kills at random instants and at awkward points of the data order, each resumed through the real
CLI, end bit-identical to an uninterrupted run; RNG states round-trip; pickle weights never run
code; remote code is off by default and loud when on. docs/reliability.md maps each guarantee here.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import build_tiny_model, build_tiny_tokenizer, tiny_run_files
from tunesmith.config import ModelConfig, TrainConfig
from tunesmith.errors import UserError
from tunesmith.train.checkpoint import TrainState, complete_checkpoints, load_checkpoint, save_checkpoint
from tunesmith.train.optim import build_optimizer

# 9 training rows in micro-batches of 2: 5 per epoch (the last one short), 2 per step, so epochs
# end in the middle of a step at odd epochs and on a step boundary at even ones.
STEPS, ACCUM, PER_EPOCH = 30, 2, 5


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("reliability")
    model_dir, paths = tiny_run_files(root, n_train=9, n_validation=2, n_test=1)
    config = {
        "model": {"name_or_path": str(model_dir)},
        "method": {"name": "lora", "r": 4, "alpha": 8, "dropout": 0.1},  # dropout: the RNG matters
        "data": {"train": str(paths["train"]), "validation": str(paths["validation"]), "max_seq_len": 256},
        "train": {"max_steps": STEPS, "batch_size": 2, "grad_accum": ACCUM, "lr": 1e-2, "warmup_steps": 2,
                  "save_every": 1, "seed": 3},
        "eval": {"before_after": False},
    }
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return root, path


def cli(config: Path, run_dir: Path, resume: bool, env_extra: dict | None = None) -> subprocess.Popen:
    args = [sys.executable, "-m", "tunesmith", "train", str(config), f"output.dir={run_dir}"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("TUNESMITH_TEST_")}
    env["OMP_NUM_THREADS"] = "1"  # a hidden size of 32 gains nothing from threads; the cores are shared
    return subprocess.Popen(args + (["train.resume=true"] if resume else []), env={**env, **(env_extra or {})},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen) -> int:
    _, err = proc.communicate(timeout=300)
    if proc.returncode not in (0, -signal.SIGKILL):
        raise AssertionError(f"exit {proc.returncode}\n{err}")
    return proc.returncode


def newest_step(run_dir: Path) -> int:
    found = complete_checkpoints(run_dir)
    return int(found[-1].name.split("-")[1]) if found else 0


class Launches:
    """Successive CLI runs on one run directory (the first fresh, the others with train.resume=true),
    each logging the micro-batches it served to its own file."""

    def __init__(self, config: Path, run_dir: Path):
        self.config, self.run_dir, self.logs = config, run_dir, []

    def start(self, env_extra: dict | None = None) -> subprocess.Popen:
        log = self.run_dir.with_name(f"{self.run_dir.name}-samples-{len(self.logs)}.jsonl")
        self.logs.append(log)
        env = {"TUNESMITH_TEST_LOG_SAMPLES": str(log), **(env_extra or {})}
        return cli(self.config, self.run_dir, resume=len(self.logs) > 1, env_extra=env)

    def trained(self) -> tuple[list[dict], list[int]]:
        """The micro-batches the final weights saw, and where each resumed run restarted. A resumed run
        restarts at micro-batch k: what earlier runs logged from k on was re-done, and is dropped."""
        kept, restarts = [], []
        for i, log in enumerate(self.logs):
            lines = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
            if lines:
                restarts += [lines[0]["micro"]] if i else []
                kept = [l for l in kept if l["micro"] < lines[0]["micro"]] + lines
        return kept, restarts


def losses(run_dir: Path) -> list:
    return [json.loads(l).get("loss") for l in (run_dir / "metrics.jsonl").read_text().splitlines()]


def assert_same_adapter(a_dir: Path, b_dir: Path) -> None:
    a = load_file(str(a_dir / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(b_dir / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and len(a) > 0
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.fixture(scope="module")
def reference(workspace):
    """The uninterrupted run, with its data order logged."""
    root, config = workspace
    run = Launches(config, root / "straight")
    assert finish(run.start()) == 0
    return run.run_dir, run.trained()[0]


def test_reference_data_order_covers_every_row_once_per_epoch(reference):
    _, lines = reference
    assert [l["micro"] for l in lines] == list(range(STEPS * ACCUM))
    assert all(l["step"] == l["micro"] // ACCUM + 1 for l in lines)
    for epoch in range(len(lines) // PER_EPOCH):
        rows = [r for l in lines[epoch * PER_EPOCH : (epoch + 1) * PER_EPOCH] for r in l["rows"]]
        assert sorted(rows) == list(range(9)), epoch  # nothing lost, nothing twice


def wait_for_checkpoint(proc: subprocess.Popen, run_dir: Path, after: int) -> int:
    deadline = time.time() + 300
    while (step := newest_step(run_dir)) <= after and proc.poll() is None and time.time() < deadline:
        time.sleep(0.002)
    return step


def test_sigkill_at_random_instants_resumes_bit_exact(workspace, reference):
    """Three SIGKILLs at seeded random instants, each resumed with train.resume=true: the adapter, the
    losses and the data order equal the uninterrupted run's. (Three, not more: each costs a process start;
    test_train_e2e and the awkward points above, in make test-slow, kill at chosen instants.)"""
    root, config = workspace
    straight, straight_samples = reference
    run = Launches(config, root / "random-kills")
    rng = random.Random(6)
    kills = []
    while len(kills) < 3:
        start = newest_step(run.run_dir)
        proc = run.start()
        # Progress first: two new checkpoints. Then a random instant within about one step (at most
        # 30 ms): forward, backward, optimizer, metrics or mid-save, whatever is running then.
        first = wait_for_checkpoint(proc, run.run_dir, start)
        began = time.time()
        wait_for_checkpoint(proc, run.run_dir, first)
        time.sleep(rng.uniform(0.0, min(0.03, time.time() - began)))
        assert proc.poll() is None, f"run {len(kills) + 1} ended before its kill (rc {proc.returncode}): raise STEPS"
        proc.send_signal(signal.SIGKILL)
        assert finish(proc) == -signal.SIGKILL
        kills.append(newest_step(run.run_dir))
        assert kills[-1] > start, kills
    assert finish(run.start()) == 0
    assert newest_step(run.run_dir) == STEPS
    assert_same_adapter(straight, run.run_dir)
    assert losses(run.run_dir) == losses(straight)
    assert run.trained()[0] == straight_samples


@pytest.mark.slow  # ~33 s: make test keeps the random SIGKILLs above
def test_resume_at_awkward_points_replays_the_same_samples(workspace, reference):
    """One run killed (TUNESMITH_TEST_KILL_AT_STEP) mid-epoch, exactly at an epoch end, just after it,
    and inside an accumulation window (TUNESMITH_TEST_KILL_IN_STEP), resumed each time."""
    root, config = workspace
    straight, straight_samples = reference
    run = Launches(config, root / "awkward")
    kills = [
        ({"TUNESMITH_TEST_KILL_AT_STEP": "2"}, 2),  # 4 of epoch 0's 5 micro-batches done: step 3 straddles epochs
        ({"TUNESMITH_TEST_KILL_AT_STEP": "5"}, 5),  # micro-batches 0-9 done: exactly two epochs
        ({"TUNESMITH_TEST_KILL_AT_STEP": "6"}, 6),  # the first step after that boundary
        ({"TUNESMITH_TEST_KILL_IN_STEP": "8:1"}, 7),  # after 1 of step 8's 2 micro-batches: back to step 7
    ]
    for hook, checkpoint in kills:
        assert finish(run.start(hook)) == -signal.SIGKILL
        assert newest_step(run.run_dir) == checkpoint, hook
    assert finish(run.start()) == 0
    kept, restarts = run.trained()
    assert restarts == [2 * ACCUM, 5 * ACCUM, 6 * ACCUM, 7 * ACCUM]  # each resume began where its checkpoint ended
    assert kept == straight_samples
    assert_same_adapter(straight, run.run_dir)
    assert losses(run.run_dir) == losses(straight)


def test_rng_states_round_trip_python_numpy_torch(tmp_path):
    model = build_tiny_model()
    opt = build_optimizer(list(model.parameters()), TrainConfig())
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    random.gauss(0, 1), np.random.standard_normal()  # both cache a second Gaussian: part of the state

    def draws():
        return (random.random(), random.gauss(0, 1), np.random.standard_normal(3).tolist(),
                np.random.randint(0, 10**6, 4).tolist(), torch.rand(3).tolist())

    path = save_checkpoint(tmp_path, TrainState(step=1), dict(model.named_parameters()), opt, {})
    expected = draws()
    random.seed(9), np.random.seed(9), torch.manual_seed(9)  # scramble every generator
    load_checkpoint(path, model, opt)
    assert draws() == expected


def test_metrics_log_survives_a_kill_mid_line(tmp_path):
    """A line cut short by a kill is past the checkpoint; resuming drops it instead of crashing."""
    from tunesmith.train.metrics_log import MetricsLog

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n{"step": 3, "lo')
    MetricsLog(path, resume_step=2)
    assert [json.loads(l)["step"] for l in path.read_text().splitlines()] == [1, 2]


# ---------------------------------------------------------------------------------------------
# Pickle weights and remote code


class Payload:
    """Unpickling this runs code: it creates `marker`."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').close()",))


def pickle_model_folder(folder: Path, payload: Path | None) -> dict[str, torch.Tensor]:
    """A tiny model folder whose only weights are pytorch_model.bin, optionally with a payload inside."""
    model = build_tiny_model(seed=5)
    model.config.save_pretrained(folder)
    build_tiny_tokenizer().save_pretrained(folder)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    torch.save({**state, **({"evil": Payload(payload)} if payload else {})}, folder / "pytorch_model.bin")
    return state


def test_payload_is_live(tmp_path):
    """The payload really runs under a plain unpickler, so the tests below prove something."""
    marker = tmp_path / "ran"
    torch.save({"evil": Payload(marker)}, tmp_path / "x.bin")
    torch.load(tmp_path / "x.bin", weights_only=False)
    assert marker.exists()


def test_pickle_only_model_folder_refused_by_default(tmp_path):
    from tunesmith.models.loading import load_model_and_tokenizer

    marker = tmp_path / "ran"
    pickle_model_folder(tmp_path / "m", marker)
    with pytest.raises(UserError) as e:
        load_model_and_tokenizer(ModelConfig(name_or_path=str(tmp_path / "m")), torch.device("cpu"))
    message = str(e.value)
    assert "pytorch_model.bin" in message and "arbitrary code" in message
    assert "save_pretrained" in message and "model.allow_pickle=true" in message  # how to convert, how to opt in
    assert not marker.exists()


def test_allow_pickle_never_runs_the_payload(tmp_path, caplog):
    from tunesmith.models.loading import load_model_and_tokenizer

    marker = tmp_path / "ran"
    pickle_model_folder(tmp_path / "m", marker)
    cfg = ModelConfig(name_or_path=str(tmp_path / "m"), allow_pickle=True)
    with caplog.at_level(logging.WARNING, logger="tunesmith"), pytest.raises(UserError, match="Refused .* pickle"):
        load_model_and_tokenizer(cfg, torch.device("cpu"))
    assert not marker.exists()
    assert "allow_pickle is on" in caplog.text


def test_allow_pickle_loads_plain_tensors(tmp_path, caplog):
    from tunesmith.models.loading import load_model_and_tokenizer

    state = pickle_model_folder(tmp_path / "m", payload=None)
    cfg = ModelConfig(name_or_path=str(tmp_path / "m"), allow_pickle=True)
    with caplog.at_level(logging.WARNING, logger="tunesmith"):
        model, _ = load_model_and_tokenizer(cfg, torch.device("cpu"))
    assert "weights_only=True" in caplog.text
    loaded = model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in state.items())


def test_adapter_pickle_is_never_unpickled(tmp_path):
    from tunesmith.methods.io import load_adapter

    marker = tmp_path / "ran"
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8,
                                                              "target_modules": ["q_proj"]}))
    torch.save({"evil": Payload(marker)}, tmp_path / "adapter_model.bin")
    with pytest.raises(UserError, match="pickle"):
        load_adapter(build_tiny_model(), tmp_path)
    assert not marker.exists()


def test_no_unrestricted_unpickling_in_the_source():
    """Every torch.load in tunesmith passes weights_only=True; nothing calls pickle.load(s)."""
    source = Path(__file__).parent.parent / "tunesmith"
    for path in source.rglob("*.py"):
        text = path.read_text(encoding="utf-8")
        assert not re.search(r"pickle\.loads?\(|Unpickler\(", text), path
        for call in re.findall(r"torch\.load\([^)]*\)", text):
            assert "weights_only=True" in call, f"{path}: {call}"


def test_trust_remote_code_off_by_default_and_warned_when_on(tmp_path, caplog):
    from tunesmith.models.loading import load_model_and_tokenizer

    assert ModelConfig().trust_remote_code is False and ModelConfig().allow_pickle is False
    folder = tmp_path / "m"
    build_tiny_model().save_pretrained(folder)
    build_tiny_tokenizer().save_pretrained(folder)
    with caplog.at_level(logging.WARNING, logger="tunesmith"):
        load_model_and_tokenizer(ModelConfig(name_or_path=str(folder)), torch.device("cpu"))
    assert "trust_remote_code" not in caplog.text
    with caplog.at_level(logging.WARNING, logger="tunesmith"):
        load_model_and_tokenizer(ModelConfig(name_or_path=str(folder), trust_remote_code=True), torch.device("cpu"))
    assert "trust_remote_code is on" in caplog.text
