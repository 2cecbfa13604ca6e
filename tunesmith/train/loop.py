"""The training loop, shared by every method and objective.

What differs between methods lives in the model (which parameters are trainable) and in the
method's parameter groups and after-step hook; what differs between objectives lives in the
objective (tunesmith/objectives/registry.py): how examples become micro-batches, what the loss
is normalised by, the loss and its metrics, an optional rollout. The loop only does this, per
optimizer step:

    window = the next grad_accum micro-batches (a pure function of seed and step)
    window = objective.rollout(model, window, step, generator(seed, step))    (online RL only)
    window = objective.before_window(model, window)      (e.g. KTO's z0 over the window, no gradient)
    loss   = sum of the loss in the window / the objective's units in the window
    clip the gradient norm; skip the step if loss or gradient is not finite
    set lr from the schedule; optimizer step; method.after_step; log; maybe validate; maybe checkpoint

Because the data order, the schedule, the rollout seed and the RNG states are functions of the
step or saved in the checkpoint, a killed run resumed from its newest checkpoint ends bit-exact
with an uninterrupted one (fp32, CPU).

Under torchrun every process runs this loop on its share of each micro-batch, through the DDP or
FSDP2 wrapper of distributed.py; counts, loss, metrics and gradient norm are those of the global window.
"""

from __future__ import annotations

import contextlib
import logging
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch
from tqdm.auto import tqdm

from tunesmith.config import Config
from tunesmith.data.dataset import epoch_order
from tunesmith.data.grouping import length_grouped_order
from tunesmith.errors import UserError
from tunesmith.models.attention import NAME as VARLEN
from tunesmith.models.attention import restore_attention, use_varlen_attention
from tunesmith.objectives.registry import Objective, as_loss_output, get_objective
from tunesmith.train import distributed, faults, progress
from tunesmith.train.metrics_log import MetricsLog
from tunesmith.train.validate import held_out_score
from tunesmith.train.checkpoint import (TrainState, checkpoint_tensors, complete_checkpoints, load_checkpoint,
                                       save_checkpoint)
from tunesmith.train.compile import compile_layers, uncompile_layers
from tunesmith.train.optim import build_optimizer, lr_at, set_lr
from tunesmith.train.recompute import disable_checkpointing, enable_checkpointing, wants_checkpointing

log = logging.getLogger(__name__)

LossFn = Callable[[torch.nn.Module, dict], tuple]  # (model, batch) -> (sum, units) or (sum, units, metrics)


def default_objective(cfg: Config) -> Objective:
    """The configured objective; auto means the examples were encoded by whichever the data format chose,
    and the two it can choose (sft, causal_lm) batch and score alike."""
    return get_objective("sft" if cfg.objective.name == "auto" else cfg.objective.name).configured(cfg.objective)


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
    the global micro-batches hold rows of similar length (tunesmith/data/grouping.py). The objective
    turns the rows into tensors."""

    def __init__(self, examples: list[dict], schedule: Schedule, seed: int, pad_id: int, device: torch.device,
                 pack_len: int = 0, group_by_length: bool = False, objective: Objective | None = None):
        self.examples, self.schedule, self.seed, self.pad_id, self.device = examples, schedule, seed, pad_id, device
        self.pack_len = pack_len  # > 0: padding-free rows of at most this many tokens
        self.objective = objective or get_objective("sft")
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
        faults.log_samples(k, self.schedule.grad_accum, mine, distributed.rank(), distributed.world())
        # A short last micro-batch can leave a process no row. It runs a filler row instead (no
        # loss, zero gradient): DDP and FSDP2 need every process in every forward and backward.
        rows = [self.examples[i] for i in mine] or [self.objective.filler(self.examples[indices[0]])]
        batch = self.objective.collate(rows, self.pad_id, self.pack_len)
        return {k: v.to(self.device) for k, v in batch.items()}

    def window(self, step: int) -> list[dict[str, torch.Tensor]]:
        first = step * self.schedule.grad_accum
        return [self.micro_batch(k) for k in range(first, first + self.schedule.grad_accum)]


def real_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Non-pad tokens of a padded or packed micro-batch."""
    if "attention_mask" in batch:
        return int(batch["attention_mask"].sum())
    return int(batch["real_tokens"])


def rollout_generator(seed: int, step: int) -> torch.Generator:
    """The generator a rollout samples with: a function of (seed, step) alone, so resume samples alike."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step) % 2**63)


def trainable_state(model) -> dict[str, torch.Tensor]:
    """Trainable parameters plus tensors a method changes outside the optimizer (see checkpoint_tensors)."""
    return checkpoint_tensors(model)


def packed_row_length(model, cfg: Config) -> int:
    """Longest packed row: unbounded with per-sample attention, else data.max_seq_len."""
    return sys.maxsize if model.config._attn_implementation == VARLEN else cfg.data.max_seq_len


@dataclass
class Setup:
    """What training runs through: the model, the (possibly DDP/FSDP2-wrapped) module the loss runs through,
    its loss function, the packing length."""

    model: torch.nn.Module
    runner: torch.nn.Module
    loss_fn: LossFn
    pack_len: int


@contextlib.contextmanager
def training_setup(model, cfg: Config, loss_fn: LossFn, objective: Objective) -> Iterator[Setup]:
    """Switch the model into its training configuration, and back on the way out however the run ends.

    Packed rows attend per sample (tunesmith/models/attention.py), so a row's length costs nothing
    quadratic: a micro-batch becomes one row, with no padding at all. Where another attention
    implementation is configured, rows stay within max_seq_len (its mask is quadratic in the row).
    Checkpointing and compiling change how the decoder layers run, so they go in before DDP or FSDP2
    wrap the model. FSDP2's sharding is not undone: train() rebuilds a whole model from the checkpoint."""
    t = cfg.train
    with contextlib.ExitStack() as undo:
        undo.callback(model.eval)
        pack_len = 0
        if cfg.data.packing and objective.packs:
            before = use_varlen_attention(model)
            undo.callback(restore_attention, model, before)
            pack_len = packed_row_length(model, cfg)
        if wants_checkpointing(cfg):
            enable_checkpointing(model)
            undo.callback(disable_checkpointing, model)
        if t.compile:
            compile_layers(model)
            undo.callback(uncompile_layers, model)
        runner, loss_fn = distributed.wrap(model, loss_fn, cfg.method.name)  # (model, loss_fn) for one process
        yield Setup(model, runner, loss_fn, pack_len)


def resume_state(run_dir: Path, model, optimizer, total_steps: int, resume: bool) -> TrainState | None:
    """The state of the newest complete checkpoint when resuming (weights and optimizer loaded), else None."""
    if not resume:
        return None
    found = complete_checkpoints(run_dir)
    if not found:
        log.info("train.resume is on but %s has no complete checkpoint; starting fresh", run_dir)
        return None
    state = load_checkpoint(found[-1], model, optimizer)
    log.info("Resumed from %s (step %d of %d)", found[-1], state.step, total_steps)
    return state


def train(model, train_examples, val_examples, cfg: Config, run_dir: Path, pad_id: int,
          loss_fn: LossFn | None = None,
          param_groups: list[dict] | Callable[[torch.nn.Module], list[dict]] | None = None,
          after_step: Callable[[torch.nn.Module], None] | None = None,
          objective: Objective | None = None, trackers=None):
    """Train `model` in place. Returns the final TrainState.

    `objective` (default: the configured one) batches, normalises and scores; `loss_fn` replaces its
    loss (tests count or break calls through it). `param_groups` (default: every trainable parameter
    at the base rate) and `after_step` come from the method, so methods that change the training rule
    need no branch in this loop. `param_groups` may be a function of the model: under torchrun with
    method.name=full, FSDP2 replaces every parameter by a shard, so the groups must be built after it
    did (distributed.py), and on return `model` holds shards (the final checkpoint holds the whole weights).
    `trackers` (train/trackers.py) get every metrics.jsonl record too; the caller closes them.
    """
    device = next(model.parameters()).device
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    t = cfg.train
    objective = objective or default_objective(cfg)
    faults.warn_if_armed()
    distributed.init(device.type)
    schedule = Schedule.from_config(len(train_examples), cfg, distributed.world())
    with training_setup(model, cfg, loss_fn or objective.loss, objective) as setup:
        source = BatchSource(train_examples, schedule, t.seed, pad_id, device, setup.pack_len,
                             cfg.data.group_by_length, objective)
        if callable(param_groups):
            param_groups = param_groups(model)
        optimizer = build_optimizer(param_groups or [p for p in model.parameters() if p.requires_grad], t)
        state = resume_state(run_dir, model, optimizer, schedule.total_steps, t.resume)
        if state is not None and objective.carry is not None:  # reward call counters and the like (rl/carry.py)
            objective.carry.load_state_dict(state.objective)
        metrics = MetricsLog(run_dir / "metrics.jsonl", state.step if state else None, trackers)
        state = state or TrainState()
        setup.runner.train()
        bar = tqdm(total=schedule.total_steps, initial=state.step, desc="train", unit="step", dynamic_ncols=True,
                   disable=not distributed.is_main())
        phase_bar = bar if distributed.is_main() and objective.rollout is not None else None  # online RL only
        with progress.active(phase_bar):  # train/progress.py: the rollout and update phases of a step on the bar
            while state.step < schedule.total_steps:
                run_step(setup, optimizer, source, objective, state, schedule, cfg, after_step, metrics, bar)
                last = state.step == schedule.total_steps
                if val_examples and ((t.eval_every and state.step % t.eval_every == 0) or last):
                    scores = held_out_score(setup.runner, val_examples, t.batch_size, pad_id, objective,
                                            setup.loss_fn, setup.pack_len)
                    metrics.write({"step": state.step, **scores})
                    if distributed.is_main():
                        shown = ", ".join(f"{k.removeprefix('val_')} {v:.4f}" for k, v in scores.items())
                        bar.write(f"step {state.step}: validation {shown}")
                if (t.save_every and state.step % t.save_every == 0) or last:
                    if objective.carry is not None:
                        state.objective = objective.carry.state_dict()
                    save_checkpoint(run_dir, state, trainable_state(model), optimizer, cfg.to_dict(),
                                    t.keep_checkpoints)
                faults.after_step(state.step, distributed.rank())
        bar.close()
    return state


def run_step(setup: Setup, optimizer, source: BatchSource, objective: Objective, state: TrainState,
             schedule: Schedule, cfg: Config, after_step, metrics: "MetricsLog", bar) -> None:
    """One optimizer step, read top to bottom: data, rollout, forward/backward, update, log."""
    t = cfg.train
    started = time.perf_counter()
    step = state.step  # 0-based index of this step; state.step counts the steps done
    phases = progress.current()
    phases.begin_step(step)
    window = source.window(step)
    if objective.rollout is not None:
        with phases.phase("rollout"):
            window = objective.rollout(setup.model, window, step, rollout_generator(t.seed, step))
    if objective.before_window is not None:  # e.g. KTO's z0: a statistic of the whole global window
        window = objective.before_window(setup.runner, window)
    with phases.phase("update"):
        result = train_step(setup.runner, optimizer, window, t.max_grad_norm,
                            faults.in_window(setup.loss_fn, step + 1), objective)
    phases.tokens(result.tokens, "update")
    # loss and grad_norm are global (summed or combined over processes): every process decides alike
    if math.isfinite(result.loss) and math.isfinite(result.grad_norm):
        set_lr(optimizer, lr_at(step, t, schedule.total_steps))
        optimizer.step()
        if after_step is not None:
            after_step(setup.model)
        state.bad_steps_in_row = 0
        state.tokens_seen += result.units
    else:
        skip_step(state, step, result, t.max_bad_steps)
    optimizer.zero_grad(set_to_none=True)
    state.step += 1
    elapsed = time.perf_counter() - started
    record = {
        "step": state.step,
        "loss": result.loss,
        **result.metrics,
        "lr": lr_at(step, t, schedule.total_steps),
        "grad_norm": result.grad_norm,
        "tokens_per_s": result.tokens / elapsed,
        **(phases.rates() if objective.rollout is not None else {}),  # generate_/update_tokens_per_s
        "step_time": elapsed,
        "epoch": step * schedule.grad_accum / schedule.batches_per_epoch,
    }
    if state.step % t.log_every == 0 or state.step == schedule.total_steps:
        metrics.write(record)
    warning = objective.check_step(result.metrics) if objective.check_step is not None else None
    if warning and not state.warned:
        log.warning("step %d: %s", state.step, warning)
        state.warned = True
    bar.update(1)
    bar.set_postfix(loss=f"{result.loss:.4f}", **{k: f"{v:.3f}" for k, v in result.metrics.items()},
                    lr=f"{record['lr']:.2e}", tok_s=f"{record['tokens_per_s']:.0f}",
                    **(phases.postfix() if objective.rollout is not None else {}))


def skip_step(state: TrainState, step: int, result: "StepResult", max_bad_steps: int) -> None:
    """Count a non-finite step (no update); abort after max_bad_steps of them in a row."""
    state.skipped_steps += 1
    state.bad_steps_in_row += 1
    log.warning("step %d: non-finite loss or gradient (loss=%s, grad norm=%s); step skipped", step + 1,
                result.loss, result.grad_norm)
    if state.bad_steps_in_row >= max_bad_steps:
        raise UserError(
            f"Training aborted at step {step + 1}: {state.bad_steps_in_row} steps in a row had a non-finite "
            "loss or gradient. Lower train.lr, check the data, or raise train.max_bad_steps."
        )


@dataclass
class StepResult:
    """One step's global numbers: mean loss per unit, gradient norm, real tokens, units, mean metrics."""

    loss: float
    grad_norm: float
    tokens: int
    units: int
    metrics: dict[str, float] = field(default_factory=dict)


def train_step(model, optimizer, window, max_grad_norm: float, loss_fn: LossFn,
               objective: Objective | None = None) -> StepResult:
    """Forward and backward over one accumulation window.

    Under torchrun every count, the loss and the metrics are those of the global window (all processes)."""
    objective = objective or get_objective("sft")
    units, tokens = map(int, distributed.sum_over_ranks(sum(objective.units(b) for b in window),
                                                         sum(real_tokens(b) for b in window)))
    total = 0.0
    sums = dict.fromkeys(objective.metrics, 0.0)
    for i, batch in enumerate(window):
        with distributed.grad_sync(model, enabled=i == len(window) - 1):
            loss_sum, _, metrics = as_loss_output(loss_fn(model, batch))
            # Normalise by the units of the whole window (labelled tokens, pairs, ...), so k micro-batches
            # of B/k rows give the same gradient as one batch of B rows. DDP and FSDP2 average the gradients
            # of the processes: times world, the average is the sum, the gradient of the global window.
            (loss_sum * distributed.world() / max(1, units)).backward()
        total += float(loss_sum.detach())
        for name in sums:
            sums[name] += float(metrics.get(name, 0.0))
    total, *metric_totals = distributed.sum_over_ranks(total, *sums.values())
    params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
    limit = max_grad_norm if max_grad_norm > 0 else float("inf")
    grad_norm = distributed.clip_grad_norm(params, limit) if params else 0.0
    return StepResult(total / max(1, units), grad_norm, tokens, units,
                      {name: v / max(1, units) for name, v in zip(sums, metric_totals)})
