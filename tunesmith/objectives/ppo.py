"""PPO: the policy learns from its own samples, scored by a reward model, kept near the reference by a KL penalty.

A rollout (no gradient), over the N prompts of a step's window, G = objective.num_generations samples each:

    y ~ pi_old(. | x)                   the sampler (tunesmith/rl/sampling.py), seeded from (train.seed, step)
    s = RM(x, y)                        the reward model's score (tunesmith/rl/reward_model.py; `tunesmith score`'s
                                        number), plus any objective.rewards functions (weighted sum)
    r_t = -kl_coef (log pi_old(y_t) - log ref(y_t))  +  [t = last] s
                                        the per-token reward: a KL penalty on every token (ref = the method
                                        switched off, as DPO's reference), the score on the completion's last
                                        token (TRL 0.x PPOTrainer.compute_rewards, kl_penalty "kl")
    V_t = value head on h_t             the critic (tunesmith/rl/value_head.py) at the state before y_t
    A, R = GAE(r, V; gamma, lambda)     A_t = delta_t + gamma lambda A_{t+1}, delta_t = r_t + gamma V_{t+1} - V_t,
                                        R = A + V (tunesmith/rl/losses.py gae)
    A <- whiten(A)                      over every completion token of the rollout (losses.py whiten)

then objective.ppo_epochs passes over the rollout, each in objective.num_minibatches minibatches of a fresh
seeded order; one minibatch is one optimizer step (its train.grad_accum micro-batches accumulated):

    L = L_pg + vf_coef L_v              per completion token, averaged over the minibatch's tokens
    L_pg = -min(rho A, clip(rho, 1 - epsilon_low, 1 + epsilon_high) A),   rho = pi / pi_old
    L_v  = 1/2 max((V - R)^2, (clip(V, V_old - cliprange_value, V_old + cliprange_value) - R)^2)

With epsilon_low = epsilon_high these are TRL 0.x's PPOTrainer.loss (pg_loss + vf_coef * vf_loss).

Steps: a rollout serves K = ppo_epochs * num_minibatches optimizer steps. Step s belongs to rollout s // K and
samples the prompts of step (s // K) * K's window; the windows of the other K - 1 steps are not read (the data
order moves on with the step, as for every objective). The rollout buffer (the samples, old log-probabilities,
values, advantages, returns) is written to output.dir/rollout/ (tunesmith/rl/buffer.py, GRPO's) before its first
step, so a run resumed in the middle of a rollout's steps reads it back and ends bit-exact with an uninterrupted
one.

Logged per step: policy_loss, value_loss, clipfrac (policy, low + high), value_clipfrac, entropy, approx_kl
(1/2 mean (log pi - log pi_old)^2), explained_variance (1 - mean (V - R)^2 / var R, TRL's val/var_explained),
and of the rollout: score (mean s), kl (mean over completions of sum_t log pi_old - log ref), completion_length.
"""

from __future__ import annotations

from dataclasses import replace
from functools import partial
from pathlib import Path

import torch

from tunesmith.errors import UserError
from tunesmith.objectives.lm import trunk_states
from tunesmith.objectives.registry import LossOutput, Objective
from tunesmith.rl import losses
from tunesmith.rl.value_head import ATTR as VALUE_HEAD, add_value_head, save_value_head, token_values

ROLLOUT_CHUNK = 16  # samples per no-gradient forward of a rollout
METRICS = ("policy_loss", "value_loss", "clipfrac", "value_clipfrac", "entropy", "approx_kl", "explained_variance",
           "score", "kl", "completion_length")


# --- the math ---------------------------------------------------------------------------------------------


def per_token_rewards(scores: torch.Tensor, logps: torch.Tensor, ref_logps: torch.Tensor, mask: torch.Tensor,
                      kl_coef: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(r (B, T), kl (B, T)): r_t = -kl_coef (logp_t - ref_t) on every completion token, plus the score (B,) on each
    completion's last token (the last 1 of `mask`); 0 off the mask."""
    kl = (logps - ref_logps) * mask
    rewards = -kl_coef * kl
    last = (mask * torch.arange(mask.shape[1], device=mask.device)).argmax(dim=1)  # (B,) index of the last token
    rewards[torch.arange(len(scores), device=mask.device), last] += scores.to(rewards.dtype)
    return rewards * mask, kl


def masked_var(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The masked variance with Bessel's correction (TRL's masked_var, unbiased=True)."""
    mean = losses.masked_mean(values, mask)
    count = mask.sum()
    return losses.masked_mean((values - mean) ** 2, mask) * count / (count - 1).clamp(min=1)


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """1 - mean (V - R)^2 / var R over the masked tokens (TRL 0.x's ppo/val/var_explained); 0 when R is constant."""
    var = masked_var(returns, mask)
    error = losses.masked_mean((values - returns) ** 2, mask)
    return torch.where(var > 0, 1 - error / var.clamp(min=1e-12), torch.zeros_like(var))


def advantages_and_returns(rewards, values, mask, gamma: float, lam: float, whiten_rewards: bool = False):
    """(whitened advantages (B, T), returns (B, T)): TRL 0.x's compute_advantages (whitening the rewards first,
    keeping their mean, when whiten_rewards)."""
    if whiten_rewards:
        rewards = losses.whiten(rewards, mask, shift_mean=False)
    advantages, returns = losses.gae(rewards, values, mask, gamma, lam)
    return losses.whiten(advantages, mask), returns


# --- forward: log-probabilities, values and entropy of the completion tokens -----------------------------


def completion_outputs(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logps (B, T), values (B, T), entropy (B, T)) of each completion token y_t, read at the position before it.

    batch: input_ids (B, L) = prompt + completion, right-padded; attention_mask (B, L); prompt_len (B,);
    completion_ids (B, T) padded; T = the longest completion."""
    hidden = trunk_states(model, {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]})
    t = batch["completion_ids"].shape[1]
    where = (batch["prompt_len"][:, None] - 1 + torch.arange(t, device=hidden.device)).clamp(max=hidden.shape[1] - 1)
    states = hidden.gather(1, where[..., None].expand(-1, -1, hidden.shape[-1]))  # (B, T, H)
    logits = model.get_output_embeddings()(states).float()  # (B, T, V)
    logprobs = torch.log_softmax(logits, dim=-1)
    logps = logprobs.gather(-1, batch["completion_ids"][..., None]).squeeze(-1)
    entropy = -(logprobs.exp() * logprobs).sum(-1)
    return logps, token_values(model, states), entropy


def token_losses(logps, old_logps, advantages, values, old_values, returns, epsilon_low: float = 0.2,
                 epsilon_high: float = 0.2, cliprange_value: float = 0.2) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(L_pg (B, T), L_v (B, T), {clipped (B, T) bool: the policy clip is active, value_clipped (B, T) bool}),
    unmasked: the per-token terms of the module docstring (losses.clipped_policy_loss for L_pg)."""
    pg, parts = losses.clipped_policy_loss(logps, old_logps, advantages, epsilon_low, epsilon_high)
    clipped_values = torch.clamp(values, old_values - cliprange_value, old_values + cliprange_value)
    plain, clipped = (values - returns) ** 2, (clipped_values - returns) ** 2
    return pg, 0.5 * torch.max(plain, clipped), {"clipped": parts["low_clipped"] | parts["high_clipped"],
                                                 "value_clipped": clipped > plain}


# --- the objective: the rollout and its buffer, the loss (the data side is GRPO's: grpo.py) ---------------------


class Rollouts:
    """objective.rollout: a step's window of prompts -> its minibatch of scored samples (module docstring).

    `run` (grpo_rollout.Run: tokenizer, numbered training examples, pad id, output.dir, stop ids) is bound by bind_run."""

    def __init__(self, opts, rewards: list, reference, run=None):
        self.opts, self.rewards, self.reference, self.run = opts, rewards, reference, run
        self.steps = opts.ppo_epochs * opts.num_minibatches  # K: optimizer steps per rollout
        self.buffer: dict[str, torch.Tensor] | None = None
        self.first = -1  # the step whose window the buffer sampled

    def __call__(self, model, window: list[dict], step: int, generator) -> list[dict]:
        from tunesmith.rl.buffer import load_buffer, save_buffer

        if self.run is None:
            raise UserError("objective.name=ppo needs its run context (tokenizer, rows): train through the train "
                            "command, or bind it with bind_run.")
        from tunesmith.objectives.grpo_rollout import check_whole

        check_whole(model)
        first = step - step % self.steps
        if step == first:
            self.buffer = self.collect(model, window, generator, step)
            if self.run.run_dir is not None and self.steps > 1:
                save_buffer(self.run.run_dir, first, [self.buffer], self.steps)
        elif self.first != first:  # resumed in the middle of a rollout's steps
            found = load_buffer(self.run.run_dir, first, "cpu") if self.run.run_dir is not None else None
            if found is None:
                raise UserError(f"step {step + 1}: PPO's rollout buffer of step {first + 1} is missing from "
                                f"{self.run.run_dir}/rollout; resume from a checkpoint at a multiple of "
                                "objective.ppo_epochs * objective.num_minibatches, or start again.")
            self.buffer = found[0]
        self.first = first
        device = next(model.parameters()).device
        return [{k: v.to(device) for k, v in mb.items()} for mb in self.minibatch(step - first, len(window))]

    @torch.no_grad()
    def collect(self, model, window: list[dict], generator, step: int | None = None) -> dict[str, torch.Tensor]:
        """Sample, score, and compute old log-probabilities, values, reference log-probabilities, per-token rewards,
        advantages and returns of every sample of the window's prompts (on the CPU, padded to the longest).

        Under torchrun each process samples, scores and runs the forwards of its own prompts; the samples of all
        processes are then gathered in one process's order (rl/shards.py), and the per-token rewards, GAE and the
        whitening over the whole rollout run on every process alike: the buffer is the global rollout, and each
        process trains on its share of every micro-batch (minibatch)."""
        from tunesmith.objectives.grpo_rollout import draw, prompt_seed
        from tunesmith.rl.shards import gather_in_order

        o, run, g = self.opts, self.run, self.opts.num_generations
        per_batch = [[i for i in mb["index"].tolist() if i >= 0] for mb in window]
        indices = [i for chunk in per_batch for i in chunk]
        base = int(torch.randint(0, 2**62, (1,), generator=generator))
        order_seed = int(torch.randint(0, 2**62, (1,), generator=generator))
        seeds = [prompt_seed(base, i) for i in indices]
        completions, _, total = draw(model, indices, seeds, o, self.rewards, run, step=step)
        samples = [c.token_ids for group in completions for c in group]
        prompts = [run.examples[i]["input_ids"] for i in indices for _ in range(g)]
        own = {"prompt": prompts, "completion": samples, "score": total.tolist(), "logps": [], "values": [],
               "ref_logps": []}
        if samples:
            batch = pad_samples(prompts, samples, run.pad_id)
            logps, values = forward_in_chunks(model, batch, ROLLOUT_CHUNK)
            with self.reference(model):
                ref_logps, _ = forward_in_chunks(model, batch, ROLLOUT_CHUNK)
            for name, x in (("logps", logps), ("values", values), ("ref_logps", ref_logps)):
                own[name] = [x[i, : len(c)].tolist() for i, c in enumerate(samples)]
        whole, _ = gather_in_order([len(chunk) * g for chunk in per_batch], own)
        batch = pad_samples(whole["prompt"], whole["completion"], run.pad_id)
        mask = batch["mask"]
        logps, values, ref_logps = (padded(whole[name], mask.shape) for name in ("logps", "values", "ref_logps"))
        scores = torch.tensor(whole["score"], dtype=torch.float64).float()
        rewards, kl = per_token_rewards(scores, logps, ref_logps, mask, o.kl_coef)
        gamma = 1.0 if o.gamma is None else o.gamma
        advantages, returns = advantages_and_returns(rewards, values * mask, mask, gamma, o.lam, o.whiten_rewards)
        return {**batch, "old_logps": logps * mask, "old_values": values * mask, "advantages": advantages,
                "returns": returns, "score_mean": scores.mean(), "kl_mean": kl.sum(1).mean(),
                "length_mean": mask.sum(1).mean(), "order_seed": torch.tensor(order_seed)}

    def minibatch(self, phase: int, micro: int) -> list[dict[str, torch.Tensor]]:
        """Minibatch phase % M of epoch phase // M (a seeded order of the rollout per epoch), in `micro` micro-batches,
        each cut to its own longest sequence."""
        from tunesmith.train import distributed

        b, m, world = self.buffer["input_ids"].shape[0], self.opts.num_minibatches, distributed.world()
        if b < m * micro * world:
            raise UserError(f"PPO: a rollout of {b} samples cannot fill objective.num_minibatches={m} minibatches of "
                            f"train.grad_accum={micro} micro-batches on {world} process(es); raise train.batch_size "
                            "or num_generations.")
        epoch, index = divmod(phase, m)
        order_seed = int(self.buffer["order_seed"])
        order = torch.randperm(b, generator=torch.Generator().manual_seed((order_seed + epoch) % 2**63))
        out = []
        for rows in torch.tensor_split(torch.tensor_split(order, m)[index], micro):
            rows = distributed.share(rows)  # under torchrun: this process's share of the global micro-batch
            width, t = int(self.buffer["seq_len"][rows].max()), int(self.buffer["mask"][rows].sum(1).max())
            mb = {k: v[rows] for k, v in self.buffer.items() if v.dim() > 0}
            mb["input_ids"], mb["attention_mask"] = mb["input_ids"][:, :width], mb["attention_mask"][:, :width]
            for k in ("completion_ids", "mask", "old_logps", "old_values", "advantages", "returns"):
                mb[k] = mb[k][:, :max(1, t)]
            out.append({**mb, **{k: self.buffer[k] for k in ("score_mean", "kl_mean", "length_mean")}})
        return out


def load_reward_functions(opts) -> list:
    """rewards.Reward entries: the reward model (objective.reward_model, weight objective.reward_model_weight) and
    objective.rewards (reward_model.py objective_rewards, GRPO's too)."""
    from tunesmith.rl.reward_model import objective_rewards

    return objective_rewards(opts, "ppo")


def pad_samples(prompts: list[list[int]], completions: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """input_ids (B, L) = prompt + completion right-padded, attention_mask, prompt_len (B,), seq_len (B,),
    completion_ids (B, T) padded with pad_id, mask (B, T) float, 1 on the completion's tokens."""
    b = len(prompts)
    width = max(len(p) + len(c) for p, c in zip(prompts, completions))
    t = max(1, max(len(c) for c in completions))
    input_ids = torch.full((b, width), pad_id, dtype=torch.long)
    attention = torch.zeros((b, width), dtype=torch.long)
    completion_ids = torch.full((b, t), pad_id, dtype=torch.long)
    mask = torch.zeros((b, t), dtype=torch.float32)
    for i, (p, c) in enumerate(zip(prompts, completions)):
        input_ids[i, : len(p) + len(c)] = torch.tensor(list(p) + list(c), dtype=torch.long)
        attention[i, : len(p) + len(c)] = 1
        completion_ids[i, : len(c)] = torch.tensor(c, dtype=torch.long)
        mask[i, : len(c)] = 1
    return {"input_ids": input_ids, "attention_mask": attention, "completion_ids": completion_ids, "mask": mask,
            "prompt_len": torch.tensor([len(p) for p in prompts]), "seq_len": attention.sum(1)}


def forward_in_chunks(model, batch: dict, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(logps (B, T), values (B, T)) on the CPU, `size` samples a forward, in eval mode (no dropout: the sampling
    policy's own numbers)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    logps, values = [], []
    try:
        for start in range(0, batch["input_ids"].shape[0], size):
            chunk = {k: v[start : start + size].to(device) for k, v in batch.items()}
            lp, v, _ = completion_outputs(model, chunk)
            logps.append(lp.cpu())
            values.append(v.cpu())
    finally:
        model.train(was_training)
    return torch.cat(logps), torch.cat(values)


def padded(rows: list[list[float]], shape) -> torch.Tensor:
    """Per-sample lists of per-token numbers as one (B, T) float32 tensor, 0 past each sample's end."""
    out = torch.zeros(shape, dtype=torch.float32)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.tensor(row, dtype=torch.float32)
    return out


def completion_tokens(batch: dict) -> int:
    """The loss unit: completion tokens (a micro-batch of prompts, before the rollout, counts 0)."""
    return int(batch["mask"].sum()) if "mask" in batch else 0


def ppo_loss(model, batch: dict, vf_coef: float = 0.1, epsilon_low: float = 0.2, epsilon_high: float = 0.2,
             cliprange_value: float = 0.2) -> LossOutput:
    """(sum over the micro-batch's completion tokens of L_pg + vf_coef L_v, tokens, metric sums)."""
    logps, values, entropy = completion_outputs(model, batch)
    mask = batch["mask"]
    pg, vf, parts = token_losses(logps, batch["old_logps"], batch["advantages"], values, batch["old_values"],
                                 batch["returns"], epsilon_low, epsilon_high, cliprange_value)
    n = mask.sum()

    def total(x):
        return float((x.detach().float() * mask).sum())

    metrics = {"policy_loss": total(pg), "value_loss": total(vf), "clipfrac": total(parts["clipped"]),
               "value_clipfrac": total(parts["value_clipped"]), "entropy": total(entropy),
               "approx_kl": total(0.5 * (logps - batch["old_logps"]) ** 2),
               "explained_variance": float(explained_variance(values.detach(), batch["returns"], mask) * n),
               "score": float(batch["score_mean"] * n), "kl": float(batch["kl_mean"] * n),
               "completion_length": float(batch["length_mean"] * n)}
    return ((pg + vf_coef * vf) * mask).sum(), int(n), metrics


def configure(cfg, method=None) -> Objective:
    """objective.* bound into the loss; the rewards (loaded now: a typo fails before the model loads); the reference:
    the method switched off (the same weights, no second copy)."""
    from tunesmith.methods.registry import switch_adapters_off

    if method is not None and method.disable is None:
        raise UserError(f"objective.name=ppo needs a method that can be switched off for its reference model; "
                        f"method.name={method.name} cannot (use lora or another adapter).")
    return bind(cfg, load_reward_functions(cfg), method.disable if method is not None else switch_adapters_off, None)


def bind(opts, rewards, reference, run) -> Objective:
    """The objective with its options, rewards and reference bound in; its carry (rl/carry.py: the reward call
    counter, stateful rewards) is the run's, saved in checkpoints."""
    from tunesmith.objectives.grpo import held_out_reward
    from tunesmith.rl.carry import Carry

    carry = Carry(rewards) if run is None or run.carry is None else run.carry
    if run is not None:
        run.carry = carry
    loss = partial(ppo_loss, vf_coef=opts.vf_coef, epsilon_low=opts.epsilon_low, epsilon_high=opts.epsilon_high,
                   cliprange_value=opts.cliprange_value)
    return replace(OBJECTIVE, loss=loss, rollout=Rollouts(opts, rewards, reference, run), carry=carry,
                   score=partial(held_out_reward, opts=opts, rewards=rewards, run=run),
                   bind_run=partial(bind_run, opts=opts, rewards=rewards, reference=reference))


def bind_run(cfg, tokenizer, run_dir, data, *, opts, rewards, reference) -> Objective:
    """The configured objective with the run's tokenizer, training rows (numbered) and output.dir."""
    from tunesmith.objectives.grpo import Run, number_examples
    from tunesmith.rl.sampling import end_token_ids

    number_examples(data.train)
    run = Run(tokenizer, data.train, tokenizer.pad_token_id, Path(run_dir), end_token_ids(None, tokenizer))
    return bind(opts, rewards, reference, run)


def add_head(model, cfg) -> None:
    add_value_head(model, cfg.objective.value_init, cfg.objective.reward_model)


def export(model, method, cfg, run_dir, tokenizer) -> None:
    """value_head.safetensors beside the adapter (output.dir/adapter)."""
    if getattr(model, VALUE_HEAD, None) is not None:
        save_value_head(model, Path(run_dir) / "adapter")


def _objective() -> Objective:
    from tunesmith.objectives import grpo

    return Objective(name="ppo", formats=("prompt",), unit="completion tokens", encode=grpo.encode, keeps=grpo.keeps,
                     collate=grpo.collate, units=completion_tokens, filler=grpo.filler, loss=ppo_loss,
                     metrics=METRICS, packs=False, configure=configure, add_head=add_head, export=export)


OBJECTIVE = _objective()
