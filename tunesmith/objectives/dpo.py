"""DPO and its pairwise relatives: losses of the policy's log-ratio margin against a frozen reference.

Per pair (x, y_w, y_l), with answer log-probabilities log pi(y | x) summed over the answer tokens,

    h = [log pi(y_w|x) - log ref(y_w|x)] - [log pi(y_l|x) - log ref(y_l|x)]     (the log-ratio margin)
    reward(y) = beta * [log pi(y|x) - log ref(y|x)]                               (implicit reward, logged)

and objective.loss chooses the loss of h:

    sigmoid  -log sigmoid(beta h)                                DPO, arXiv 2305.18290, Eq. 7
    cdpo     -(1 - e) log sigmoid(beta h) - e log sigmoid(-beta h)
                                                                 conservative DPO: labels flipped with
                                                                 probability e (Mitchell 2023, "A note on
                                                                 DPO with noisy preferences", Eq. 3; no arXiv id)
    robust   [-(1 - e) log sigmoid(beta h) + e log sigmoid(-beta h)] / (1 - 2e)
                                                                 Robust DPO, arXiv 2403.00409 (rDPO, Sec. 3;
                                                                 equation number not checked): the unbiased
                                                                 estimate of the clean-label loss, e in [0, 1/2)
    hinge    max(0, 1 - beta h)                                  SLiC's calibration hinge (arXiv 2305.10425;
                                                                 margin 1/beta, scaled by beta) taken on h, as
                                                                 RSO's "hinge-norm" (arXiv 2309.06657)
    ipo      (h - 1 / (2 beta))^2                                IPO, arXiv 2310.12036, Eq. 17 (beta is its tau)

At initialisation (policy = reference, h = 0): sigmoid, cdpo and robust give ln 2, hinge 1, ipo 1/(4 beta^2).

IPO and length. Eq. 17 is written for sequence log-probabilities. TRL (DPOTrainer, loss_type="ipo")
divides each answer's log-ratio by its number of answer tokens (clamped at 1) before taking h, citing
the IPO authors; OpenRLHF (DPOLoss, ipo=True) uses the summed log-ratios as they are. The two differ by a
factor of the squared answer length in h, so the same beta means very different things.
`ipo_length_normalise=True` (default) is TRL's choice and needs `chosen_len` and `rejected_len`;
False is OpenRLHF's and the paper's literal reading.

cDPO in TRL. TRL's "sigmoid" loss took `label_smoothing` as cDPO's e until its 0.29 refactor; since then
label_smoothing only feeds "robust" and EXO, and cDPO is gone. OpenRLHF's DPOLoss still applies it to the
sigmoid loss. Here cDPO is its own loss type, and "sigmoid" refuses a label_smoothing.
"""

from __future__ import annotations

from dataclasses import replace
from functools import partial

import torch
import torch.nn.functional as F

from tunesmith.errors import UserError
from tunesmith.methods.registry import switch_adapters_off
from tunesmith.objectives.preference import (answer_logps, pair_objective, pair_output, precompute_reference,
                                             reference_logps, uses_precomputed_reference)
from tunesmith.objectives.registry import Objective

LOSS_TYPES = ("sigmoid", "cdpo", "robust", "hinge", "ipo")
DEFAULT_BETA = 0.1  # objective.beta unset


def check_dpo_options(loss_type: str, beta: float, label_smoothing: float = 0.0) -> None:
    """Raise ValueError for options no loss type accepts (cheap: the plumbing may call it once at configure)."""
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"DPO loss {loss_type!r} is not known; known: {', '.join(LOSS_TYPES)}.")
    if beta <= 0:
        raise ValueError(f"DPO beta must be > 0, got {beta}.")
    if loss_type == "cdpo" and not 0.0 <= label_smoothing <= 0.5:
        raise ValueError(f"cdpo's label_smoothing is a flip probability in [0, 0.5], got {label_smoothing}.")
    if loss_type == "robust" and not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"robust's label_smoothing must lie in [0, 0.5) (it divides by 1 - 2e), "
                         f"got {label_smoothing}.")
    if loss_type in ("sigmoid", "hinge", "ipo") and label_smoothing != 0.0:
        raise ValueError(f"DPO loss {loss_type!r} takes no label_smoothing (got {label_smoothing}); "
                         "use loss 'cdpo' or 'robust' for noisy labels.")


def log_ratio_margin(chosen_logratio: torch.Tensor, rejected_logratio: torch.Tensor,
                     chosen_len: torch.Tensor | None = None, rejected_len: torch.Tensor | None = None) -> torch.Tensor:
    """h (B,): chosen minus rejected log-ratio, each divided by its answer length (clamped at 1) if lengths are
    given."""
    if chosen_len is not None:
        chosen_logratio = chosen_logratio / chosen_len.clamp(min=1)
        rejected_logratio = rejected_logratio / rejected_len.clamp(min=1)
    return chosen_logratio - rejected_logratio


def sigmoid_loss(h: torch.Tensor, beta: float, e: float) -> torch.Tensor:
    return -F.logsigmoid(beta * h)


def cdpo_loss(h: torch.Tensor, beta: float, e: float) -> torch.Tensor:
    return -(1 - e) * F.logsigmoid(beta * h) - e * F.logsigmoid(-beta * h)


def robust_loss(h: torch.Tensor, beta: float, e: float) -> torch.Tensor:
    return (-(1 - e) * F.logsigmoid(beta * h) + e * F.logsigmoid(-beta * h)) / (1 - 2 * e)


def hinge_loss(h: torch.Tensor, beta: float, e: float) -> torch.Tensor:
    return torch.relu(1 - beta * h)


def ipo_loss(h: torch.Tensor, beta: float, e: float) -> torch.Tensor:
    return (h - 1 / (2 * beta)) ** 2


LOSSES = {"sigmoid": sigmoid_loss, "cdpo": cdpo_loss, "robust": robust_loss, "hinge": hinge_loss, "ipo": ipo_loss}


def dpo_losses(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor,
               ref_chosen: torch.Tensor, ref_rejected: torch.Tensor,
               beta: float, loss_type: str = "sigmoid", label_smoothing: float = 0.0,
               chosen_len: torch.Tensor | None = None, rejected_len: torch.Tensor | None = None,
               ipo_length_normalise: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(losses (B,), chosen_rewards (B,), rejected_rewards (B,)) of B pairs.

    policy_* and ref_* (B,): log pi(y | x) summed over each answer's tokens; the reference ones carry no
    gradient. chosen_len, rejected_len (B,): answer tokens, read only by ipo with ipo_length_normalise.
    The rewards beta * (log pi - log ref) are detached (metrics). Computed in the inputs' dtype."""
    check_dpo_options(loss_type, beta, label_smoothing)
    chosen_logratio = policy_chosen - ref_chosen  # (B,)
    rejected_logratio = policy_rejected - ref_rejected  # (B,)
    lengths = (None, None)
    if loss_type == "ipo" and ipo_length_normalise:
        if chosen_len is None or rejected_len is None:
            raise ValueError("ipo with ipo_length_normalise=True needs chosen_len and rejected_len "
                             "(answer tokens per sequence); pass ipo_length_normalise=False for summed log-ratios.")
        lengths = (chosen_len, rejected_len)
    h = log_ratio_margin(chosen_logratio, rejected_logratio, *lengths)
    losses = LOSSES[loss_type](h, beta, label_smoothing)
    return losses, beta * chosen_logratio.detach(), beta * rejected_logratio.detach()


# The objective: pairs of `preference` rows through one packed forward (preference.py); the reference is
# the same weights with the method switched off, or log-probabilities a batch carries (`ref_logps`).
def dpo_pair_loss(model, batch, beta: float = 0.1, loss_type: str = "sigmoid", label_smoothing: float = 0.0,
                  ipo_length_normalise: bool = True, reference=switch_adapters_off):
    """(sum of the pairs' DPO losses, pairs, metric sums) for one micro-batch."""
    logps, counts = answer_logps(model, batch)  # (2P,): chosen at even, rejected at odd indices
    ref = reference_logps(model, batch, reference)
    losses, chosen_rewards, rejected_rewards = dpo_losses(
        logps[0::2], logps[1::2], ref[0::2], ref[1::2], beta, loss_type, label_smoothing,
        chosen_len=counts[0::2], rejected_len=counts[1::2], ipo_length_normalise=ipo_length_normalise)
    return pair_output(losses, chosen_rewards, rejected_rewards, batch["pair_weight"],
                       chosen_logp_drift=logps[0::2] - ref[0::2])  # 0 at the start: the policy is the reference


def configure(cfg, method=None) -> Objective:
    """objective.beta, .loss, .label_smoothing and the reference bound into the loss: the method switched off,
    or (objective.reference=precomputed, or a method without a switch) the log-probabilities the batches carry."""
    reference = None if uses_precomputed_reference(cfg, method) else (method.disable if method else switch_adapters_off)
    loss = partial(dpo_pair_loss, beta=cfg.beta or DEFAULT_BETA, loss_type=cfg.loss,
                   label_smoothing=cfg.label_smoothing, ipo_length_normalise=cfg.ipo_length_normalise,
                   reference=reference)
    return replace(OBJECTIVE, loss=loss, check_step=partial(likelihood_displacement, margin=cfg.drift_warning))


def likelihood_displacement(metrics: dict, margin: float) -> str | None:
    """A warning when the chosen answers' log-probability has fallen more than `margin` nats below the
    reference's: DPO can widen the margin by pushing both answers down (likelihood displacement,
    arXiv 2410.08847), which degrades what the chosen answers teach."""
    drift = metrics.get("chosen_logp_drift", 0.0)
    if drift < -margin:
        return (f"the chosen answers' log-probability is {-drift:.2f} nats below the reference's on average "
                f"(objective.drift_warning={margin}): DPO is lowering the preferred answers too (likelihood "
                "displacement); consider a lower train.lr, a larger objective.beta, or SFT on the chosen answers first")
    return None


OBJECTIVE = replace(pair_objective("dpo", dpo_pair_loss, ("chosen_logp_drift",), configure=configure),
                    prepare=precompute_reference)
