"""Atomic, complete checkpoints and exact resume.

A checkpoint `checkpoints/step-N/` holds everything the next step depends on:

    trainable.safetensors   the trainable weights (adapter or full model), plus any tensor a method
                            changes outside the optimizer (see `checkpoint_tensors`)
    optimizer.pt            AdamW moments and step counts (tensors only; read with weights_only=True)
    rng.pt                  torch CPU (and CUDA) generator states
    state.json              step, tokens seen, the objective's carried state (online RL's reward call
                            counters: rl/carry.py), Python and NumPy RNG states, the config
    COMPLETE                written last: a folder without it is ignored

The schedule is a pure function of the step and the data order a pure function of (seed, step),
so no scheduler object or data iterator needs saving: the step *is* the data position.

Writing: everything goes into `.tmp-step-N/`, each file is fsynced, the marker is written last,
then the folder is renamed to `step-N` and the parent directory fsynced. A run killed at any
instant leaves either the previous checkpoints untouched plus a stray temp folder (removed on the
next save), or a complete new checkpoint.

Under torchrun every process calls save_checkpoint and load_checkpoint. Saving gathers FSDP2
shards and every process's RNG state to rank 0, which alone writes (the same files as one process
writes, plus `rank{r}/...` RNG entries in rng.pt); the others wait until the checkpoint is
complete. Loading: every process reads the files (output.dir must be shared by all nodes) and cuts
its own shards, so a checkpoint resumes on any number of processes.
"""

from __future__ import annotations

import os
import random
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from tunesmith.errors import UserError
from tunesmith.files import (atomic_save_safetensors, atomic_torch_save, atomic_write_json, atomic_write_text,
                             check_keys, fsync_dir, read_json, read_safetensors, read_torch)
from tunesmith.train import distributed, faults

MARKER = "COMPLETE"
STEP_DIR = re.compile(r"^step-(\d+)$")


@dataclass
class TrainState:
    step: int = 0  # optimizer steps completed
    tokens_seen: int = 0  # labelled tokens trained on
    bad_steps_in_row: int = 0
    skipped_steps: int = 0
    warned: bool = False  # the objective's check_step warning was logged (once a run, resumes included)
    objective: dict = field(default_factory=dict)  # the objective's carry.state_dict() (rl/carry.py), JSON


def rng_snapshot() -> tuple[dict, dict]:
    """(tensors, json-able) RNG states of torch, Python and NumPy."""
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{i}"] = state
    py_version, py_state, py_gauss = random.getstate()
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    plain = {
        "python": [py_version, list(py_state), py_gauss],
        "numpy": [np_kind, np_keys.tolist(), int(np_pos), int(np_has_gauss), float(np_gauss)],
    }
    return tensors, plain


def rng_restore(tensors: dict, plain: dict) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    if torch.cuda.is_available():
        states = [tensors[k] for k in sorted(k for k in tensors if k.startswith("torch_cuda_"))]
        if states:
            torch.cuda.set_rng_state_all(states)
    version, state, gauss = plain["python"]
    random.setstate((version, tuple(state), gauss))
    kind, keys, pos, has_gauss, cached = plain["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))


def save_checkpoint(
    run_dir: Path,
    state: TrainState,
    trainable: dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    config: dict,
    keep: int = 2,
) -> Path:
    """Write checkpoints/step-N atomically and prune older ones beyond `keep`.

    A failed write (full disk, unwritable folder) removes its temporary folder, leaves every
    complete checkpoint as it was, and raises a UserError naming the folder.
    """
    root = Path(run_dir) / "checkpoints"
    tmp = root / f".tmp-step-{state.step}"
    final = root / f"step-{state.step}"
    rngs = distributed.gather_objects(rng_snapshot())
    if distributed.world() > 1:
        trainable, optimizer_state = distributed.gather_to_main(trainable), distributed.gather_optimizer_state(optimizer)
    else:
        optimizer_state = optimizer.state_dict()
    if not distributed.is_main():
        distributed.barrier()  # returns once rank 0 has written the checkpoint
        return final
    try:
        root.mkdir(parents=True, exist_ok=True)
        for stray in root.glob(".tmp-*"):  # left by a run killed mid-save
            shutil.rmtree(stray, ignore_errors=True)
        tmp.mkdir()
        write_checkpoint_files(tmp, state, trainable, optimizer_state, rngs, config)
        if final.exists():  # a re-save of the same step (e.g. resumed exactly at the end)
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_dir(root)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(
            f"Could not write checkpoint step-{state.step} in {str(root)!r}: {e.strerror or e}. "
            "The newest complete checkpoint is intact; free space or fix permissions, then resume."
        ) from None
    prune_checkpoints(root, keep)
    distributed.barrier()  # no process runs ahead of a checkpoint that is not complete yet
    return final


def write_checkpoint_files(folder: Path, state: TrainState, trainable: dict, optimizer_state: dict,
                           rngs: list[tuple[dict, dict]], config: dict) -> None:
    """`rngs`: (tensors, plain) RNG states of each process; rank 0's under the plain names, so one
    process resumes from it as from its own; the others' torch states as `rank{r}/name`."""
    rng_tensors, rng_plain = rngs[0]
    for r, (tensors, _) in enumerate(rngs[1:], start=1):
        rng_tensors = {**rng_tensors, **{f"rank{r}/{k}": v for k, v in tensors.items()}}
    # Each file is written and fsynced by files.py; the marker goes last, and only then is the folder renamed.
    atomic_save_safetensors(trainable, folder / "trainable.safetensors")
    atomic_torch_save(optimizer_state, folder / "optimizer.pt")
    atomic_torch_save(rng_tensors, folder / "rng.pt")
    meta = {"train_state": state.__dict__, "rng": rng_plain, "config": config}
    atomic_write_json(folder / "state.json", meta, indent=None)
    faults.in_save(folder, state.step)  # test-only: lets a test kill the process mid-save
    atomic_write_text(folder / MARKER, "ok\n")  # last: its presence means complete


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first. Folders without the marker are ignored."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = STEP_DIR.match(p.name)
        if m and (p / MARKER).is_file():
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def prune_checkpoints(root: Path, keep: int) -> None:
    for old in complete_checkpoints(root.parent)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def checkpoint_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """What a checkpoint holds of the model: every parameter that requires grad, plus the tensors a
    module names in its `checkpoint_extra` attribute, the ones its method changes outside the
    optimizer (Delta-LoRA's weight W and its copies of A and B)."""
    out = {n: p for n, p in model.named_parameters() if p.requires_grad}
    for name, module in model.named_modules():
        for attr in getattr(module, "checkpoint_extra", ()):
            out[f"{name}.{attr}" if name else attr] = getattr(module, attr)
    return out


def load_checkpoint(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> TrainState:
    """Restore weights, optimizer and RNG from a complete checkpoint; fail loudly naming a bad file."""
    path = Path(path)
    files = {name: path / name for name in ("trainable.safetensors", "optimizer.pt", "rng.pt", "state.json")}
    for name, f in files.items():
        if not f.is_file():
            raise UserError(f"Checkpoint {str(path)!r} is missing {name}; it cannot be resumed exactly.")
    trainable = read_safetensors(files["trainable.safetensors"], "the checkpoint's trainable weights")
    opt_state = read_torch(files["optimizer.pt"], "the checkpoint's optimizer state")
    rng_tensors = read_torch(files["rng.pt"], "the checkpoint's random generator states")
    meta = read_json(files["state.json"], "the checkpoint's step and random generator states")
    copy_trainable(model, trainable, files["trainable.safetensors"])
    optimizer.load_state_dict(distributed.shard_optimizer_state(optimizer, opt_state))
    # This process's torch RNG states if the checkpoint has them (written by as many processes), else rank 0's.
    own = {k.split("/", 1)[1]: v for k, v in rng_tensors.items() if k.startswith(f"rank{distributed.rank()}/")}
    rng_restore(own or {k: v for k, v in rng_tensors.items() if "/" not in k}, meta["rng"])
    return TrainState(**meta["train_state"])


def copy_trainable(model: torch.nn.Module, trainable: dict[str, torch.Tensor], source: Path) -> None:
    """Copy a checkpoint's tensors into the model (each process's shard of them under FSDP2)."""
    params = checkpoint_tensors(model)  # under FSDP2 DTensors, whose .shape is the whole tensor's
    check_keys(params, trainable, source, what="the model's trainable weights")
    with torch.no_grad():
        for name, tensor in trainable.items():
            params[name].copy_(distributed.shard_like(params[name], tensor))
