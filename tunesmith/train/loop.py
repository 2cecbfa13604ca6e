"""The training loop, shared by every method and objective.

What differs between methods lives in the model (which parameters are trainable); what differs
between objectives lives in `loss_fn`. The loop only does this, per optimizer step:

    window = the next grad_accum micro-batches (a pure function of seed and step)
    loss   = sum of token losses in the window / labelled tokens in the window
    clip the gradient norm; skip the step if loss or gradient is not finite
    set lr from the schedule; AdamW step; log; maybe validate; maybe checkpoint

Because the data order, the schedule and the RNG states are functions of the step or saved in
the checkpoint, a killed run resumed from its newest checkpoint ends bit-exact with an
uninterrupted one (fp32, CPU).

Under torchrun every process runs this loop on its share of each micro-batch, through the DDP or
FSDP2 wrapper of distributed.py; counts, loss and gradient norm are those of the global window.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

from tunesmith.config import Config
from tunesmith.data.dataset import collate, epoch_order
from tunesmith.data.grouping import length_grouped_order
from tunesmith.data.packing import collate_packed
from tunesmith.errors import UserError
from tunesmith.models.attention import NAME as VARLEN
from tunesmith.models.attention import restore_attention, use_varlen_attention
from tunesmith.objectives.lm import IGNORE, token_loss_sum
from tunesmith.train import distributed
from tunesmith.train.checkpoint import (TrainState, checkpoint_tensors, complete_checkpoints, load_checkpoint,
                                       save_checkpoint)
from tunesmith.train.compile import compile_layers, uncompile_layers
from tunesmith.train.optim import build_optimizer, lr_at, set_lr
from tunesmith.train.recompute import disable_checkpointing, enable_checkpointing

log = logging.getLogger(__name__)

LossFn = Callable[[torch.nn.Module, dict], tuple[torch.Tensor, int]]


@dataclass
class Schedule:
    """How many rows, micro-batches and steps the run has."""

    rows: int
    batch_size: int
    grad_accum: int
    total_steps: int

    @property
    def batches_per_epoch(self) -> int:
        return math.ceil(self.rows / self.batch_size)

    @classmethod
    def from_config(cls, rows: int, cfg: Config, world: int = 1) -> "Schedule":
        """`world` processes each take train.batch_size rows of a micro-batch: batch_size is the global one."""
        t = cfg.train
        if rows == 0:
            raise UserError("No training rows are left after validation; check data.train and data.max_seq_len.")
        batch_size = t.batch_size * world
        per_epoch = math.ceil(rows / batch_size)
        steps = t.max_steps or max(1, math.ceil(t.epochs * per_epoch / t.grad_accum))
        return cls(rows, batch_size, t.grad_accum, steps)


class BatchSource:
    """Micro-batch k of the run, by index: epoch k // B, position k % B, rows from a seeded permutation.

    Under torchrun micro-batch k is global (schedule.batch_size rows, the same on every process) and
    each process trains on its own contiguous share of it (distributed.share). With `group_by_length`
    the global micro-batches hold rows of similar length (tunesmith/data/grouping.py)."""

    def __init__(self, examples: list[dict], schedule: Schedule, seed: int, pad_id: int, device: torch.device,
                 pack_len: int = 0, group_by_length: bool = False):
        self.examples, self.schedule, self.seed, self.pad_id, self.device = examples, schedule, seed, pad_id, device
        self.pack_len = pack_len  # > 0: padding-free rows of at most this many tokens
        self.lengths = [len(e["input_ids"]) for e in examples] if group_by_length else None
        self._order: tuple[int, list[int]] | None = None

    def epoch_order(self, epoch: int) -> list[int]:
        if self.lengths is None:
            return epoch_order(len(self.examples), self.seed, epoch)
        return length_grouped_order(self.lengths, self.schedule.batch_size, self.seed, epoch)

    def micro_batch(self, k: int) -> dict[str, torch.Tensor]:
        epoch, position = divmod(k, self.schedule.batches_per_epoch)
        if self._order is None or self._order[0] != epoch:
            self._order = (epoch, self.epoch_order(epoch))
        bs = self.schedule.batch_size
        indices = self._order[1][position * bs : (position + 1) * bs]
        mine = distributed.share(indices)
        _test_hook_log_samples(k, self.schedule.grad_accum, mine)
        # A short last micro-batch can leave a process no row. It runs an unlabelled row instead (no
        # loss, zero gradient): DDP and FSDP2 need every process in every forward and backward.
        rows = [self.examples[i] for i in mine] or [unlabelled(self.examples[indices[0]])]
        batch = collate_packed(rows, self.pad_id, self.pack_len) if self.pack_len else collate(rows, self.pad_id)
        return {k: v.to(self.device) for k, v in batch.items()}

    def window(self, step: int) -> list[dict[str, torch.Tensor]]:
        first = step * self.schedule.grad_accum
        return [self.micro_batch(k) for k in range(first, first + self.schedule.grad_accum)]


def real_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Non-pad tokens of a padded or packed micro-batch."""
    if "attention_mask" in batch:
        return int(batch["attention_mask"].sum())
    return int(batch["real_tokens"])


def labelled_tokens(batch: dict[str, torch.Tensor]) -> int:
    return int((batch["labels"][:, 1:] != IGNORE).sum())


def unlabelled(example: dict) -> dict:
    """`example` with every label ignored: a forward and backward that change nothing."""
    return {**example, "labels": [IGNORE] * len(example["labels"])}


@torch.no_grad()
def validation_loss(model, examples: list[dict], batch_size: int, pad_id: int, loss_fn: LossFn = token_loss_sum,
                    pack_len: int = 0):
    """Token-weighted mean loss over `examples` (eval mode: no dropout, no RNG use).

    Under torchrun process r scores batches r, r + world, ...; in the last round a process left
    without one runs an unlabelled row, because FSDP2 needs every process in every forward.
    pack_len > 0 packs each batch like training does (the same loss, less compute)."""
    if not examples:
        return None
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    starts = range(0, len(examples), batch_size)
    for first in range(0, len(starts), distributed.world()):
        j = first + distributed.rank()
        rows = examples[starts[j] : starts[j] + batch_size] if j < len(starts) else [unlabelled(examples[0])]
        batch = collate_packed(rows, pad_id, pack_len) if pack_len else collate(rows, pad_id)
        loss_sum, n = loss_fn(model, {k: v.to(device) for k, v in batch.items() if k != "real_tokens"})
        total, count = total + float(loss_sum), count + n
    total, count = distributed.sum_over_ranks(total, count)
    model.train(was_training)
    return total / max(1, count)


class MetricsLog:
    """metrics.jsonl: one JSON object per line. On resume, lines past the checkpoint are dropped.
    Rank 0 alone writes it; on the other processes this is a no-op."""

    def __init__(self, path: Path, resume_step: int | None):
        self.path = path if distributed.is_main() else None
        if self.path is None:
            return
        if resume_step is None:
            path.write_text("", encoding="utf-8")
        elif path.exists():
            # Rewritten under a temporary name, then renamed: a kill here loses no line.
            kept = [l for l in path.read_text(encoding="utf-8").splitlines() if l and _line_step(l) <= resume_step]
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text("".join(l + "\n" for l in kept), encoding="utf-8")
            os.replace(tmp, path)

    def write(self, record: dict) -> None:
        if self.path is None:
            return
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")


def _line_step(line: str) -> float:
    """A metrics line's step. A line cut short by a kill mid-write is always past the checkpoint: inf."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return math.inf


def trainable_state(model) -> dict[str, torch.Tensor]:
    """Trainable parameters plus tensors a method changes outside the optimizer (see checkpoint_tensors)."""
    return checkpoint_tensors(model)


def packed_row_length(model, cfg: Config) -> int:
    """Longest packed row: unbounded with per-sample attention, else data.max_seq_len."""
    return sys.maxsize if model.config._attn_implementation == VARLEN else cfg.data.max_seq_len


def train(model, train_examples, val_examples, cfg: Config, run_dir: Path, pad_id: int,
          loss_fn: LossFn = token_loss_sum,
          param_groups: list[dict] | Callable[[torch.nn.Module], list[dict]] | None = None,
          after_step: Callable[[torch.nn.Module], None] | None = None):
    """Train `model` in place. Returns the final TrainState.

    `param_groups` (default: every trainable parameter at the base rate) and `after_step` come
    from the method, so methods that change the training rule need no branch in this loop.
    `param_groups` may be a function of the model: under torchrun with method.name=full, FSDP2
    replaces every parameter by a shard, so the groups must be built after it did (distributed.py),
    and on return `model` holds shards (the final checkpoint holds the whole weights).
    """
    device = next(model.parameters()).device
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    t = cfg.train
    distributed.init(device.type)
    schedule = Schedule.from_config(len(train_examples), cfg, distributed.world())
    # Packed rows attend per sample (tunesmith/models/attention.py), so a row's length costs nothing
    # quadratic: a micro-batch becomes one row, with no padding at all. Where another attention
    # implementation is configured, rows stay within max_seq_len (its mask is quadratic in the row).
    attention_before = use_varlen_attention(model) if cfg.data.packing else None
    pack_len = packed_row_length(model, cfg) if cfg.data.packing else 0
    source = BatchSource(train_examples, schedule, t.seed, pad_id, device, pack_len, cfg.data.group_by_length)
    # Both change how the decoder layers run, so they go in before DDP or FSDP2 wrap the model.
    if t.gradient_checkpointing:
        enable_checkpointing(model)
    if t.compile:
        compile_layers(model)
    runner, loss_fn = distributed.wrap(model, loss_fn, cfg.method.name)  # (model, loss_fn) for one process
    if callable(param_groups):
        param_groups = param_groups(model)
    optimizer = build_optimizer(param_groups or [p for p in model.parameters() if p.requires_grad], t)
    state = TrainState()
    resume_step = None
    if t.resume:
        found = complete_checkpoints(run_dir)
        if found:
            state = load_checkpoint(found[-1], model, optimizer)
            resume_step = state.step
            log.info("Resumed from %s (step %d of %d)", found[-1], state.step, schedule.total_steps)
        else:
            log.info("train.resume is on but %s has no complete checkpoint; starting fresh", run_dir)
    metrics = MetricsLog(Path(run_dir) / "metrics.jsonl", resume_step)
    config_dict = cfg.to_dict()

    runner.train()
    bar = tqdm(total=schedule.total_steps, initial=state.step, desc="train", unit="step", dynamic_ncols=True,
               disable=not distributed.is_main())
    while state.step < schedule.total_steps:
        started = time.perf_counter()
        step = state.step
        loss, grad_norm, tokens, seen = train_step(runner, optimizer, source.window(step), t.max_grad_norm,
                                                   _test_hook_kill_in_window(loss_fn, step + 1))
        # loss and grad_norm are global (summed or combined over processes): every process decides alike
        finite = math.isfinite(loss) and math.isfinite(grad_norm)
        if finite:
            set_lr(optimizer, lr_at(step, t, schedule.total_steps))
            optimizer.step()
            if after_step is not None:
                after_step(model)
            state.bad_steps_in_row = 0
            state.tokens_seen += seen
        else:
            state.skipped_steps += 1
            state.bad_steps_in_row += 1
            log.warning("step %d: non-finite loss or gradient (loss=%s, grad norm=%s); step skipped", step + 1, loss, grad_norm)
            if state.bad_steps_in_row >= t.max_bad_steps:
                raise UserError(
                    f"Training aborted at step {step + 1}: {state.bad_steps_in_row} steps in a row had a non-finite "
                    "loss or gradient. Lower train.lr, check the data, or raise train.max_bad_steps."
                )
        optimizer.zero_grad(set_to_none=True)
        state.step += 1
        elapsed = time.perf_counter() - started
        record = {
            "step": state.step,
            "loss": loss,
            "lr": lr_at(step, t, schedule.total_steps),
            "grad_norm": grad_norm,
            "tokens_per_s": tokens / elapsed,
            "epoch": step * schedule.grad_accum / schedule.batches_per_epoch,
        }
        if state.step % t.log_every == 0 or state.step == schedule.total_steps:
            metrics.write(record)
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}", lr=f"{record['lr']:.2e}", tok_s=f"{record['tokens_per_s']:.0f}")
        last = state.step == schedule.total_steps
        if val_examples and ((t.eval_every and state.step % t.eval_every == 0) or last):
            val = validation_loss(runner, val_examples, t.batch_size, pad_id, loss_fn, pack_len)
            metrics.write({"step": state.step, "val_loss": val})
            if distributed.is_main():
                bar.write(f"step {state.step}: validation loss {val:.4f}")
        if (t.save_every and state.step % t.save_every == 0) or last:
            save_checkpoint(run_dir, state, trainable_state(model), optimizer, config_dict, t.keep_checkpoints)
        _test_hook_kill(state.step)
    bar.close()
    if attention_before is not None:
        restore_attention(model, attention_before)
    if t.gradient_checkpointing:
        disable_checkpointing(model)
    if t.compile:
        uncompile_layers(model)
    model.eval()
    return state


def train_step(model, optimizer, window, max_grad_norm: float, loss_fn: LossFn):
    """Forward and backward over one accumulation window; returns (loss, grad norm, tokens, labelled).

    Under torchrun every count and the loss are those of the global window (all processes)."""
    labelled, tokens = map(int, distributed.sum_over_ranks(sum(labelled_tokens(b) for b in window),
                                                            sum(real_tokens(b) for b in window)))
    total = 0.0
    for i, batch in enumerate(window):
        with distributed.grad_sync(model, enabled=i == len(window) - 1):
            loss_sum, _ = loss_fn(model, batch)
            # Normalise by the labelled tokens of the whole window, so k micro-batches of B/k rows
            # give the same gradient as one batch of B rows. DDP and FSDP2 average the gradients of
            # the processes: times world, the average is the sum, the gradient of the global window.
            (loss_sum * distributed.world() / max(1, labelled)).backward()
        total += float(loss_sum.detach())
    (total,) = distributed.sum_over_ranks(total)
    params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
    limit = max_grad_norm if max_grad_norm > 0 else float("inf")
    grad_norm = distributed.clip_grad_norm(params, limit) if params else 0.0
    return total / max(1, labelled), grad_norm, tokens, labelled


def _test_hook_kill(step: int) -> None:
    """Test-only: TUNESMITH_TEST_KILL_AT_STEP=N sends this process SIGKILL right after step N. Under
    torchrun TUNESMITH_TEST_KILL_RANK=R limits it to rank R (torchrun then takes the others down)."""
    target = os.environ.get("TUNESMITH_TEST_KILL_AT_STEP")
    only = os.environ.get("TUNESMITH_TEST_KILL_RANK")
    if target and int(target) == step and (only is None or int(only) == distributed.rank()):
        os.kill(os.getpid(), signal.SIGKILL)


def _test_hook_kill_in_window(loss_fn: LossFn, step: int) -> LossFn:
    """Test-only: TUNESMITH_TEST_KILL_IN_STEP=N:K sends SIGKILL inside step N, once K (< grad_accum) of its
    micro-batches have been through forward and backward: a kill inside an accumulation window."""
    hook = os.environ.get("TUNESMITH_TEST_KILL_IN_STEP")
    if not hook or int(hook.split(":")[0]) != step:
        return loss_fn
    done, calls = int(hook.split(":")[1]), [0]

    def counted(model, batch):
        if calls[0] == done:
            os.kill(os.getpid(), signal.SIGKILL)
        calls[0] += 1
        return loss_fn(model, batch)

    return counted


def _test_hook_log_samples(k: int, grad_accum: int, indices: list[int]) -> None:
    """Test-only: TUNESMITH_TEST_LOG_SAMPLES=PATH appends one JSON line per micro-batch served:
    {"step": 1-based step, "micro": k, "rows": row indices}, so a test can compare data orders. Under
    torchrun every process logs its own share, with "rank" added."""
    path = os.environ.get("TUNESMITH_TEST_LOG_SAMPLES")
    if path:
        record = {"step": k // grad_accum + 1, "micro": k, "rows": list(indices)}
        if distributed.world() > 1:
            record["rank"] = distributed.rank()
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
