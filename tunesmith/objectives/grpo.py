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
DYNAMIC_TRIES times; DAPO's dynamic sampling redraws until the batch is full instead). When at least
FLAT_SHARE of the groups are flat for FLAT_STEPS steps in a row, a warning says the reward gives no signal.

The reference (beta > 0, or the KL logged every objective.kl_every steps) is the model with the method
switched off, run without gradient once per rollout; beta = 0 and kl_every = 0 skip it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path

import torch

from tunesmith.errors import UserError
from tunesmith.objectives.lm import IGNORE, head_chunks, labelled_states
from tunesmith.objectives.registry import LossOutput, Objective
from tunesmith.rl import losses
from tunesmith.train import distributed

DYNAMIC_TRIES = 3  # objective.dynamic_sampling: draws of a flat group after the first
FLAT_SHARE, FLAT_STEPS = 0.9, 5  # the no-signal warning: this share of flat groups, this many steps in a row
SEED_STRIDE = 1_000_003
SKIP_FLAT = True  # flat groups stay out of the forward (beta 0); tests switch it off to compare the gradients

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


# --- the run's context -----------------------------------------------------------------------------------------


@dataclass
class Run:
    """What a rollout needs besides the model: bound by bind_run (the train command) or by a test."""

    tokenizer: object
    examples: list[dict]
    pad_id: int
    run_dir: Path | None = None
    stop_ids: tuple[int, ...] = ()
    buffers: dict[int, list[dict]] = field(default_factory=dict)  # rollout step -> micro-batches, in memory
    carry: object = None  # rl/carry.Carry: reward call counters, the no-signal streak (set by bind)


def sampling_config(opts, stop_ids: tuple[int, ...]):
    from tunesmith.rl.sampling import SamplingConfig

    return SamplingConfig(max_new_tokens=opts.max_new_tokens, temperature=opts.temperature, top_p=opts.top_p,
                          top_k=opts.top_k, stop_ids=tuple(stop_ids))


def fold_adapters(model, opts) -> bool:
    """objective.fold_adapters, its default (null) resolved: on where the model is on the CPU. There decode steps
    of a few rows are latency-bound and folding saves two of three matmuls per adapted layer; on a GPU the copy
    of every adapted weight it costs is memory the rollout may need (docs/rl.md)."""
    if opts.fold_adapters is not None:
        return opts.fold_adapters
    return next(model.parameters()).device.type == "cpu"


def prompt_seed(base: int, index: int, attempt: int = 0) -> int:
    """seeds[i] of the sampler: a function of (train.seed, step) through `base`, the row index and the draw."""
    return ((base * SEED_STRIDE + index) * SEED_STRIDE + attempt) % 2**63


# --- the rollout -------------------------------------------------------------------------------------------------


def rollout(model, window: list[dict], step: int, generator: torch.Generator, opts, rewards, reference,
            run: Run | None) -> list[dict]:
    """The window's micro-batches of completions (see the module docstring); steps between two rollouts
    (num_iterations > 1) reuse the last one, from memory or, after a resume, from output.dir."""
    if run is None:
        raise UserError("objective.name=grpo needs its run context (tokenizer, rows): train through the train "
                        "command, or bind it with bind_run.")
    check_whole(model)
    first = step - step % opts.num_iterations
    if not run.stop_ids:
        from tunesmith.rl.sampling import end_token_ids

        run.stop_ids = end_token_ids(model, run.tokenizer)
    if step != first:
        batches = run.buffers.get(first)
        if batches is None and run.run_dir is not None:
            from tunesmith.rl.buffer import load_buffer

            batches = load_buffer(run.run_dir, first, next(model.parameters()).device)
        if batches is None:
            raise UserError(f"step {step + 1}: the rollout buffer of step {first + 1} is missing from "
                            f"{run.run_dir}/rollout; resume from a checkpoint at a multiple of "
                            "objective.num_iterations, or start again.")
    else:
        batches = build_rollout(model, window, step, generator, opts, rewards, reference, run)
        run.buffers.clear()
        run.buffers[first] = batches
        if opts.num_iterations > 1 and run.run_dir is not None:
            from tunesmith.rl.buffer import save_buffer

            save_buffer(run.run_dir, first, batches, opts.num_iterations)
    return [dict(b) for b in batches]  # the loop may add keys to a batch; the buffer stays as it is


def check_whole(model) -> None:
    """Sampling runs the model outside the loss: under FSDP2 (method full on several processes) its weights are
    shards, which only the loss's forward gathers."""
    if distributed.world() > 1 and distributed.is_sharded(model):
        raise UserError("objective.name=grpo and ppo sample with the whole model, but method.name=full on several "
                        "processes shards it (FSDP2): use an adapter method (lora, ...) under torchrun, or one process.")


@dataclass
class Groups:
    """A rollout's N prompts x G completions: token ids, whether each finished, rewards (K, N*G) and (N*G,)."""

    indices: list[int]
    prompt_ids: list[list[int]]
    completions: list[list]  # N lists of G sampling.Completion
    per_reward: torch.Tensor
    total: torch.Tensor


def draw(model, indices: list[int], seeds: list[int], opts, rewards, run: Run, greedy: bool = False,
         step: int | None = None):
    """(completions N x G, per_reward (K, N*G), total (N*G,)) for the prompts of these training examples.
    With `step` (a training rollout) the call is counted in run.carry; the rewards get its trainer_state."""
    from tunesmith.methods.weight_delta import folded_for_sampling
    from tunesmith.rl.rewards import score
    from tunesmith.rl.sampling import sample
    from tunesmith.train import progress

    info = None if run.carry is None else run.carry.called(step) if step is not None else run.carry.latest()
    cfg = sampling_config(opts, run.stop_ids)
    g = 1 if greedy else opts.num_generations
    if greedy:
        cfg = replace(cfg, temperature=0.0)
    if not indices:  # under torchrun a process may have no prompt in a round (dynamic sampling, a short window)
        return [], torch.zeros((len(rewards), 0), dtype=torch.float64), torch.zeros(0, dtype=torch.float64)
    prompts = [run.examples[i]["input_ids"] for i in indices]
    with progress.phase("generate"), folded_for_sampling(model, fold_adapters(model, opts)):
        completions = sample(model, prompts, g, cfg, seeds, run.pad_id, progress=progress.tokens)
    with progress.phase("score"):
        rows = [json.loads(run.examples[i]["row"]) for i in indices]
        texts = [[run.tokenizer.decode(c.token_ids, skip_special_tokens=True) for c in group] for group in completions]
        prompts, completions_in, columns = reward_inputs(rows, texts)
        if info is not None:
            columns["trainer_state"] = info  # TRL passes its TrainerState under this name too
        per_reward, total = score(rewards, prompts, completions_in, columns)
    return completions, per_reward, total


def reward_inputs(rows: list[dict], texts: list[list[str]]) -> tuple[list, list, dict[str, list]]:
    """(prompts, completions, columns) for the reward call, one entry per completion: each row's prompt as it is,
    the completion as a string, or as [{role: assistant, content}] where the prompt is a conversation (TRL's
    conversational form), every other column repeated for the row's completions."""
    prompts, completions, columns = [], [], {}
    names = [k for k in rows[0] if k != "prompt"] if rows else []
    for row, group in zip(rows, texts):
        chat = isinstance(row["prompt"], list)
        for text in group:
            prompts.append(row["prompt"])
            completions.append([{"role": "assistant", "content": text}] if chat else text)
            for name in names:
                columns.setdefault(name, []).append(row.get(name))
    return prompts, completions, columns


def build_rollout(model, window, step, generator, opts, rewards, reference, run: Run) -> list[dict]:
    """Sample, score and batch the window's prompts (module docstring)."""
    g = opts.num_generations
    per_batch = [[i for i in b["index"].tolist() if i >= 0] for b in window]
    indices = [i for chunk in per_batch for i in chunk]
    base = int(torch.randint(0, 2**62, (1,), generator=generator))
    seeds = [prompt_seed(base, i) for i in indices]
    completions, per_reward, total = draw(model, indices, seeds, opts, rewards, run, step=step)
    groups = Groups(indices, [run.examples[i]["input_ids"] for i in indices], completions, per_reward, total)
    if opts.dynamic_sampling:
        redraw_flat_groups(model, groups, base, opts, rewards, run, step)
    # Under torchrun the advantages (the batch std) and the logged statistics are those of the whole rollout
    # (all processes, in one process's order: rl/shards.py); each process keeps its own completions' share.
    whole, mine = gather_rollout(groups, per_batch, g)
    advantages, flat_all = losses.group_advantages(torch.tensor(whole["total"], dtype=torch.float64), g,
                                                   opts.scale_rewards)
    advantages, flat = advantages[mine], flat_all[mine]
    skip = flat if SKIP_FLAT and not opts.beta else torch.zeros_like(flat)  # beta > 0: the KL has a gradient
    device = next(model.parameters()).device
    batches, start = [], 0
    for chunk in per_batch:
        rows = range(start * g, (start + len(chunk)) * g)
        batches.append(make_batch(groups, rows, advantages, skip, opts, run.pad_id, device))
        start += len(chunk)
    add_rollout_stats(batches, whole, flat_all, rewards, opts)
    if opts.num_iterations > 1:  # the sampling policy's log-probabilities: the same forward as the loss's
        for batch in batches:
            if "input_ids" in batch:
                with torch.no_grad():
                    batch["old_logps"] = completion_logps(model, batch)[0]
    if needs_reference_forward(opts, step):
        if reference is None:
            raise UserError("objective.beta > 0 or objective.kl_every needs the reference model, the method "
                            "switched off, but this method has no switch (full, freeze): set beta 0 and kl_every 0.")
        for batch in batches:
            if "input_ids" in batch:
                with torch.no_grad(), reference(model):
                    batch["ref_logps"] = completion_logps(model, batch)[0]
    return batches


def needs_reference_forward(opts, step: int) -> bool:
    """beta > 0, or a step of this rollout's iterations logs the KL (kl_every: steps N, 2N, ... counted from 1)."""
    if opts.beta:
        return True
    every = opts.kl_every
    return bool(every) and any((s + 1) % every == 0 for s in range(step, step + opts.num_iterations))


def redraw_flat_groups(model, groups: Groups, base: int, opts, rewards, run: Run, step: int | None = None) -> None:
    """DAPO's dynamic sampling, bounded: draw each flat group again with a new seed, up to DYNAMIC_TRIES times,
    and keep a new draw that is not flat. Under torchrun every process takes part in a round while any process
    has a flat group, so the reward call counter (run.carry) is the same on all of them and as one process's."""
    g = opts.num_generations
    for attempt in range(1, DYNAMIC_TRIES + 1):
        grouped = groups.total.view(-1, g)
        flat = [n for n in range(grouped.shape[0]) if bool((grouped[n] == grouped[n, 0]).all())]
        flat_anywhere = int(distributed.sum_over_ranks(len(flat))[0])
        if not flat_anywhere:
            return
        if run.carry is not None:
            run.carry.redraws += flat_anywhere
        indices = [groups.indices[n] for n in flat]
        seeds = [prompt_seed(base, i, attempt) for i in indices]
        completions, per_reward, total = draw(model, indices, seeds, opts, rewards, run, step=step)
        for k, n in enumerate(flat):
            new = total[k * g : (k + 1) * g]
            if not bool((new == new[0]).all()):
                groups.completions[n] = completions[k]
                groups.total[n * g : (n + 1) * g] = new
                groups.per_reward[:, n * g : (n + 1) * g] = per_reward[:, k * g : (k + 1) * g]


def make_batch(groups: Groups, rows: range, advantages, skip, opts, pad_id: int, device) -> dict[str, torch.Tensor]:
    """One micro-batch: prompt + completion, right-padded, labels on the completion; `completion_mask` (B, Tc)
    over completion positions; skipped (flat, beta 0) sequences only counted, in `skipped_sequences`/`_tokens`."""
    g = opts.num_generations
    seqs, skipped_seqs, skipped_tokens = [], 0, 0
    for r in rows:
        prompt = groups.prompt_ids[r // g]
        completion = groups.completions[r // g][r % g].token_ids
        if bool(skip[r]):
            skipped_seqs, skipped_tokens = skipped_seqs + 1, skipped_tokens + len(completion)
        else:
            seqs.append((prompt, completion, float(advantages[r])))
    batch: dict[str, torch.Tensor] = {"skipped_sequences": torch.tensor(skipped_seqs),
                                      "skipped_tokens": torch.tensor(skipped_tokens)}
    if seqs:
        width = max(len(p) + len(c) for p, c, _ in seqs)
        longest = max(len(c) for _, c, _ in seqs)
        input_ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)  # (B, L)
        attention_mask = torch.zeros((len(seqs), width), dtype=torch.long)
        labels = torch.full((len(seqs), width), IGNORE, dtype=torch.long)
        completion_mask = torch.zeros((len(seqs), longest))  # (B, Tc)
        for i, (p, c, _) in enumerate(seqs):
            input_ids[i, : len(p) + len(c)] = torch.tensor(p + c)
            attention_mask[i, : len(p) + len(c)] = 1
            labels[i, len(p) : len(p) + len(c)] = torch.tensor(c)
            completion_mask[i, : len(c)] = 1
        batch.update(input_ids=input_ids, attention_mask=attention_mask, labels=labels,
                     completion_mask=completion_mask, advantages=torch.tensor([a for _, _, a in seqs]))
    else:
        batch["real_tokens"] = torch.tensor(0)
        batch["filler_ids"] = torch.tensor([[pad_id]])  # under torchrun: a forward with no loss (grpo_loss)
    forwarded_tokens = int(batch["completion_mask"].sum()) if seqs else 0
    units = batch_units(opts.loss_type, len(seqs) + skipped_seqs, forwarded_tokens + skipped_tokens)
    if opts.loss_type == "bnpo" and distributed.rank() > 0:
        units = 0  # bnpo: a global micro-batch counts once, on rank 0; its divisor (micro_tokens) is global
    batch["units"] = torch.tensor(units)
    return {k: v.to(device) for k, v in batch.items()}


def batch_units(loss_type: str, sequences: int, tokens: int) -> int:
    """What a micro-batch's loss sum is divided by over the window (losses.aggregate), flat sequences included."""
    return {"grpo": sequences, "dr_grpo": sequences, "bnpo": 1, "dapo": tokens}[loss_type]


def gather_rollout(groups: Groups, per_batch: list[list[int]], g: int) -> tuple[dict[str, list], list[int]]:
    """({total, per_reward, length, finished}: one entry per completion of the whole rollout, all processes, in
    one process's order; the positions of this process's completions in it) (rl/shards.py)."""
    from tunesmith.rl.shards import gather_in_order

    completions = [c for group in groups.completions for c in group]
    values = {"total": groups.total.tolist(), "per_reward": groups.per_reward.T.tolist(),
              "length": [len(c.token_ids) for c in completions], "finished": [c.finished for c in completions]}
    return gather_in_order([len(chunk) * g for chunk in per_batch], values)


def add_rollout_stats(batches: list[dict], whole: dict[str, list], flat, rewards, opts) -> None:
    """Each number v of the whole rollout (all processes: `whole` and `flat` from gather_rollout) goes into every
    micro-batch as v * its units (`stat/<name>`), so the loop's sum over micro-batches (and processes) / the
    window's units logs v; `token_scale` = window units / forwarded completion tokens turns a micro-batch's token
    sums into the window's token means the same way. `micro_tokens`: the completion tokens of each global
    micro-batch, bnpo's divisor."""
    g = opts.num_generations
    total = torch.tensor(whole["total"], dtype=torch.float64)
    per_reward = torch.tensor(whole["per_reward"], dtype=torch.float64).reshape(-1, len(rewards)).T  # (K, B)
    lengths = torch.tensor(whole["length"], dtype=torch.float64)
    finished = torch.tensor(whole["finished"], dtype=torch.float64)
    values = {"reward": total.mean(), "reward_std": _std(total),
              "frac_reward_zero_std": flat.double().view(-1, g)[:, 0].mean(),
              "completion_length": lengths.mean(), "truncated": 1 - finished.mean()}
    for k, reward in enumerate(rewards):
        values[f"reward_{reward.name}"] = per_reward[k].mean()
        values[f"reward_{reward.name}_std"] = _std(per_reward[k])
    forwarded = [float(b["completion_mask"].sum()) if "completion_mask" in b else 0.0 for b in batches]
    *micro_tokens, window_units, tokens = distributed.sum_over_ranks(
        *[n + float(b["skipped_tokens"]) for n, b in zip(forwarded, batches)],
        sum(int(b["units"]) for b in batches), sum(forwarded))
    for b, n in zip(batches, micro_tokens):
        b["micro_tokens"] = torch.tensor(n, device=b["units"].device)
    for b in batches:
        share = int(b["units"])
        for name, v in values.items():
            b[f"stat/{name}"] = torch.tensor(float(v) * share, device=b["units"].device)
        b["token_scale"] = torch.tensor(window_units / tokens if tokens else 0.0, device=b["units"].device)


def _std(x: torch.Tensor) -> torch.Tensor:
    return x.std() if x.numel() > 1 else x.new_zeros(())


# --- the loss ------------------------------------------------------------------------------------------------------


def completion_logps(model, batch: dict[str, torch.Tensor], entropy: bool = False):
    """(log pi(y_t | x, y_<t) (B, Tc) float32 at the completion positions, 0 elsewhere; the entropy of each of
    those positions' distributions (B, Tc), detached, or None). The head runs on labelled positions only."""
    states, targets, _ = labelled_states(model, batch)
    logps, entropies = [], []
    for logits, chunk, _ in head_chunks(model, states, targets):
        lse = torch.logsumexp(logits, dim=-1)
        logps.append(logits.gather(1, chunk.unsqueeze(1)).squeeze(1) - lse)
        if entropy:
            with torch.no_grad():
                entropies.append(lse - (torch.softmax(logits, dim=-1) * logits).sum(-1))
    mask = batch["completion_mask"].bool()
    # labelled positions come row by row, each completion's in order: the order of mask's True entries
    out = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device).masked_scatter(mask, torch.cat(logps))
    ent = None
    if entropy:
        ent = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device).masked_scatter(mask, torch.cat(entropies))
    return out, ent


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
