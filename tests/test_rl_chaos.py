"""Online RL survives real SIGKILLs: GRPO (two updates over each stored rollout, two micro-batches a step) and
PPO run through `tunesmith train` in a child process, are killed at seeded random instants inside each phase of
a step (sampling, reward scoring, an update over a stored rollout, between the micro-batches of an accumulation
window), resumed with train.resume=true each time until done, and end with the adapter (and PPO's value head)
and metrics.jsonl of an uninterrupted run, bit for bit.

The reward sleeps a little (so a kill can land while it scores), keeps a state of its own (state_dict /
load_state_dict) and reads trainer_state.reward_calls: both change the rewards, so a resume that lost either
would train on other numbers (tunesmith/rl/carry.py). The child logs where each phase of a step starts
(TUNESMITH_TEST_LOG_PHASES, train/faults.py); the test waits for the phase, then kills after a random delay.
Modelled on the SFT chaos test (tests/test_reliability.py), whose helpers it reuses.
"""

from __future__ import annotations

import json
import os
import random
import signal
import time
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from conftest import tiny_run_files
from test_reliability import assert_same_adapter, cli, finish, newest_step

REWARD_MODULE = '''
"""A reward for tests/test_rl_chaos.py: the vowel share of each completion, tilted by the reward's own call
count and by trainer_state.reward_calls; slow enough that a kill can land while it scores."""
import time

from tunesmith.rl.rewards import completion_text


class Counting:
    def __init__(self):
        self.calls = 0

    def state_dict(self):
        return {"calls": self.calls}

    def load_state_dict(self, state):
        self.calls = state["calls"]

    def __call__(self, prompts, completions, trainer_state=None, **columns):
        time.sleep(0.03)
        self.calls += 1
        tilt = self.calls % 3 + trainer_state.reward_calls % 2
        texts = [completion_text(c) for c in completions]
        return [sum(ch in "aeiou" for ch in t) / max(1, len(t)) + 0.05 * tilt * (i % 2) for i, t in enumerate(texts)]


counting = Counting()
'''

TIMING = ("tokens_per_s", "step_time", "generate_tokens_per_s", "update_tokens_per_s")


def rl_config(root: Path, objective: dict, steps: int) -> Path:
    model_dir, paths = tiny_run_files(root, n_train=6, n_validation=1, n_test=1)
    (root / "chaos_reward.py").write_text(REWARD_MODULE)
    config = {
        "model": {"name_or_path": str(model_dir)},
        "method": {"name": "lora", "r": 4, "alpha": 8, "dropout": 0.0},
        "data": {"train": str(paths["prompt_train"]), "max_seq_len": 256},
        "objective": {"num_generations": 4, "max_new_tokens": 8, "rewards": ["chaos_reward:counting"], **objective},
        "train": {"max_steps": steps, "batch_size": 1, "grad_accum": 2, "lr": 0.05, "save_every": 1, "seed": 3,
                  "log_every": 1},
        "eval": {"before_after": False},
    }
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


class Phased:
    """Successive CLI runs on one run directory, each logging its phases to its own file."""

    def __init__(self, config: Path, run_dir: Path):
        self.config, self.run_dir, self.launches = config, run_dir, 0
        self.env = {"PYTHONPATH": os.pathsep.join([str(config.parent), os.environ.get("PYTHONPATH", "")])}

    def start(self):
        log = self.run_dir.with_name(f"{self.run_dir.name}-phases-{self.launches}.jsonl")
        self.launches += 1
        return cli(self.config, self.run_dir, resume=self.launches > 1,
                   env_extra={**self.env, "TUNESMITH_TEST_LOG_PHASES": str(log)}), log


def events(log: Path) -> list[dict]:
    if not log.exists():
        return []
    return [json.loads(line) for line in log.read_text().splitlines() if line.endswith("}")]


def wait_for(proc, log: Path, wanted) -> dict | None:
    """The first logged phase event that `wanted(event)` accepts, waiting for it (None if the run ended)."""
    deadline = time.time() + 120
    while proc.poll() is None and time.time() < deadline:
        found = [e for e in events(log) if wanted(e)]
        if found:
            return found[0]
        time.sleep(0.002)
    return None


def chaos(config: Path, root: Path, per_rollout: int, kills: int, seed: int) -> tuple[Path, Path, list]:
    """The uninterrupted run (started alongside the first killed one) and a run killed `kills` times, cycling
    through the phases generate, score, micro-0 of a step that reuses a stored rollout, micro-1; returns
    (straight dir, killed dir, [(phase waited for, its step, the last phase logged before the kill, its step)])."""
    straight = cli(config, root / "straight", resume=False,
                   env_extra={"PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])})
    run = Phased(config, root / "killed")
    rng = random.Random(seed)
    targets = [("generate", lambda s: True), ("score", lambda s: True),
               ("micro-0", lambda s: (s - 1) % per_rollout != 0), ("micro-1", lambda s: True)]
    done = []
    for n in range(kills):
        name, step_ok = targets[n % len(targets)]
        start = newest_step(run.run_dir)
        proc, log = run.start()
        # progress first (a step past the checkpoint this run resumed from), then the phase, then a random instant
        event = wait_for(proc, log, lambda e: e["step"] > start + 1 and e["phase"] == name and step_ok(e["step"]))
        assert event is not None, f"kill {n + 1}: the run ended before phase {name} (rc {proc.returncode})"
        time.sleep(rng.uniform(0.0, 0.01))
        proc.send_signal(signal.SIGKILL)
        assert finish(proc) == -signal.SIGKILL
        last = events(log)[-1]
        done.append((name, event["step"], last["phase"], last["step"]))
        assert newest_step(run.run_dir) > start, done
    proc, _ = run.start()
    assert finish(proc) == 0 and finish(straight) == 0
    return root / "straight", run.run_dir, done


def records(run_dir: Path) -> list[dict]:
    """metrics.jsonl without the timings."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING} for line in lines]


@pytest.mark.slow  # ~50 s on 2 shared cores: five CLI runs one after the other (tests/test_rl_resume.py: in-process)
def test_grpo_killed_in_every_phase_resumes_bit_exact(tmp_path):
    root = tmp_path
    config = rl_config(root, {"name": "grpo", "num_iterations": 2}, steps=10)
    straight, killed, done = chaos(config, root, per_rollout=2, kills=4, seed=12)
    print(done)
    assert_same_adapter(straight, killed)
    expected = records(straight)
    steps = [r for r in expected if "loss" in r]
    assert records(killed) == expected and len(steps) == 10
    assert all({"reward_counting", "policy_loss", "clip_low"} <= r.keys() for r in steps)
    assert len({r["reward"] for r in steps}) > 2  # the rewards vary: the comparison means something
    assert all(kill[1] == kill[3] for kill in done)  # each kill landed in the step it aimed at (seen: its phase)
    state = json.loads((killed / "checkpoints" / "step-10" / "state.json").read_text())["train_state"]["objective"]
    assert state["reward_calls"] == 5  # 10 steps, 5 rollouts; the reward's own count adds the final validation's call
    assert state["rewards"] == {"counting": {"calls": 6}}


@pytest.mark.slow  # ~50 s
def test_ppo_killed_in_every_phase_resumes_bit_exact(tmp_path):
    root = tmp_path
    config = rl_config(root, {"name": "ppo", "ppo_epochs": 2, "kl_coef": 0.01, "vf_coef": 0.5}, steps=10)
    straight, killed, done = chaos(config, root, per_rollout=2, kills=4, seed=13)
    print(done)
    assert_same_adapter(straight, killed)
    heads = [load_file(str(d / "adapter" / "value_head.safetensors")) for d in (straight, killed)]
    assert heads[0].keys() == heads[1].keys() and all((heads[0][k] == heads[1][k]).all() for k in heads[0])
    expected = records(straight)
    steps = [r for r in expected if "loss" in r]
    assert records(killed) == expected and len(steps) == 10
    assert all({"value_loss", "score", "approx_kl"} <= r.keys() for r in steps)
    assert all(kill[1] == kill[3] for kill in done)
