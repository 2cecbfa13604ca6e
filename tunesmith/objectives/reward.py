"""Reward model: the Bradley-Terry pairwise loss on scalar rewards, with an optional margin and centring.

A reward model scores (prompt, answer) with a scalar r. Under Bradley-Terry, P(y_w > y_l | x) =
sigmoid(r_w - r_l), and the reward model maximises its likelihood (InstructGPT, arXiv 2203.02155, Eq. 1):

    loss = -log sigmoid(r_w - r_l - m) + c * (r_w + r_l)^2

    m   per-pair margin, how much better y_w is (Llama 2, arXiv 2307.09288, Eq. 2); 0 without one
    c   reward-centring coefficient: pulls the rewards towards mean zero, since the pairwise term sees
        only differences (Eisenstein et al., arXiv 2312.09244, Eq. 2; TRL recommends c = 0.01)

At initialisation (r_w = r_l = 0) the loss is ln 2.

TRL (RewardTrainer) adds c * mean over the batch of (r_w + r_l)^2 to the mean pairwise loss, which is
the batch mean of the per-pair losses above; OpenRLHF (PairWiseLoss) has the margin, no centring.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def bradley_terry_losses(r_chosen: torch.Tensor, r_rejected: torch.Tensor, margin: torch.Tensor | None = None,
                         center_coef: float = 0.0) -> torch.Tensor:
    """losses (B,) of B pairs from the rewards r_chosen, r_rejected (B,) and an optional margin (B,)."""
    diff = r_chosen - r_rejected  # (B,)
    if margin is not None:
        diff = diff - margin
    losses = -F.logsigmoid(diff)
    if center_coef:
        losses = losses + center_coef * (r_chosen + r_rejected) ** 2
    return losses


# OBJECTIVE: defined once the preference plumbing lands (tunesmith/objectives/preference.py)
