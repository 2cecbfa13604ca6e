"""GRPO's rollout (objectives/grpo.py): sample, score, group and batch, once per optimizer step.

    rollout             the objective's `rollout`: the window's micro-batches of prompt indices -> batches of
                        prompt + completion ids, labels on the completion, advantages, old and reference
                        log-probabilities (or the buffer of an earlier step, objective.num_iterations > 1)
    draw                G completions per prompt (rl/sampling.py), scored by the rewards (rl/rewards.py)
    redraw_flat_groups  objective.dynamic_sampling: flat groups drawn again with new seeds
    make_batch          one micro-batch's tensors; flat groups left out of the forward when beta = 0 (SKIP_FLAT)
    add_rollout_stats   the window's reward and length statistics, spread over its micro-batches
    completion_logps    log pi of each completion token (the old and reference ones here, the loss's in grpo.py)

The seeds, the advantages and the flat groups are explained in grpo.py's docstring and docs/rl.md. PPO
(objectives/ppo.py) samples through `draw` too.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from tunesmith.errors import UserError
from tunesmith.objectives.lm import IGNORE, head_chunks, labelled_states
from tunesmith.rl import losses
from tunesmith.train import distributed

DYNAMIC_TRIES = 3  # objective.dynamic_sampling: draws of a flat group after the first
SEED_STRIDE = 1_000_003
SKIP_FLAT = True  # flat groups stay out of the forward (beta 0); tests switch it off to compare the gradients


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


# --- the completions' log-probabilities: the rollout's old and reference ones, and grpo_loss's ---------------------


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
