"""KTO: learn from single answers marked desirable or undesirable, no pairs needed.

KTO (Ethayarajh et al., arXiv 2402.01306; Eq. 7 in the numbering TRL cites) scores each answer by its
implicit reward against a reference point z0, the policy's KL divergence from the reference:

    r(x, y) = log pi(y|x) - log ref(y|x)                        (sums over answer tokens)
    loss    = w_D * (1 - sigmoid(beta * (r - z0)))              y desirable
              w_U * (1 - sigmoid(beta * (z0 - r)))              y undesirable
    reward  = beta * r                                          (logged)

The micro-batch's loss is the plain mean of these over its examples (TRL's nanmean, OpenRLHF's mean),
not a mean weighted by w. At initialisation (r = 0, z0 = 0) every loss is w / 2: 0.5 with the default
weights. Setting w_D * n_D / (w_U * n_U) in [1, 4/3] is the paper's advice for unbalanced data.

z0 is estimated per micro-batch, without gradient, from mismatched (prompt, answer) pairs of the
same micro-batch (batch_kl):

    z0 = max(0, (1/n) * sum_i [log pi(y_{p(i)} | x_i) - log ref(y_{p(i)} | x_i)]),   p = kl_partners(n)

p rotates the answers by one: x_1 gets y_n, x_i gets y_{i-1} (TRL: "(x_1, y_1), ..., (x_n, y_n) -->
(x_1, y_n), (x_2, y_1), ..., (x_n, y_{n-1})"), so the mismatched answers are exactly the batch's own
answers, each under another prompt. What the plumbing must do: for a micro-batch of n > 1 examples,
form the n extra sequences prompt_i + answer_{p(i)} (labels on the answer only), compute their summed
answer log-probabilities under the policy and the reference, both under torch.no_grad(), and pass
them to batch_kl. With n = 1 the only partner is the example itself and z0 becomes its own reward
(TRL refuses a per-device batch of 1). Across processes TRL and OpenRLHF average the per-process means
and clamp after averaging: pass that all-reduce as `mean_across`. Each micro-batch of a gradient
accumulation window has its own z0, as in TRL.

TRL (KTOTrainer, loss_type="kto") and OpenRLHF (KTOLoss) compute exactly this; TRL's
"apo_zero_unpaired" (no z0) is not offered here.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F


def kl_partners(n: int) -> torch.Tensor:
    """(n,) long: prompt i is paired for z0 with answer kl_partners(n)[i] = (i - 1) mod n."""
    if n < 2:
        raise ValueError(f"KTO's KL estimate needs at least 2 examples per micro-batch, got {n}.")
    return torch.roll(torch.arange(n), 1)


def batch_kl(policy_kl_logps: torch.Tensor, ref_kl_logps: torch.Tensor,
             mean_across: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """z0 (scalar, detached): mean of log pi - log ref over the n mismatched pairs (n,), averaged across
    processes by `mean_across` when given, then clamped at 0."""
    kl = (policy_kl_logps - ref_kl_logps).mean().detach()
    if mean_across is not None:
        kl = mean_across(kl)
    return kl.clamp(min=0)


def kto_losses(policy_logps: torch.Tensor, ref_logps: torch.Tensor, desirable: torch.Tensor, kl: torch.Tensor | float,
               beta: float, desirable_weight: float = 1.0,
               undesirable_weight: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(losses (B,), rewards (B,) detached) of B single answers.

    policy_logps, ref_logps (B,): log pi(y | x) summed over each answer's tokens. desirable (B,) bool.
    kl: z0 from batch_kl (no gradient flows through it)."""
    if beta <= 0:
        raise ValueError(f"KTO beta must be > 0, got {beta}.")
    logratio = policy_logps - ref_logps  # (B,)
    kl = torch.as_tensor(kl, dtype=logratio.dtype, device=logratio.device).detach()
    desirable_losses = desirable_weight * (1 - F.sigmoid(beta * (logratio - kl)))
    undesirable_losses = undesirable_weight * (1 - F.sigmoid(beta * (kl - logratio)))
    losses = torch.where(desirable.bool(), desirable_losses, undesirable_losses)
    return losses, beta * logratio.detach()


# OBJECTIVE: defined once the preference plumbing lands (tunesmith/objectives/preference.py)
