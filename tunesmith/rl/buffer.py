"""The rollout buffer on disk: a rollout's micro-batches kept until its last update, so a resume reuses them.

With objective.num_iterations = k > 1, the rollout of step r (r a multiple of k) feeds steps r .. r + k - 1,
with the log-probabilities of the policy that sampled (the "old" policy) computed at step r. A run resumed at
a step in between cannot recompute them (the policy has moved since), so the buffer is written at step r,
atomically, as

    <output.dir>/rollout/step-<r>[-rank<i>].safetensors      tensors "<micro-batch>/<name>"

and read back by the resumed run: bit for bit what the uninterrupted run used. Buffers older than the one
the newest complete checkpoint would need are deleted when a new one is written, and so are buffers of later
steps (left by an earlier run in the same folder).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from tunesmith.files import atomic_save_safetensors, read_safetensors
from tunesmith.train import distributed

FOLDER = "rollout"
NAME = re.compile(r"^step-(\d+)(?:-rank\d+)?\.safetensors$")


def buffer_path(run_dir: Path, step: int) -> Path:
    rank = f"-rank{distributed.rank()}" if distributed.world() > 1 else ""
    return Path(run_dir) / FOLDER / f"step-{step}{rank}.safetensors"


def save_buffer(run_dir: Path, step: int, batches: list[dict[str, torch.Tensor]], every: int) -> None:
    """Write the rollout of `step` (each micro-batch's tensors), then prune the buffers no resume can need."""
    from tunesmith.train.checkpoint import STEP_DIR, complete_checkpoints

    flat = {f"{k}/{name}": t.detach().cpu().contiguous() for k, batch in enumerate(batches)
            for name, t in batch.items()}
    flat["count"] = torch.tensor(len(batches))
    path = buffer_path(run_dir, step)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_save_safetensors(flat, path)
    found = complete_checkpoints(run_dir)
    newest = int(STEP_DIR.match(found[-1].name).group(1)) if found else 0
    needed = newest - newest % every  # the rollout a resume from the newest checkpoint reads
    for other in path.parent.iterdir():
        match = NAME.match(other.name)
        if match and other != path and (int(match.group(1)) < needed or int(match.group(1)) > step):
            other.unlink(missing_ok=True)


def load_buffer(run_dir: Path, step: int, device) -> list[dict[str, torch.Tensor]] | None:
    """The micro-batches saved for the rollout of `step`, on `device`; None if there is no such buffer."""
    path = buffer_path(run_dir, step)
    if not path.is_file():
        return None
    flat = read_safetensors(path, f"the rollout buffer of step {step}")
    batches: list[dict[str, torch.Tensor]] = [{} for _ in range(int(flat.pop("count")))]
    for key, tensor in flat.items():
        k, name = key.split("/", 1)
        batches[int(k)][name] = tensor.to(device)
    return batches
