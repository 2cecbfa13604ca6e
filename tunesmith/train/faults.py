"""Test-only fault hooks: kill a run at a chosen instant, pause a save, log the rows served.

The reliability tests (docs/reliability.md) start real training processes and need them to die
at exact places: after step N, inside an accumulation window, in the middle of writing a
checkpoint. The environment says where, read once when this module is first imported:

    TUNESMITH_TEST_KILL_AT_STEP=N      SIGKILL right after step N (with TUNESMITH_TEST_KILL_RANK=R:
                                       only on rank R under torchrun; torchrun takes the others down)
    TUNESMITH_TEST_KILL_IN_STEP=N:K    SIGKILL inside step N, once K (< grad_accum) of its
                                       micro-batches have been through forward and backward
    TUNESMITH_TEST_PAUSE_IN_SAVE=S:T   pause T seconds in the save of step S, before its marker,
                                       after touching `<checkpoint>.saving`
    TUNESMITH_TEST_KILL_IN_REFERENCE=K SIGKILL once K batches of a split's precomputed reference
                                       log-probabilities are done (objectives/preference.py), before
                                       their file is written
    TUNESMITH_TEST_LOG_SAMPLES=PATH    append {"step", "micro", "rows"[, "rank"]} per micro-batch served
    TUNESMITH_TEST_LOG_PHASES=PATH     append {"step", "phase"} at the start of each phase of a step
                                       (train/progress.py: generate, score, update) and of each
                                       micro-batch's forward ("micro-K"), for kills within a phase

`warn_if_armed()` runs when training starts: a variable left set in a user's shell must never
kill a run silently.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

PREFIX = "TUNESMITH_TEST_"


@dataclass(frozen=True)
class Faults:
    kill_at_step: int | None = None
    kill_rank: int | None = None
    kill_in_step: tuple[int, int] | None = None  # (step, micro-batches done)
    pause_in_save: tuple[int, float] | None = None  # (step, seconds)
    log_samples: str | None = None
    kill_in_reference: int | None = None  # reference batches done
    log_phases: str | None = None

    @classmethod
    def from_env(cls, env) -> "Faults":
        def pair(name, second=int):
            raw = env.get(PREFIX + name)
            return None if not raw else (int(raw.split(":")[0]), second(raw.split(":")[1]))

        number = lambda name: int(env[PREFIX + name]) if env.get(PREFIX + name) else None
        return cls(number("KILL_AT_STEP"), number("KILL_RANK"), pair("KILL_IN_STEP"), pair("PAUSE_IN_SAVE", float),
                   env.get(PREFIX + "LOG_SAMPLES") or None, number("KILL_IN_REFERENCE"),
                   env.get(PREFIX + "LOG_PHASES") or None)

    @property
    def armed(self) -> bool:
        return self != Faults()


ARMED = Faults.from_env(os.environ)


def warn_if_armed() -> None:
    if ARMED.armed:
        names = sorted(k for k in os.environ if k.startswith(PREFIX))
        log.warning("test fault hooks are armed (%s): this run may be killed or paused on purpose; unset them "
                    "unless a test set them", ", ".join(names))


def kill() -> None:
    """Die at once, as a power cut or the OOM killer would: no cleanup, no exception handlers."""
    os.kill(os.getpid(), signal.SIGKILL)


def after_step(step: int, rank: int) -> None:
    if ARMED.kill_at_step == step and ARMED.kill_rank in (None, rank):
        kill()


def in_window(loss_fn, step: int):
    """`loss_fn`, or inside step KILL_IN_STEP a copy that kills before micro-batch K's forward (and with
    LOG_PHASES one that logs each micro-batch's start)."""
    if ARMED.log_phases:
        loss_fn = _phase_logged(loss_fn, step)
    if ARMED.kill_in_step is None or ARMED.kill_in_step[0] != step:
        return loss_fn
    done, calls = ARMED.kill_in_step[1], [0]

    def counted(model, batch):
        if calls[0] == done:
            kill()
        calls[0] += 1
        return loss_fn(model, batch)

    return counted


def _phase_logged(loss_fn, step: int):
    calls = [0]

    def logged(model, batch):
        log_phase(step, f"micro-{calls[0]}")
        calls[0] += 1
        return loss_fn(model, batch)

    return logged


def log_phase(step: int, phase: str) -> None:
    """Append {"step", "phase"} to LOG_PHASES (flushed at once: a test reads it to time a kill)."""
    if ARMED.log_phases:
        with open(ARMED.log_phases, "a", encoding="utf-8") as f:
            f.write(json.dumps({"step": step, "phase": phase}) + "\n")


def in_reference(batches_done: int) -> None:
    if ARMED.kill_in_reference == batches_done:
        kill()


def in_save(folder: Path, step: int) -> None:
    if ARMED.pause_in_save is not None and ARMED.pause_in_save[0] == step:
        folder.with_name(folder.name + ".saving").touch()
        time.sleep(ARMED.pause_in_save[1])


def log_samples(k: int, grad_accum: int, indices: list[int], rank: int, world: int) -> None:
    if ARMED.log_samples:
        record = {"step": k // grad_accum + 1, "micro": k, "rows": list(indices)}
        if world > 1:
            record["rank"] = rank
        with open(ARMED.log_samples, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
