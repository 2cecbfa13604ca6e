"""The losses of online RL as pure tensor functions: GRPO's (and its variants') and PPO's.

Shapes: B sequences (completions), T completion positions; `mask` (B, T) is 1 on a completion's own tokens
and 0 on padding. Log-probabilities are per token, log pi(y_t | x, y_<t).

GRPO (DeepSeekMath, arXiv 2402.03300, Eq. 3), G completions per prompt, rewards r_1 .. r_G:

    A_i        = (r_i - mean_j r_j) / (std_j r_j + eps)       group-normalised advantage (eps 1e-4, std with
                                                              Bessel's correction, as TRL); Dr. GRPO
                                                              (arXiv 2503.20783, Sec. 3.2) drops the division:
                 A_i = r_i - mean_j r_j                      (scale="none"); scale="batch": the std of all B
    rho_t      = exp(log pi(y_t) - log pi_old(y_t))           importance ratio to the sampling policy
    L_t        = -min(rho_t A, clip(rho_t, 1 - eps_low, 1 + eps_high) A) + beta * KL_t
                                                              separate lower and upper clip: DAPO's clip-higher
                                                              (arXiv 2503.14476, Eq. 10)
    KL_t       = exp(q_t) - q_t - 1,  q_t = log ref(y_t) - log pi(y_t)
                                                              the k3 estimator (Schulman, "Approximating KL
                                                              divergence", 2020): unbiased, always >= 0

and the per-token losses L_t are aggregated by `loss_type` (what each one divides by):

    grpo     (1/B) sum_i (1/|y_i|) sum_t L_it       mean over each sequence, then over sequences (the paper)
    bnpo     sum_it L_it / sum_it mask_it           per token, over the local micro-batch
    dr_grpo  sum_it L_it / (B * max_completion_length)   a constant divisor: no length bias (Dr. GRPO)
    dapo     sum_it L_it / (tokens of the global batch)  per token over the whole accumulation window and
                                                    every process (DAPO, Eq. 12; TRL's default)

`aggregate` returns (sum, units) in the loop's convention (the loop divides a window's summed losses by its
summed units): grpo (sum of sequence means, B), bnpo (the micro-batch's token mean, 1: the window loss is the
mean over micro-batches, as TRL's division by the accumulation steps), dr_grpo (sum / max length, B),
dapo (sum, tokens). With one micro-batch each equals TRL's GRPOTrainer._compute_loss.

PPO (Schulman et al., arXiv 1707.06347; GAE arXiv 1506.02438, Eq. 16), per token t of a response:

    delta_t    = r_t + gamma V_{t+1} - V_t                   (V past the last token is 0)
    A_t        = sum_l (gamma lambda)^l delta_{t+l}  = delta_t + gamma lambda A_{t+1}
    R_t        = A_t + V_t                                    the value target
    whiten(A)  = (A - mean) / sqrt(var + 1e-8)                over masked tokens, var with Bessel's correction
    L_pg       = masked mean of max(-A rho, -A clip(rho, 1 - eps, 1 + eps))
    L_v        = 1/2 masked mean of max((V - R)^2, (clip(V, V_old - eps_v, V_old + eps_v) - R)^2)

as TRL's PPOTrainer computed them (until it was removed from TRL 1.x).
"""

from __future__ import annotations

import torch

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
SCALES = ("group", "batch", "none")
ADVANTAGE_EPS = 1e-4  # TRL's: std + 1e-4 in the denominator


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """sum(values * mask) / sum(mask), over `dim` or everything; 0 where the mask is empty."""
    if dim is None:
        return (values * mask).sum() / mask.sum().clamp(min=1)
    return (values * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def group_advantages(rewards: torch.Tensor, group: int, scale: str = "group",
                     eps: float = ADVANTAGE_EPS) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages (B,), flat (B,) bool: the group's rewards are all equal) for rewards (B,) of B / group
    prompts, each prompt's `group` completions next to each other. See the module docstring."""
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {SCALES}, got {scale!r}")
    grouped = rewards.view(-1, group)  # (N, G)
    mean = grouped.mean(dim=1).repeat_interleave(group)  # (B,)
    group_std = grouped.std(dim=1) if group > 1 else torch.zeros(grouped.shape[0], dtype=rewards.dtype)
    group_std = group_std.repeat_interleave(group)  # (B,)
    flat = (grouped == grouped[:, :1]).all(dim=1).repeat_interleave(group)  # exactly equal: no signal
    advantages = rewards - mean
    if scale == "group":
        advantages = advantages / (group_std + eps)
    elif scale == "batch":
        advantages = advantages / ((rewards.std() if rewards.numel() > 1 else rewards.new_zeros(())) + eps)
    return torch.where(flat, torch.zeros_like(advantages), advantages), flat


def k3_kl(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """Per-token KL(pi || ref) estimate exp(q) - q - 1, q = log ref - log pi (>= 0, 0 where they agree)."""
    q = ref_logps - logps
    return torch.exp(q) - q - 1


def clipped_policy_loss(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor,
                        epsilon_low: float, epsilon_high: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(per-token loss (B, T), {ratio, low_clipped, high_clipped} (B, T)) of the clipped surrogate
    -min(rho A, clip(rho, 1 - eps_low, 1 + eps_high) A); advantages (B,) or (B, T)."""
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(1)  # (B, 1): one advantage for every token of a sequence
    ratio = torch.exp(logps - old_logps)
    clipped = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high)
    loss = -torch.min(ratio * advantages, clipped * advantages)
    low = (ratio < 1 - epsilon_low) & (advantages < 0)  # the clip holds the ratio up: no further push down
    high = (ratio > 1 + epsilon_high) & (advantages > 0)
    return loss, {"ratio": ratio, "low_clipped": low, "high_clipped": high}


def grpo_token_loss(logps, old_logps, advantages, mask, epsilon_low: float = 0.2, epsilon_high: float = 0.2,
                    beta: float = 0.0, ref_logps=None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(L_t (B, T) masked to 0 on padding, parts) with parts as clipped_policy_loss's plus `kl` (B, T) when
    beta > 0 or ref_logps is given (then logged, added only with beta > 0)."""
    loss, parts = clipped_policy_loss(logps, old_logps, advantages, epsilon_low, epsilon_high)
    if ref_logps is not None:
        parts["kl"] = k3_kl(logps, ref_logps)
        if beta != 0.0:
            loss = loss + beta * parts["kl"]
    elif beta != 0.0:
        raise ValueError("beta > 0 needs the reference log-probabilities (ref_logps)")
    return loss * mask, parts


def aggregate(token_loss: torch.Tensor, mask: torch.Tensor, loss_type: str,
              max_completion_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum, units) of a micro-batch's masked per-token losses (B, T) under `loss_type` (module docstring):
    the loop's window loss is sum over micro-batches / units over micro-batches."""
    masked = token_loss * mask
    if loss_type == "grpo":
        return (masked.sum(-1) / mask.sum(-1).clamp(min=1)).sum(), mask.new_tensor(mask.shape[0])
    if loss_type == "bnpo":
        return masked.sum() / mask.sum().clamp(min=1), mask.new_tensor(1)
    if loss_type == "dr_grpo":
        return masked.sum() / max_completion_length, mask.new_tensor(mask.shape[0])
    if loss_type == "dapo":
        return masked.sum(), mask.sum()
    raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")


def grpo_loss(logps, old_logps, advantages, mask, loss_type: str = "dapo", max_completion_length: int = 0,
              epsilon_low: float = 0.2, epsilon_high: float = 0.2, beta: float = 0.0, ref_logps=None):
    """One micro-batch alone: the scalar loss sum / units (equal to TRL's with one accumulation step)."""
    token_loss, _ = grpo_token_loss(logps, old_logps, advantages, mask, epsilon_low, epsilon_high, beta, ref_logps)
    total, units = aggregate(token_loss, mask, loss_type, max_completion_length or mask.shape[1])
    return total / units.clamp(min=1)


# --- PPO -----------------------------------------------------------------------------------------------------


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages A (B, T), returns A + V (B, T)) by the GAE recursion, right to left; positions off the mask
    count as reward 0 and value 0 (a response's padding after its end)."""
    rewards, values = rewards * mask, values * mask
    advantages = torch.zeros_like(values)
    running = torch.zeros_like(values[:, 0])
    for t in reversed(range(values.shape[1])):
        next_value = values[:, t + 1] if t + 1 < values.shape[1] else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = delta + gamma * lam * running
        advantages[:, t] = running
    return advantages, advantages + values


def whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """(x - mean) / sqrt(var + 1e-8) over the masked entries (var unbiased), 0 off the mask; shift_mean=False
    keeps the mean (scales only)."""
    mean = masked_mean(values, mask)
    count = mask.sum()
    var = masked_mean((values - mean) ** 2, mask) * count / (count - 1).clamp(min=1)
    out = (values - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        out = out + mean
    return out * mask


def ppo_policy_loss(logps, old_logps, advantages, mask, clip: float = 0.2) -> tuple[torch.Tensor, torch.Tensor]:
    """(the masked mean of max(-A rho, -A clip(rho, 1 +- clip)), the share of tokens where the clip is active)."""
    ratio = torch.exp(logps - old_logps)
    unclipped, clipped = -advantages * ratio, -advantages * torch.clamp(ratio, 1 - clip, 1 + clip)
    return masked_mean(torch.max(unclipped, clipped), mask), masked_mean((clipped > unclipped).to(logps.dtype), mask)


def ppo_value_loss(values, old_values, returns, mask, clip: float = 0.2) -> tuple[torch.Tensor, torch.Tensor]:
    """(1/2 the masked mean of max((V - R)^2, (clip(V, V_old +- clip) - R)^2), the share clipped)."""
    clipped_values = torch.clamp(values, old_values - clip, old_values + clip)
    plain, clipped = (values - returns) ** 2, (clipped_values - returns) ** 2
    return 0.5 * masked_mean(torch.max(plain, clipped), mask), masked_mean((clipped > plain).to(values.dtype), mask)
