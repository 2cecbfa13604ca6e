"""SimPO: a length-normalised, reference-free pairwise loss with a target reward margin.

SimPO (Meng, Xia & Chen, arXiv 2405.14734) takes the answer's mean log-probability as its reward,

    a(y)    = (1/|y|) sum_t log pi(y_t | x, y_<t)                   (mean answer log-probability)
    r(y)    = beta * a(y)                                           Eq. 4 (logged as the reward)
    z       = beta * a(y_w) - beta * a(y_l) - gamma
    loss    = -log sigmoid(z)                                       Eq. 6
            = -(1 - e) log sigmoid(z) - e log sigmoid(-z)           with label smoothing e (default 0)
              + nll_weight * NLL(y_w)                               optional, off by default

gamma is the target reward margin, on the scale of the rewards in Eq. 6. At initialisation nothing is
special (no reference): with a(y_w) = a(y_l) the loss is -log sigmoid(-gamma) = log(1 + e^gamma).

The margin's two scales. Eq. 6 writes gamma itself; the authors' reference code (princeton-nlp/SimPO,
SimPOTrainer) is configured by gamma_beta_ratio = gamma / beta and computes beta * (a_w - a_l -
gamma_beta_ratio). TRL's CPOTrainer (loss_type="simpo") takes `simpo_gamma`, which is Eq. 6's gamma:
it computes beta * ((a_w - a_l) - simpo_gamma / beta). So the same number in a reference-code config
and in TRL's simpo_gamma is a margin differing by the factor beta (TRL's defaults, beta 0.1 and
simpo_gamma 0.5, mean gamma / beta = 5). simpo_margin() accepts either and returns both, for the
plumbing to log the derived one.

The NLL term is CPO's behaviour-cloning regulariser (TRL: cpo_alpha, default 1.0 in CPOConfig, so
TRL's SimPO needs cpo_alpha=0 to be the paper's loss); SimPO itself has none, so nll_weight is 0 by
default. NLL(y_w) is passed in, per pair (B,) or one scalar per micro-batch.
"""

from __future__ import annotations

from dataclasses import replace
from functools import partial

import torch
import torch.nn.functional as F

from tunesmith.objectives.preference import answer_logps, pair_objective, pair_output
from tunesmith.objectives.registry import Objective


def simpo_margin(beta: float, gamma: float | None = None,
                 gamma_beta_ratio: float | None = None) -> tuple[float, float]:
    """(gamma, gamma / beta) from exactly one of gamma (Eq. 6; TRL's simpo_gamma) and gamma_beta_ratio (the
    reference code's)."""
    if beta <= 0:
        raise ValueError(f"SimPO beta must be > 0, got {beta}.")
    if (gamma is None) == (gamma_beta_ratio is None):
        raise ValueError("SimPO's margin is set by exactly one of gamma and gamma_beta_ratio (= gamma / beta).")
    if gamma is None:
        gamma = gamma_beta_ratio * beta
    return gamma, gamma / beta


def simpo_losses(chosen_mean_logps: torch.Tensor, rejected_mean_logps: torch.Tensor, beta: float, gamma: float,
                 label_smoothing: float = 0.0, nll: torch.Tensor | float | None = None,
                 nll_weight: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(losses (B,), chosen_rewards (B,), rejected_rewards (B,)) of B pairs; rewards beta * a, detached.

    chosen_mean_logps, rejected_mean_logps (B,): log pi(y | x) averaged over each answer's tokens.
    gamma: Eq. 6's margin (simpo_margin converts a gamma / beta). nll: NLL(y_w), (B,) or a scalar."""
    if not 0.0 <= label_smoothing <= 0.5:
        raise ValueError(f"SimPO label_smoothing must lie in [0, 0.5], got {label_smoothing}.")
    z = beta * (chosen_mean_logps - rejected_mean_logps) - gamma  # (B,)
    losses = -(1 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)
    if nll_weight:
        if nll is None:
            raise ValueError("SimPO with nll_weight > 0 needs the chosen answers' NLL.")
        losses = losses + nll_weight * nll
    return losses, beta * chosen_mean_logps.detach(), beta * rejected_mean_logps.detach()


# The objective: no reference model; the NLL term stays off (objective.* has no switch for it yet).
DEFAULT_BETA = 2.0  # the paper's range is 2.0-2.5
DEFAULT_GAMMA_BETA_RATIO = 0.5


def simpo_pair_loss(model, batch, beta: float = DEFAULT_BETA, gamma: float = DEFAULT_BETA * DEFAULT_GAMMA_BETA_RATIO,
                    label_smoothing: float = 0.0):
    logps, counts = answer_logps(model, batch)
    means = logps / counts.clamp(min=1)  # (2P,)
    losses, chosen_rewards, rejected_rewards = simpo_losses(means[0::2], means[1::2], beta, gamma, label_smoothing)
    return pair_output(losses, chosen_rewards, rejected_rewards, batch["pair_weight"])


def configure(cfg, method=None) -> Objective:
    """beta, and the margin from objective.gamma or objective.gamma_beta_ratio; the other one is logged."""
    import logging

    beta = cfg.beta or DEFAULT_BETA
    ratio = cfg.gamma_beta_ratio if cfg.gamma is None and cfg.gamma_beta_ratio is not None else None
    if cfg.gamma is None and ratio is None:
        ratio = DEFAULT_GAMMA_BETA_RATIO
    gamma, ratio = simpo_margin(beta, cfg.gamma, ratio)
    logging.getLogger(__name__).info("simpo: beta %g, gamma %g (gamma / beta %g)", beta, gamma, ratio)
    return replace(OBJECTIVE, loss=partial(simpo_pair_loss, beta=beta, gamma=gamma,
                                           label_smoothing=cfg.label_smoothing))


OBJECTIVE = pair_objective("simpo", simpo_pair_loss, configure=configure)
