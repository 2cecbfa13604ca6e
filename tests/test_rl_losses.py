"""The RL losses (tunesmith/rl/losses.py) against TRL on float64 inputs, to 1e-10.

GRPO's loss: TRL's own GRPOTrainer._compute_loss, run on a stand-in trainer whose forward returns the given
per-token log-probabilities. Advantages: TRL's formula from _generate_and_score_completions (a method too large
to call alone) with TRL's own nanstd. PPO: TRL 1.x no longer ships PPOTrainer, so GAE, whitening and the clipped
losses are checked against its former code (trl 0.x ppo_trainer.py / utils.py, reproduced below) and GAE against
the closed form of the paper's Eq. 16.
"""

from __future__ import annotations

import types
from collections import defaultdict

import pytest
import torch

from tunesmith.rl import losses

trl_grpo = pytest.importorskip("trl.trainer.grpo_trainer")
from trl.trainer.utils import nanstd  # noqa: E402

TOL = dict(atol=1e-10, rtol=1e-10)


def batch(seed: int = 0, b: int = 6, t: int = 7, padding: str = "right"):
    """Per-token logps (B, T) of a 'current', 'old' and 'reference' policy near each other, advantages (B,),
    and a completion mask with completions of different lengths, padded on `padding`."""
    g = torch.Generator().manual_seed(seed)
    logps = -torch.rand(b, t, generator=g, dtype=torch.float64) * 3
    old = logps + 0.4 * torch.randn(b, t, generator=g, dtype=torch.float64)  # ratios well past the clip
    ref = logps + 0.3 * torch.randn(b, t, generator=g, dtype=torch.float64)
    adv = torch.randn(b, generator=g, dtype=torch.float64)
    lengths = torch.tensor([t, t - 2, 1, t - 1, 3, t][:b])
    positions = torch.arange(t)
    mask = positions < lengths[:, None] if padding == "right" else positions >= t - lengths[:, None]
    return logps, old, ref, adv, mask.to(torch.float64)


def trl_loss(logps, old, ref, adv, mask, loss_type, beta, eps_low, eps_high, max_len):
    """TRL's GRPOTrainer._compute_loss with one accumulation step, on one process."""
    accelerator = types.SimpleNamespace(num_processes=1, gather=lambda x: x, gather_for_metrics=lambda x: x,
                                        reduce=lambda x, reduction="sum": x)
    args = types.SimpleNamespace(use_bias_correction_kl=False, delta=None, steps_per_generation=1)
    trainer = types.SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *a, **k: (logps, torch.zeros_like(logps), None),
        top_entropy_quantile=1.0, off_policy_mask_threshold=None, importance_sampling_level="token",
        beta=beta, args=args, loss_type=loss_type, epsilon_low=eps_low, epsilon_high=eps_high, use_vllm=False,
        model=types.SimpleNamespace(training=True), current_gradient_accumulation_steps=1,
        max_completion_length=max_len, accelerator=accelerator, _entropy_bonus_enabled=False,
        aux_loss_enabled=False, _metrics={"train": defaultdict(list)})
    b, t = logps.shape
    inputs = {"prompt_ids": torch.zeros(b, 1, dtype=torch.long), "prompt_mask": torch.ones(b, 1),
              "completion_ids": torch.zeros(b, t, dtype=torch.long), "completion_mask": mask,
              "advantages": adv, "old_per_token_logps": old,
              "num_items_in_batch": mask.sum()}
    if beta:
        inputs["ref_per_token_logps"] = ref
    return trl_grpo.GRPOTrainer._compute_loss(trainer, None, inputs), trainer._metrics["train"]


@pytest.mark.parametrize("loss_type", losses.LOSS_TYPES)
@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_grpo_loss_equals_trls_compute_loss(loss_type, beta):
    logps, old, ref, adv, mask = batch()
    expected, metrics = trl_loss(logps, old, ref, adv, mask, loss_type, beta, 0.2, 0.28, 9)
    got = losses.grpo_loss(logps, old, adv, mask, loss_type, 9, 0.2, 0.28, beta, ref if beta else None)
    torch.testing.assert_close(got, expected, **TOL)
    _, parts = losses.grpo_token_loss(logps, old, adv, mask, 0.2, 0.28, beta, ref)
    low = float(losses.masked_mean(parts["low_clipped"].double(), mask))
    high = float(losses.masked_mean(parts["high_clipped"].double(), mask))
    assert low == pytest.approx(metrics["clip_ratio/low_mean"][0], abs=1e-12) and 0 < low < 1
    assert high == pytest.approx(metrics["clip_ratio/high_mean"][0], abs=1e-12) and 0 < high < 1
    if beta:
        kl = float(losses.masked_mean(parts["kl"], mask))
        assert kl == pytest.approx(metrics["kl"][0], abs=1e-12) and kl > 0


def test_gradients_equal_trls_too():
    logps, old, ref, adv, mask = batch(seed=3)
    for loss_type in losses.LOSS_TYPES:
        mine, theirs = logps.clone().requires_grad_(), logps.clone().requires_grad_()
        losses.grpo_loss(mine, old, adv, mask, loss_type, 9, 0.2, 0.28, 0.04, ref).backward()
        trl_loss(theirs, old, ref, adv, mask, loss_type, 0.04, 0.2, 0.28, 9)[0].backward()
        torch.testing.assert_close(mine.grad, theirs.grad, **TOL)


def test_aggregations_over_micro_batches_follow_the_loop_convention():
    """Split one batch in two micro-batches: sum of sums / sum of units is the whole batch's loss for grpo,
    dr_grpo and dapo; bnpo is the mean of the micro-batches' token means (TRL divides by the accumulation
    steps)."""
    logps, old, ref, adv, mask = batch(seed=5)
    token_loss, _ = losses.grpo_token_loss(logps, old, adv, mask, 0.2, 0.2)
    for loss_type in losses.LOSS_TYPES:
        parts = [losses.aggregate(token_loss[s], mask[s], loss_type, 9) for s in (slice(0, 3), slice(3, 6))]
        window = sum(p[0] for p in parts) / sum(p[1] for p in parts)
        if loss_type == "bnpo":
            expected = sum(trl_loss(logps[s], old[s], ref[s], adv[s], mask[s], "bnpo", 0.0, 0.2, 0.2, 9)[0]
                           for s in (slice(0, 3), slice(3, 6))) / 2
        else:
            expected = trl_loss(logps, old, ref, adv, mask, loss_type, 0.0, 0.2, 0.2, 9)[0]
        torch.testing.assert_close(window, expected, **TOL)


def trl_advantages(rewards, g, scale):
    """TRL's (sum_then_normalize) advantages, transcribed from GRPOTrainer._generate_and_score_completions.

    TRL's nanstd multiplies by its Bessel correction count / (count - 1) computed from integer counts, which
    torch divides in float32 (4/3 to 7 digits): on float64 rewards it is off by ~1e-8 relative. So the std
    here is torch's float64 Bessel-corrected one, and nanstd is checked against it to float32 precision."""
    grouped = rewards.view(-1, g)
    mean = torch.nanmean(grouped, dim=1).repeat_interleave(g, dim=0)
    if scale in ("group", "none"):
        std = grouped.std(dim=1).repeat_interleave(g, dim=0)
        torch.testing.assert_close(std, nanstd(grouped, dim=1).repeat_interleave(g, dim=0), atol=1e-7, rtol=1e-7)
    else:
        std = rewards.std().expand_as(rewards)
        torch.testing.assert_close(std, nanstd(rewards).expand_as(rewards), atol=1e-7, rtol=1e-7)
    advantages = rewards - mean
    if scale != "none":
        advantages = advantages / (std + 1e-4)
    return advantages, torch.isclose(std, torch.zeros_like(std))


@pytest.mark.parametrize("scale", losses.SCALES)
def test_group_advantages_equal_trls(scale):
    g = torch.Generator().manual_seed(1)
    rewards = torch.rand(12, generator=g, dtype=torch.float64)
    rewards[4:8] = 0.7  # one flat group
    got, flat = losses.group_advantages(rewards, 4, scale)
    expected, zero_std = trl_advantages(rewards, 4, scale)
    torch.testing.assert_close(got, expected, **TOL)
    assert flat.tolist() == [False] * 4 + [True] * 4 + [False] * 4  # per group, whatever the scale
    if scale != "batch":  # TRL's zero-std flag follows the std it divides by: the batch's under "batch"
        assert zero_std.tolist() == flat.tolist()
    assert (got[4:8] == 0).all()  # exactly: a flat group contributes nothing


def test_k3_is_the_kl_estimator():
    """k3 = exp(q) - q - 1 >= 0, 0 where the policies agree, and its mean under pi estimates KL(pi || ref)."""
    g = torch.Generator().manual_seed(0)
    p = torch.softmax(torch.randn(5, generator=g, dtype=torch.float64), 0)
    r = torch.softmax(torch.randn(5, generator=g, dtype=torch.float64), 0)
    exact = (p * (p.log() - r.log())).sum()
    torch.testing.assert_close((p * losses.k3_kl(p.log(), r.log())).sum(), exact, **TOL)
    assert losses.k3_kl(p.log(), p.log()).abs().max() == 0


@pytest.mark.parametrize("padding", ["left", "right"])
def test_ratio_is_exactly_one_when_old_is_current(padding):
    logps, _, _, adv, mask = batch(seed=2, padding=padding)
    token_loss, parts = losses.grpo_token_loss(logps, logps.clone(), adv, mask, 0.2, 0.28)
    assert (parts["ratio"] == 1).all() and not parts["low_clipped"].any() and not parts["high_clipped"].any()
    torch.testing.assert_close(token_loss, -adv[:, None] * mask, atol=0, rtol=0)


# --- PPO: TRL 0.x's code (trl/trainer/utils.py and ppo_trainer.py, before TRL 1.0 removed PPOTrainer) ---------


def trl0_masked_mean(values, mask):
    return (values * mask).sum() / mask.sum()


def trl0_masked_whiten(values, mask, shift_mean=True):
    mean = trl0_masked_mean(values, mask)
    var = trl0_masked_mean((values - mean) ** 2, mask) * (mask.sum() / (mask.sum() - 1))
    whitened = (values - mean) * torch.rsqrt(var + 1e-8)
    return whitened if shift_mean else whitened + mean


def trl0_gae(rewards, values, gamma, lam):
    lastgaelam, reversed_ = 0, []
    length = rewards.shape[1]
    for t in reversed(range(length)):
        nextvalues = values[:, t + 1] if t < length - 1 else 0.0
        delta = rewards[:, t] + gamma * nextvalues - values[:, t]
        lastgaelam = delta + gamma * lam * lastgaelam
        reversed_.append(lastgaelam)
    advantages = torch.stack(reversed_[::-1], axis=1)
    return advantages, advantages + values


def test_gae_equals_trl0_and_the_closed_form():
    _, _, _, _, mask = batch(seed=4)
    g = torch.Generator().manual_seed(4)
    rewards = torch.randn(mask.shape, generator=g, dtype=torch.float64) * mask
    values = torch.randn(mask.shape, generator=g, dtype=torch.float64) * mask
    adv, returns = losses.gae(rewards, values, mask, gamma=0.9, lam=0.8)
    trl_adv, trl_returns = trl0_gae(rewards, values, 0.9, 0.8)  # TRL zeroes padded rewards and values first too
    torch.testing.assert_close(adv, trl_adv, **TOL)
    torch.testing.assert_close(returns, trl_returns, **TOL)
    nxt = torch.cat([values[:, 1:], torch.zeros_like(values[:, :1])], dim=1)
    delta = rewards + 0.9 * nxt - values
    t = mask.shape[1]
    closed = torch.stack([sum((0.9 * 0.8) ** l * delta[:, s + l] for l in range(t - s)) for s in range(t)], 1)
    torch.testing.assert_close(adv, closed, **TOL)


def test_whitening_and_ppo_losses_equal_trl0():
    logps, old, _, _, mask = batch(seed=6)
    g = torch.Generator().manual_seed(6)
    adv = torch.randn(mask.shape, generator=g, dtype=torch.float64)
    white = losses.whiten(adv, mask)
    torch.testing.assert_close(white, trl0_masked_whiten(adv, mask) * mask, **TOL)
    torch.testing.assert_close(losses.whiten(adv, mask, shift_mean=False),
                               trl0_masked_whiten(adv, mask, shift_mean=False) * mask, **TOL)
    ratio = torch.exp(logps - old)
    pg = torch.max(-white * ratio, -white * torch.clamp(ratio, 0.8, 1.2))
    loss, clipfrac = losses.ppo_policy_loss(logps, old, white, mask, 0.2)
    torch.testing.assert_close(loss, trl0_masked_mean(pg, mask), **TOL)
    assert 0 < float(clipfrac) < 1
    values, old_values, returns = (torch.randn(mask.shape, generator=g, dtype=torch.float64) for _ in range(3))
    vclipped = torch.clamp(values, old_values - 0.2, old_values + 0.2)
    expected = 0.5 * trl0_masked_mean(torch.max((values - returns) ** 2, (vclipped - returns) ** 2), mask)
    vloss, vclipfrac = losses.ppo_value_loss(values, old_values, returns, mask, 0.2)
    torch.testing.assert_close(vloss, expected, **TOL)
    assert 0 < float(vclipfrac) < 1
