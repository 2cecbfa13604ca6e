"""ORPO: supervised fine-tuning plus an odds-ratio penalty on the rejected answer, no reference model.

ORPO (Hong et al., arXiv 2403.07691) uses the length-normalised likelihood of an answer of m tokens,

    P(y|x)     = exp(a),   a = (1/m) sum_t log pi(y_t | x, y_<t)          (mean answer log-probability)
    odds(y|x)  = P / (1 - P)                                             Eq. 4
    log OR     = log odds(y_w|x) - log odds(y_l|x)                       Eq. 5
               = (a_w - a_l) - [log(1 - e^{a_w}) - log(1 - e^{a_l})]
    L_OR       = -log sigmoid(log OR)                                    Eq. 7
    loss       = L_SFT + lambda * L_OR                                   Eq. 6
    reward(y)  = lambda * a                                              (TRL's logged reward)

lambda is `beta` here, as in TRL's ORPOConfig. log(1 - e^a) for a < 0 is log1mexp, evaluated as TRL does
(Maechler's split at -ln 2: log1p(-exp(a)) below it, log(-expm1(a)) above it), so that neither a close to
0 (P near 1) nor a very negative loses precision. At a = 0 exactly (P = 1) the odds are infinite.
Half-precision inputs are upcast to float32 first (TRL casts to float32 too; float64 stays float64).

L_SFT is passed in as `chosen_nll`, per pair (B,) or one scalar for the micro-batch. TRL (ORPOTrainer)
takes the mean token cross-entropy over every non-padding token of the chosen sequences of the
micro-batch, prompt tokens included ("computed over the full prompt and response"), while the odds use
the answer tokens only; which tokens L_SFT covers is the plumbing's choice.
"""

from __future__ import annotations

import math

from dataclasses import replace
from functools import partial

import torch
import torch.nn.functional as F

from tunesmith.objectives.preference import answer_logps, pair_objective, pair_output
from tunesmith.objectives.registry import Objective

LN_HALF = -math.log(2)  # where log1mexp switches between its two forms


def log1mexp(a: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(a)) for a < 0, accurate on both sides of -ln 2."""
    return torch.where(a < LN_HALF, torch.log1p(-torch.exp(a)), torch.log(-torch.expm1(a)))


def log_odds_ratio(chosen_mean_logps: torch.Tensor, rejected_mean_logps: torch.Tensor) -> torch.Tensor:
    """log OR (B,) from the mean answer log-probabilities a_w, a_l (B,), all < 0."""
    return (chosen_mean_logps - rejected_mean_logps) - (log1mexp(chosen_mean_logps) - log1mexp(rejected_mean_logps))


def orpo_losses(chosen_mean_logps: torch.Tensor, rejected_mean_logps: torch.Tensor,
                chosen_nll: torch.Tensor | float, beta: float
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(losses (B,), chosen_rewards (B,), rejected_rewards (B,), log_odds (B,)) of B pairs.

    chosen_mean_logps, rejected_mean_logps (B,): log pi(y | x) averaged over each answer's tokens.
    chosen_nll: L_SFT, (B,) or a scalar. beta: lambda of the paper. Rewards and log_odds are detached."""
    if beta < 0:
        raise ValueError(f"ORPO beta (lambda) must be >= 0, got {beta}.")
    if chosen_mean_logps.dtype in (torch.float16, torch.bfloat16):
        chosen_mean_logps, rejected_mean_logps = chosen_mean_logps.float(), rejected_mean_logps.float()
    log_odds = log_odds_ratio(chosen_mean_logps, rejected_mean_logps)  # (B,)
    losses = chosen_nll - beta * F.logsigmoid(log_odds)
    return (losses, beta * chosen_mean_logps.detach(), beta * rejected_mean_logps.detach(), log_odds.detach())


# The objective: no reference model. L_SFT here is each pair's mean NLL of the chosen answer's tokens
# (TRL's covers the prompt tokens too); the pair's loss is that plus beta * L_OR.
DEFAULT_BETA = 0.1  # TRL's ORPOConfig default for lambda


def orpo_pair_loss(model, batch, beta: float = DEFAULT_BETA):
    logps, counts = answer_logps(model, batch)
    means = logps / counts.clamp(min=1)  # (2P,): a = mean answer log-probability
    chosen, rejected = means[0::2], means[1::2]
    losses, chosen_rewards, rejected_rewards, log_odds = orpo_losses(chosen, rejected, -chosen, beta)
    return pair_output(losses, chosen_rewards, rejected_rewards, batch["pair_weight"], log_odds_ratio=log_odds,
                       nll=-chosen)


def configure(cfg, method=None) -> Objective:
    return replace(OBJECTIVE, loss=partial(orpo_pair_loss, beta=cfg.beta or DEFAULT_BETA))


OBJECTIVE = pair_objective("orpo", orpo_pair_loss, ("log_odds_ratio", "nll"), configure=configure)
