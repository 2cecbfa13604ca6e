"""GRPO: learn from the model's own samples, scored by reward functions, with no value model.

Each optimizer step's window of `prompt` rows is replaced by a rollout (the objective's `rollout`, called by
the loop once per step):

    sample    G completions per prompt (tunesmith/rl/sampling.py), prompt i's row j seeded from
              (train.seed, step, the prompt's row index, j): a resumed run draws the same completions
    score     r = sum_k w_k r_k(prompt, completion, other columns)       (tunesmith/rl/rewards.py)
    advantage A_i = (r_i - mean of the group) / (std of the group + 1e-4)  (objective.scale_rewards)
    batch     prompt + completion token ids, labels on the completion only (its stop token included), A per
              sequence; each micro-batch of the window keeps its own prompts' G completions

and the loss of a micro-batch is tunesmith/rl/losses.py's clipped surrogate with the k3 KL (beta > 0),
aggregated by objective.loss_type. The formulas, the options and the TRL correspondence: docs/rl.md.

Old policy. With objective.num_iterations = 1 the ratio's old log-probabilities are the current ones
detached (ratio 1: the loss is the policy gradient). With k > 1, the rollout of step r feeds steps r .. r+k-1;
its log-probabilities are computed at step r, without gradient, by the same function and the same
micro-batches as the loss, so the first update's ratio is exactly 1 (without dropout: method.dropout=0, as
a dropout mask differs between two forwards). The buffer (token ids, advantages, old log-probabilities, the
reference's) is written to output.dir/rollout/ (tunesmith/rl/buffer.py), so a run resumed at step r+1 .. r+k-1
reuses it and ends bit for bit as the uninterrupted one.

Flat groups. A group whose G rewards are all equal has A = 0 for every completion: it teaches nothing.
They are counted (`frac_reward_zero_std`), and with beta = 0 their sequences are left out of the forward and
backward, but their sequences and tokens still count in the loss's divisor, so the gradient is exactly the
one the full batch gives. objective.dynamic_sampling draws a flat group again with new seeds (up to
grpo_rollout.DYNAMIC_TRIES times; DAPO's dynamic sampling redraws until the batch is full instead). When at
least FLAT_SHARE of the groups are flat for FLAT_STEPS steps in a row, a warning says the reward gives no signal.

The reference (beta > 0, or the KL logged every objective.kl_every steps) is the model with the method
switched off, run without gradient once per rollout; beta = 0 and kl_every = 0 skip it.
"""

from __future__ import annotations

import json
from dataclasses import replace
from functools import partial
from pathlib import Path

import torch

from tunesmith.objectives.grpo_rollout import Run, completion_logps, draw, rollout
from tunesmith.objectives.registry import LossOutput, Objective
from tunesmith.rl import losses
from tunesmith.train import distributed

FLAT_SHARE, FLAT_STEPS = 0.9, 5  # the no-signal warning: this share of flat groups, this many steps in a row

# Logged every step (the loop divides each metric's sum by the window's units; see `rollout_stats`).
METRICS = ("policy_loss", "reward", "reward_std", "frac_reward_zero_std", "kl", "clip_low", "clip_high", "entropy",
           "completion_length", "truncated")


# --- data: prompt rows -> examples; a window's micro-batches hold only row indices until the rollout ----------


def encode(fields: dict, fmt: str, tokenizer, cfg) -> dict:
    """A validated `prompt` row -> {input_ids: the prompt rendered with the generation prompt, row: the row's
    fields as JSON (for the rewards), truncated}; a prompt longer than data.max_seq_len keeps its end."""
    from tunesmith.data.preference import token_ids
    from tunesmith.data.tokenize import as_messages, render

    messages = as_messages(fields["prompt"], "user")
    if cfg.system_prompt and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": cfg.system_prompt})
    ids = token_ids(tokenizer, render(tokenizer, messages, add_generation_prompt=True))
    return {"input_ids": ids[-cfg.max_seq_len:], "row": json.dumps(fields), "truncated": len(ids) > cfg.max_seq_len}


def keeps(example: dict) -> bool:
    return len(example["input_ids"]) > 0


def collate(examples: list[dict], pad_id: int, pack_len: int = 0) -> dict[str, torch.Tensor]:
    """A window's micro-batch before the rollout: the examples' indices in the training set (-1: a filler)."""
    return {"index": torch.tensor([int(e.get("index", -1)) for e in examples], dtype=torch.long)}


def units(batch: dict[str, torch.Tensor]) -> int:
    return int(batch["units"]) if "units" in batch else 0


def filler(example: dict) -> dict:
    return {**example, "index": -1}


def number_examples(examples: list[dict]) -> None:
    """Give each training example its index (the rollout finds its prompt, row and seed by it)."""
    for i, example in enumerate(examples):
        example["index"] = i


# --- the loss ------------------------------------------------------------------------------------------------------


def grpo_loss(model, batch: dict[str, torch.Tensor], opts) -> LossOutput:
    """(the micro-batch's loss sum, units, metric sums): losses.grpo_token_loss aggregated by loss_type, the
    skipped flat sequences counted in the divisor."""
    n = units(batch)
    stats = {k.removeprefix("stat/"): float(v) for k, v in batch.items() if k.startswith("stat/")}
    if "input_ids" not in batch:  # every sequence of this micro-batch was flat (or a filler): nothing to forward
        zero = torch.zeros((), requires_grad=True, device=batch["units"].device)
        if "filler_ids" in batch and distributed.world() > 1:  # DDP needs every process in every backward
            zero = model(input_ids=batch["filler_ids"]).logits.float().sum() * 0.0
        return zero, n, {**stats, "policy_loss": 0.0}
    logps, entropy = completion_logps(model, batch, entropy=True)
    mask = batch["completion_mask"]
    old = batch.get("old_logps")
    old = logps.detach() if old is None else old
    beta = opts.beta or 0.0
    token_loss, parts = losses.grpo_token_loss(logps, old, batch["advantages"], mask, opts.epsilon_low,
                                               opts.epsilon_high, beta, batch.get("ref_logps"))
    skipped = (int(batch["skipped_sequences"]), int(batch["skipped_tokens"]), batch.get("micro_tokens"))
    total = aggregate(token_loss, mask, opts, *skipped)
    policy = token_loss.detach() - (beta * parts["kl"].detach() * mask if beta else 0.0)
    scale = float(batch["token_scale"])
    metrics = {**stats, "policy_loss": float(aggregate(policy, mask, opts, *skipped)),
               "clip_low": float((parts["low_clipped"] * mask).sum()) * scale,
               "clip_high": float((parts["high_clipped"] * mask).sum()) * scale,
               "entropy": float((entropy * mask).sum()) * scale}
    if "kl" in parts:
        metrics["kl"] = float((parts["kl"].detach() * mask).sum()) * scale
    return total, n, metrics


def aggregate(token_loss, mask, opts, skipped_sequences: int, skipped_tokens: int,
              micro_tokens=None) -> torch.Tensor:
    """The loss sum of losses.aggregate, with skipped flat sequences (loss 0) in bnpo's token divisor; under
    torchrun bnpo divides by the tokens of the global micro-batch (`micro_tokens`, all processes)."""
    if opts.loss_type == "bnpo":
        divisor = micro_tokens if micro_tokens is not None else mask.sum() + skipped_tokens
        return (token_loss * mask).sum() / divisor.clamp(min=1)
    return losses.aggregate(token_loss, mask, opts.loss_type, opts.max_new_tokens)[0]


# --- held-out scoring, warnings, configuration ---------------------------------------------------------------------


def held_out_reward(model, examples, batch_size: int, pad_id: int, pack_len: int = 0, *, opts, rewards,
                    run: Run | None) -> dict | None:
    """{"val_reward": the mean reward of greedy completions of the validation prompts, "val_reward_<name>": ...}."""
    if run is None:
        return None
    scoring = Run(run.tokenizer, examples, run.pad_id, stop_ids=run.stop_ids, carry=run.carry)
    model = distributed.unwrap(model)  # under torchrun the loop passes the DDP wrapper; sampling runs the model
    was_training = model.training
    model.eval()
    sums: dict[str, float] = {}
    for first in range(0, len(examples), batch_size):
        indices = list(range(first, min(first + batch_size, len(examples))))
        _, per_reward, total = draw(model, indices, [0] * len(indices), opts, rewards, scoring, greedy=True)
        sums["val_reward"] = sums.get("val_reward", 0.0) + float(total.sum())
        for k, reward in enumerate(rewards):
            sums[f"val_reward_{reward.name}"] = sums.get(f"val_reward_{reward.name}", 0.0) + float(per_reward[k].sum())
    model.train(was_training)
    return {k: v / len(examples) for k, v in sums.items()}


def no_signal_warning(metrics: dict, seen: list[int]) -> str | None:
    """A warning once FLAT_SHARE of the groups have been flat for FLAT_STEPS steps in a row."""
    seen[0] = seen[0] + 1 if metrics.get("frac_reward_zero_std", 0.0) >= FLAT_SHARE else 0
    if seen[0] >= FLAT_STEPS:
        return (f"for {seen[0]} steps in a row at least {FLAT_SHARE:.0%} of the prompts got the same reward for all "
                "their completions: the rewards give no signal (all right or all wrong). Use harder or easier prompts, "
                "a graded reward (e.g. field_accuracy), more objective.num_generations, a higher "
                "objective.temperature, or objective.dynamic_sampling=true.")
    return None


def configure(cfg, method=None) -> Objective:
    """objective.* options, the rewards (imported now: objective.rewards, and objective.reward_model as one more
    reward, tunesmith/rl/reward_model.py) and the reference (the method switched off) bound in."""
    from tunesmith.methods.registry import switch_adapters_off
    from tunesmith.rl.reward_model import objective_rewards

    rewards = objective_rewards(cfg, "grpo")
    reference = (method.disable if method is not None else switch_adapters_off)
    return bind(cfg, rewards, reference, None)


def bind(opts, rewards, reference, run: Run | None) -> Objective:
    """The objective with its options, rewards, reference and (once bound) run in every function that needs them;
    its carry (rl/carry.py: reward call counters, the no-signal streak) is the run's, saved in checkpoints."""
    from tunesmith.rl.carry import Carry

    carry = Carry(rewards) if run is None or run.carry is None else run.carry
    if run is not None:
        run.carry = carry
    metric_names = METRICS + tuple(f"reward_{r.name}{s}" for r in rewards for s in ("", "_std"))
    unit = {"grpo": "completions", "dr_grpo": "completions", "bnpo": "micro-batches", "dapo": "completion tokens"}
    return replace(OBJECTIVE, loss=partial(grpo_loss, opts=opts), metrics=metric_names, carry=carry,
                   unit=unit[opts.loss_type], check_step=partial(no_signal_warning, seen=carry.streak),
                   rollout=partial(rollout, opts=opts, rewards=rewards, reference=reference, run=run),
                   score=partial(held_out_reward, opts=opts, rewards=rewards, run=run),
                   bind_run=partial(bind_run, opts=opts, rewards=rewards, reference=reference))


def bind_run(cfg, tokenizer, run_dir, data, *, opts, rewards, reference) -> Objective:
    """The configured objective with the run's tokenizer, training rows (numbered) and output.dir (run_dir None:
    no buffer on disk)."""
    number_examples(data.train)
    run = Run(tokenizer, data.train, tokenizer.pad_token_id, Path(run_dir) if run_dir is not None else None)
    return bind(opts, rewards, reference, run)


OBJECTIVE = Objective(
    name="grpo",
    formats=("prompt",),
    unit="completion tokens",
    encode=encode,
    keeps=keeps,
    collate=collate,
    units=units,
    filler=filler,
    loss=partial(grpo_loss, opts=None),
    metrics=METRICS,
    packs=False,
    configure=configure,
)
