"""What the benchmarks that run each contender in its own process share (bench/align.py, bench/grpo.py): the child's
result line, starting a child and reading it back, memory of this process, and the machine's name for the report.
A fresh process per run gives each its own peak resident set; the offline switches keep transformers and the hub
client from reaching for the network."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

PREFIX = "RESULT "  # the child prints its result as one line: RESULT {json}


def print_result(result: dict) -> None:
    """In the child: hand `result` to the parent."""
    print(PREFIX + json.dumps(result), flush=True)


def run_child(script: str, args: list[str], name: str, cwd: Path) -> dict:
    """Run `python script args` in cwd and return the dict its RESULT line holds; exit with its output if none."""
    proc = subprocess.run([sys.executable, script, *args], capture_output=True, text=True, cwd=cwd,
                          env=dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1"))
    line = next((l for l in proc.stdout.splitlines() if l.startswith(PREFIX)), None)
    if line is None:
        sys.exit(f"{name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return json.loads(line[len(PREFIX):])


def rss_mib() -> float:
    """Resident memory of this process now (VmRSS), in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        return next(l.split(":", 1)[1].strip() for l in out.splitlines() if l.startswith("Model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def step_clock():
    """A transformers TrainerCallback whose .times holds perf_counter at the start of training and at the end of
    every optimizer step (transformers is imported here, in the child that trains, not by the parent)."""
    import time

    from transformers import TrainerCallback

    class Clock(TrainerCallback):
        def __init__(self):
            self.times = []

        def on_train_begin(self, args, state, control, **kwargs):
            self.times = [time.perf_counter()]

        def on_step_end(self, args, state, control, **kwargs):
            self.times.append(time.perf_counter())

    return Clock()
