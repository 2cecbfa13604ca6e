"""The preference losses (objectives/dpo.py, kto.py, orpo.py, simpo.py, reward.py) against TRL and the papers.

On identical float64 inputs every loss equals TRL's to 1e-10 relative and its gradient with respect to
the policy's log-probabilities (or the rewards) to 1e-8 relative, for every loss type TRL has. TRL's
losses are trainer methods: they are called unbound on a stand-in `self` (only the attributes they
read) and, where the method runs the model itself (DPO, KTO, reward), on a stand-in model whose
per-token log-probabilities sum to the given sequence log-probabilities. Where TRL has no such loss
(cDPO since its 0.29 refactor, IPO without length normalisation, SimPO configured by gamma / beta)
the paper's formula is written out here. Closed forms at initialisation (policy = reference): DPO,
cDPO, robust and the reward model ln 2, IPO 1/(4 beta^2), KTO 0.5. A perturbed input makes the
comparisons fail, so they can.
"""

from __future__ import annotations

import math
import os
import types
from collections import defaultdict

import pytest
import torch
import torch.nn.functional as F

from tunesmith.objectives.dpo import LOSS_TYPES, check_dpo_options, dpo_losses
from tunesmith.objectives.kto import batch_kl, kl_partners, kto_losses
from tunesmith.objectives.orpo import log1mexp, orpo_losses
from tunesmith.objectives.reward import bradley_terry_losses
from tunesmith.objectives.simpo import simpo_losses, simpo_margin

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # trl.experimental (ORPO, CPO) warns on import otherwise

LOSS_RTOL = 1e-10
GRAD_RTOL = 1e-8
B = 6
BETA = 0.1


def close(got, want, rtol):
    """Relative agreement element by element (atol 0), for a tensor or a sequence of tensors."""
    if isinstance(got, (tuple, list)):
        assert len(got) == len(want)
        for g, w in zip(got, want):
            close(g, w, rtol)
        return
    torch.testing.assert_close(got.detach().double(), want.detach().double(), rtol=rtol, atol=0)


def assert_parity(result):
    close(*result["loss"], LOSS_RTOL)
    close(*result["grad"], GRAD_RTOL)


def leaves(*tensors):
    return [t.detach().clone().requires_grad_(True) for t in tensors]


def grads(loss, inputs):
    return torch.autograd.grad(loss, inputs)


def seq_logps(seed: int, n: int = B, low: float = 5.0, high: float = 60.0) -> torch.Tensor:
    """(n,) float64 summed answer log-probabilities in [-high, -low]."""
    g = torch.Generator().manual_seed(seed)
    return -(low + (high - low) * torch.rand(n, generator=g, dtype=torch.float64))


def pair_inputs(seed: int = 0):
    """Policy and reference log-probabilities of B pairs, the reference within a few nats of the policy,
    and answer lengths."""
    g = torch.Generator().manual_seed(seed)
    pc, pr = seq_logps(seed), seq_logps(seed + 1)
    rc = pc + 3 * torch.randn(B, generator=g, dtype=torch.float64)
    rr = pr + 3 * torch.randn(B, generator=g, dtype=torch.float64)
    lc, lr = torch.randint(1, 40, (B,), generator=g), torch.randint(1, 40, (B,), generator=g)
    return pc, pr, rc, rr, lc, lr


def trl_attr(module: str, cls: str, attr: str):
    """TRL's `cls.attr`, unbound; the test skips, naming what is missing, when this TRL lacks it."""
    trl = pytest.importorskip("trl")
    mod = pytest.importorskip(module)
    owner = getattr(mod, cls, None)
    if owner is None or not hasattr(owner, attr):
        pytest.skip(f"TRL {trl.__version__} has no {module}.{cls}.{attr}, which these parity tests call")
    return getattr(owner, attr)


class Accelerator:
    device = torch.device("cpu")

    @staticmethod
    def gather_for_metrics(t):
        return t

    gather = gather_for_metrics


def stand_in(**attrs):
    """A trainer `self` with what TRL's loss code reads besides the loss options."""
    return types.SimpleNamespace(accelerator=Accelerator(), model=types.SimpleNamespace(training=True),
                                 aux_loss_enabled=False,
                                 _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
                                 _total_train_tokens=0, _tp_size=1, **attrs)


class TokenLogps:
    """Stands in for a causal LM called with fused_lm_head=True: row r of the per-token log-probabilities
    holds the sequence log-probability at its first position and zeros after it, so TRL's sum over
    positions gives back exactly the given value (and its gradient). Which values a call gets is chosen
    by the first input id (1: the main sequences, 2: KTO's mismatched KL sequences)."""

    def __init__(self, **by_marker):
        self.by_marker = {int(k[1:]): v for k, v in by_marker.items()}

    def __call__(self, input_ids, **_):
        logps = self.by_marker[int(input_ids[0, 0])]  # (N,)
        n, t = input_ids.shape
        per_token = torch.cat([logps[:, None], logps.new_zeros(n, t - 2)], dim=1)  # (N, T-1)
        zeros = logps.detach().new_zeros(n, t - 1)
        return types.SimpleNamespace(log_probs=per_token, entropy=zeros, mean_logits=zeros,
                                     is_top1=zeros.bool(), aux_loss=None)


def completion_batch(marker: int, lengths: torch.Tensor, width: int = 48) -> dict:
    """input_ids filled with `marker`, completion_mask over the last lengths[i] positions of each row."""
    n = lengths.numel()
    positions = torch.arange(width).expand(n, width)
    return {"input_ids": torch.full((n, width), marker), "attention_mask": torch.ones(n, width, dtype=torch.long),
            "completion_mask": (positions >= width - lengths[:, None]).long()}


# --- DPO ------------------------------------------------------------------------------------------


def trl_dpo(loss_type, label_smoothing, pc, pr, rc, rr, lc, lr):
    """TRL's DPO loss (DPOTrainer._compute_loss, precomputed reference log-probabilities): the batch mean."""
    compute = trl_attr("trl.trainer.dpo_trainer", "DPOTrainer", "_compute_loss")
    self = stand_in(loss_types=[loss_type], loss_weights=[1.0], beta=BETA, label_smoothing=label_smoothing,
                    f_divergence_type="reverse_kl", ld_alpha=None, precompute_ref_logps=True, use_weighting=False)
    inputs = completion_batch(1, torch.cat([lc, lr]))  # rows: chosen..., rejected...
    inputs.update(ref_chosen_logps=rc, ref_rejected_logps=rr)
    return compute(self, TokenLogps(m1=torch.cat([pc, pr])), inputs, return_outputs=False)


def run_dpo(loss_type, label_smoothing=0.0, seed=0, perturb=0.0):
    pc, pr, rc, rr, lc, lr = pair_inputs(seed)
    theirs_pc = pc.clone()
    theirs_pc[0] += perturb
    ours = dpo_losses(pc, pr, rc, rr, BETA, loss_type, label_smoothing, lc, lr)[0]
    theirs = torch.stack([trl_dpo(loss_type, label_smoothing, theirs_pc[i:i + 1], pr[i:i + 1], rc[i:i + 1],
                                  rr[i:i + 1], lc[i:i + 1], lr[i:i + 1]) for i in range(B)])
    a, b = leaves(pc, pr)
    our_grads = grads(dpo_losses(a, b, rc, rr, BETA, loss_type, label_smoothing, lc, lr)[0].mean(), [a, b])
    a, b = leaves(theirs_pc, pr)
    their_grads = grads(trl_dpo(loss_type, label_smoothing, a, b, rc, rr, lc, lr), [a, b])
    return {"loss": (ours, theirs), "grad": (our_grads, their_grads)}


@pytest.mark.parametrize("loss_type,label_smoothing", [("sigmoid", 0.0), ("hinge", 0.0), ("ipo", 0.0),
                                                       ("robust", 0.0), ("robust", 0.2)])
def test_dpo_losses_equal_trl(loss_type, label_smoothing):
    assert_parity(run_dpo(loss_type, label_smoothing))


def test_dpo_rewards_are_beta_times_the_log_ratios_detached():
    pc, pr, rc, rr, *_ = pair_inputs(1)
    a = pc.clone().requires_grad_(True)
    _, chosen, rejected = dpo_losses(a, pr, rc, rr, BETA)
    assert not chosen.requires_grad
    close(chosen, BETA * (pc - rc), LOSS_RTOL)
    close(rejected, BETA * (pr - rr), LOSS_RTOL)


def test_cdpo_equals_the_note_written_out():
    """cDPO (Mitchell 2023, Eq. 3): DPO on the pair with probability 1 - e, on the swapped pair with e."""
    e = 0.15
    pc, pr, rc, rr, lc, lr = pair_inputs(2)
    ours = dpo_losses(pc, pr, rc, rr, BETA, "cdpo", e)[0]
    h = (pc - rc) - (pr - rr)
    note = (1 - e) * -F.logsigmoid(BETA * h) + e * -F.logsigmoid(-BETA * h)
    swapped = (1 - e) * dpo_losses(pc, pr, rc, rr, BETA)[0] + e * dpo_losses(pr, pc, rr, rc, BETA)[0]
    close(ours, note, LOSS_RTOL)
    close(ours, swapped, LOSS_RTOL)


def test_cdpo_equals_trl_cpo_sigmoid_with_label_smoothing_on_log_ratios():
    """TRL dropped cDPO from DPOTrainer, but its CPO "sigmoid" loss with label_smoothing is the same function
    of the margin, so fed the log-ratios it is cDPO computed by TRL's own code."""
    e = 0.15
    pc, pr, rc, rr, *_ = pair_inputs(2)
    cpo_loss = trl_attr("trl.experimental.cpo.cpo_trainer", "CPOTrainer", "cpo_loss")
    self = stand_in(alpha=0.0, loss_type="sigmoid", beta=BETA, label_smoothing=e)
    a, b = leaves(pc, pr)
    theirs = cpo_loss(self, a - rc, b - rr)[0]
    x, y = leaves(pc, pr)
    mine = dpo_losses(x, y, rc, rr, BETA, "cdpo", e)[0]
    close(mine, theirs, LOSS_RTOL)
    close(grads(mine.sum(), [x, y]), grads(theirs.sum(), [a, b]), GRAD_RTOL)


def test_ipo_without_length_normalisation_is_eq17_on_summed_log_ratios():
    """OpenRLHF's (and Eq. 17's literal) IPO, written out: (h - 1/(2 beta))^2 on summed log-ratios."""
    pc, pr, rc, rr, lc, lr = pair_inputs(3)
    a, b = leaves(pc, pr)
    ours = dpo_losses(a, b, rc, rr, BETA, "ipo", chosen_len=lc, rejected_len=lr, ipo_length_normalise=False)[0]
    x, y = leaves(pc, pr)
    written = ((x - rc) - (y - rr) - 1 / (2 * BETA)) ** 2
    close(ours, written, LOSS_RTOL)
    close(grads(ours.sum(), [a, b]), grads(written.sum(), [x, y]), GRAD_RTOL)
    normalised = dpo_losses(pc, pr, rc, rr, BETA, "ipo", chosen_len=lc, rejected_len=lr)[0]
    assert not torch.allclose(normalised, ours)  # the switch matters


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_dpo_closed_forms_at_initialisation(loss_type):
    """Policy = reference: ln 2 for the logistic losses, 1 for hinge, 1/(4 beta^2) for IPO."""
    pc, pr, _, _, lc, lr = pair_inputs(4)
    e = 0.1 if loss_type in ("cdpo", "robust") else 0.0
    want = {"sigmoid": math.log(2), "cdpo": math.log(2), "robust": math.log(2), "hinge": 1.0,
            "ipo": 1 / (4 * BETA**2)}[loss_type]
    for normalise in (True, False):
        losses, chosen, rejected = dpo_losses(pc, pr, pc, pr, BETA, loss_type, e, lc, lr, normalise)
        close(losses, torch.full_like(losses, want), 1e-14)
        assert chosen.abs().max() == 0 and rejected.abs().max() == 0


def test_dpo_options_are_checked():
    for bad in [("dpo", 0.1, 0.0), ("sigmoid", 0.0, 0.0), ("sigmoid", 0.1, 0.1), ("robust", 0.1, 0.5),
                ("cdpo", 0.1, 0.6)]:
        with pytest.raises(ValueError):
            check_dpo_options(*bad)
    pc, pr, rc, rr, *_ = pair_inputs(5)
    with pytest.raises(ValueError, match="chosen_len"):
        dpo_losses(pc, pr, rc, rr, BETA, "ipo")


# --- KTO ------------------------------------------------------------------------------------------


def kto_inputs(seed: int, kl_sign: float):
    """B single answers (half desirable), and n = 4 mismatched KL pairs whose mean log-ratio has sign kl_sign."""
    g = torch.Generator().manual_seed(seed)
    p = seq_logps(seed)
    ref = p + 3 * torch.randn(B, generator=g, dtype=torch.float64)
    desirable = torch.tensor([True, False] * (B // 2))
    kl_p = seq_logps(seed + 7, 4)
    kl_ref = kl_p - kl_sign * (0.5 + torch.rand(4, generator=g, dtype=torch.float64))
    return p, ref, desirable, kl_p, kl_ref


def trl_kto(p, ref, desirable, kl_p, kl_ref, wd, wu):
    """TRL's KTO loss (KTOTrainer._compute_loss, precomputed reference log-probabilities): the batch mean."""
    compute = trl_attr("trl.trainer.kto_trainer", "KTOTrainer", "_compute_loss")
    kl_method = trl_attr("trl.trainer.kto_trainer", "KTOTrainer", "_compute_kl_logps")
    self = stand_in(loss_type="kto", beta=BETA, desirable_weight=wd, undesirable_weight=wu,
                    precompute_ref_logps=True, calculate_KL=True)
    self._compute_kl_logps = types.MethodType(kl_method, self)
    inputs = completion_batch(1, torch.full((p.numel(),), 5))
    kl_batch = completion_batch(2, torch.full((kl_p.numel(),), 5))
    inputs.update({"KL_" + k: v for k, v in kl_batch.items()})
    inputs.update(label=desirable, ref_logps=ref, ref_KL_logps=kl_ref)
    return compute(self, TokenLogps(m1=p, m2=kl_p), inputs, return_outputs=False)


def run_kto(kl_sign=1.0, wd=1.0, wu=1.0, seed=0, perturb=0.0):
    p, ref, desirable, kl_p, kl_ref = kto_inputs(seed, kl_sign)
    theirs_p = p.clone()
    theirs_p[0] += perturb
    kl = batch_kl(kl_p, kl_ref)
    ours = kto_losses(p, ref, desirable, kl, BETA, wd, wu)[0]
    theirs = torch.stack([trl_kto(theirs_p[i:i + 1], ref[i:i + 1], desirable[i:i + 1], kl_p, kl_ref, wd, wu)
                          for i in range(B)])
    (a,) = leaves(p)
    our_grads = grads(kto_losses(a, ref, desirable, kl, BETA, wd, wu)[0].mean(), [a])
    (a,) = leaves(theirs_p)
    their_grads = grads(trl_kto(a, ref, desirable, kl_p, kl_ref, wd, wu), [a])
    return {"loss": (ours, theirs), "grad": (our_grads, their_grads)}


@pytest.mark.parametrize("kl_sign,wd,wu", [(1.0, 1.0, 1.0), (-1.0, 1.0, 1.0), (1.0, 1.33, 0.7)],
                         ids=["kl>0", "kl<0-clamped", "weighted"])
def test_kto_loss_equals_trl(kl_sign, wd, wu):
    assert_parity(run_kto(kl_sign, wd, wu))


def test_kto_kl_estimate_and_pairing_are_trls():
    _, _, _, kl_p, kl_ref = kto_inputs(0, 1.0)
    assert batch_kl(kl_p, kl_ref).item() == (kl_p - kl_ref).mean().clamp(min=0).item() > 0
    _, _, _, kl_p, kl_ref = kto_inputs(0, -1.0)
    assert batch_kl(kl_p, kl_ref).item() == 0.0
    assert batch_kl(kl_p, kl_ref, mean_across=lambda t: t + 10).item() == (kl_p - kl_ref).mean().item() + 10
    # TRL's KTOTrainer._prepare_dataset, per batch of answers: [completions[-1]] + completions[:-1]
    answers = ["y1", "y2", "y3", "y4", "y5"]
    assert [answers[j] for j in kl_partners(5)] == [answers[-1]] + answers[:-1]
    assert kl_partners(1).tolist() == [0]  # a split of one example is its own partner


def test_kto_is_half_the_weight_at_initialisation():
    p, _, desirable, kl_p, _ = kto_inputs(1, 1.0)
    kl = batch_kl(kl_p, kl_p)
    assert kl.item() == 0.0
    losses, rewards = kto_losses(p, p, desirable, kl, BETA)
    close(losses, torch.full_like(losses, 0.5), 1e-15)
    losses = kto_losses(p, p, desirable, kl, BETA, 1.33, 0.7)[0]
    close(losses, torch.tensor([1.33 / 2 if d else 0.7 / 2 for d in desirable], dtype=torch.float64), 1e-15)
    assert rewards.abs().max() == 0


# --- ORPO -----------------------------------------------------------------------------------------


class Float64Stays(torch.Tensor):
    """TRL's odds_ratio_loss calls .float() (to float32) first; on this subclass .float() keeps float64,
    so the comparison runs in float64 on both sides. Autograd passes through as_subclass."""

    def float(self):
        return self


def orpo_means(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean answer log-probabilities on both sides of log1mexp's switch at -ln 2, some close to 0."""
    c = torch.tensor([-1e-4, -0.05, -0.69, -0.70, -1.3, -2.9, -7.5, -0.3], dtype=torch.float64)
    g = torch.Generator().manual_seed(seed)
    return c, c[torch.randperm(c.numel(), generator=g)] - 0.01


def run_orpo(perturb=0.0, lam=0.25):
    odds_ratio_loss = trl_attr("trl.experimental.orpo.orpo_trainer", "ORPOTrainer", "odds_ratio_loss")
    self = stand_in(beta=lam)
    c, r = orpo_means(0)
    theirs_c = c.clone()
    theirs_c[1] -= perturb  # (c[0] + 1e-4 would be 0, where the odds are infinite)
    nll = torch.tensor(1.7, dtype=torch.float64)
    a, b, n = leaves(c, r, nll)
    ours = orpo_losses(a, b, n, lam)[0]
    x, y, m = leaves(theirs_c, r, nll)
    or_losses, chosen_rewards, rejected_rewards, mean_ratio, mean_log_odds = odds_ratio_loss(
        self, x.as_subclass(Float64Stays), y.as_subclass(Float64Stays))
    theirs_mean = m - or_losses.mean()  # ORPOTrainer.get_batch_loss_metrics: policy_nll_loss - losses.mean()
    assert or_losses.dtype == torch.float64
    our_grads = grads(ours.mean(), [a, b, n])
    their_grads = grads(theirs_mean, [x, y, m])
    theirs = torch.as_tensor(nll - or_losses.detach()).as_subclass(torch.Tensor)  # per pair
    return {"loss": (ours, theirs), "grad": (our_grads, [t.as_subclass(torch.Tensor) for t in their_grads]),
            "means": (ours.mean(), theirs_mean.as_subclass(torch.Tensor)), "log_odds": mean_log_odds}


def test_orpo_loss_equals_trl():
    result = run_orpo()
    assert_parity(result)
    close(*result["means"], LOSS_RTOL)
    c, r = orpo_means(0)
    close(orpo_losses(c, r, 0.0, 0.25)[3].mean(), result["log_odds"].as_subclass(torch.Tensor), LOSS_RTOL)


def test_orpo_equals_the_papers_odds_written_out():
    """Eqs. 4-7 literally, P = exp(mean log-prob), where float64 has the digits (P not too close to 1)."""
    c, r = seq_logps(9, low=0.05, high=5.0), seq_logps(10, low=0.05, high=5.0)
    nll = seq_logps(11).neg()  # per pair
    pw, pl = torch.exp(c), torch.exp(r)
    log_or = torch.log(pw / (1 - pw)) - torch.log(pl / (1 - pl))
    losses, chosen_rewards, _, log_odds = orpo_losses(c, r, nll, 0.5)
    close(log_odds, log_or, LOSS_RTOL)
    close(losses, nll + 0.5 * -torch.log(torch.sigmoid(log_or)), LOSS_RTOL)
    close(chosen_rewards, 0.5 * c, LOSS_RTOL)
    close(log1mexp(torch.tensor([-1e-12, -40.0], dtype=torch.float64)),
          torch.tensor([math.log(1e-12), -math.exp(-40.0)], dtype=torch.float64), 1e-6)


def test_orpo_at_equal_answers_is_nll_plus_lambda_ln2():
    c = seq_logps(12, low=0.1, high=3.0)
    close(orpo_losses(c, c, 2.0, 0.3)[0], torch.full_like(c, 2.0 + 0.3 * math.log(2)), 1e-14)


# --- SimPO ----------------------------------------------------------------------------------------


def trl_simpo(a, b, beta, simpo_gamma, label_smoothing):
    cpo_loss = trl_attr("trl.experimental.cpo.cpo_trainer", "CPOTrainer", "cpo_loss")
    self = stand_in(alpha=0.0, loss_type="simpo", beta=beta, simpo_gamma=simpo_gamma, label_smoothing=label_smoothing)
    return cpo_loss(self, a, b)


def run_simpo(label_smoothing=0.0, cpo_alpha=0.0, perturb=0.0, beta=2.5, gamma=1.4):
    c, r = seq_logps(20, low=0.2, high=3.0), seq_logps(21, low=0.2, high=3.0)
    theirs_c = c.clone()
    theirs_c[0] += perturb
    nll = torch.tensor(0.9, dtype=torch.float64)
    a, b, n = leaves(c, r, nll)
    ours, ours_chosen, _ = simpo_losses(a, b, beta, gamma, label_smoothing, n, cpo_alpha)
    x, y, m = leaves(theirs_c, r, nll)
    theirs, theirs_chosen, _ = trl_simpo(x, y, beta, gamma, label_smoothing)
    # CPOTrainer.get_batch_loss_metrics: losses.mean() + cpo_alpha * policy_nll_loss
    our_grads = grads(ours.mean(), [a, b, n] if cpo_alpha else [a, b])
    theirs_mean = theirs.mean() + cpo_alpha * m
    their_grads = grads(theirs_mean, [x, y, m] if cpo_alpha else [x, y])
    return {"loss": (ours, theirs + cpo_alpha * nll), "grad": (our_grads, their_grads),
            "rewards": (ours_chosen, theirs_chosen)}


@pytest.mark.parametrize("label_smoothing,cpo_alpha", [(0.0, 0.0), (0.1, 0.0), (0.0, 0.5)],
                         ids=["simpo", "label-smoothing", "with-nll"])
def test_simpo_equals_trl_cpo_simpo_with_trls_gamma(label_smoothing, cpo_alpha):
    result = run_simpo(label_smoothing, cpo_alpha)
    assert_parity(result)
    close(*result["rewards"], LOSS_RTOL)


def test_simpo_margin_scales_eq6_and_the_reference_code():
    """simpo_margin converts the reference code's gamma_beta_ratio; the loss is Eq. 6 written out from summed
    log-probabilities and lengths, and the reference code's beta * (a_w - a_l - gamma / beta)."""
    beta, ratio = 2.5, 0.55
    gamma, derived = simpo_margin(beta, gamma_beta_ratio=ratio)
    assert gamma == pytest.approx(ratio * beta, rel=1e-15) and derived == ratio
    assert simpo_margin(beta, gamma=gamma)[1] == pytest.approx(ratio, rel=1e-15)
    with pytest.raises(ValueError):
        simpo_margin(beta)
    with pytest.raises(ValueError):
        simpo_margin(beta, gamma=1.0, gamma_beta_ratio=0.4)

    g = torch.Generator().manual_seed(22)
    lw, ll = (torch.randint(1, 50, (B,), generator=g).double() for _ in range(2))  # answer lengths
    sum_w, sum_l = seq_logps(23), seq_logps(24)
    a, b = leaves(sum_w / lw, sum_l / ll)
    ours = simpo_losses(a, b, beta, gamma)[0]
    x, y = leaves(sum_w, sum_l)
    eq6 = -torch.log(torch.sigmoid(beta / lw * x - beta / ll * y - gamma))
    reference_code = -F.logsigmoid(beta * ((sum_w / lw - sum_l / ll) - ratio))
    close(ours, eq6, LOSS_RTOL)
    close(ours, reference_code, LOSS_RTOL)
    d_ours = grads(ours.sum(), [a, b])
    d_eq6 = grads(eq6.sum(), [x, y])  # d/d(sum) = d/d(mean) / length
    close((d_ours[0] / lw, d_ours[1] / ll), d_eq6, GRAD_RTOL)


def test_trls_simpo_gamma_is_eq6s_gamma_not_the_ratio():
    """TRL's simpo_gamma = gamma reproduces Eq. 6; the reference code's gamma / beta put there is another loss."""
    beta, ratio = 2.5, 0.55
    gamma = simpo_margin(beta, gamma_beta_ratio=ratio)[0]
    c, r = seq_logps(26, low=0.2, high=3.0), seq_logps(27, low=0.2, high=3.0)
    ours = simpo_losses(c, r, beta, gamma)[0]
    close(trl_simpo(c, r, beta, gamma, 0.0)[0], ours, LOSS_RTOL)
    assert not torch.allclose(trl_simpo(c, r, beta, ratio, 0.0)[0], ours)


def test_simpo_at_equal_answers_is_log_1_plus_e_gamma():
    c = seq_logps(25, low=0.1, high=3.0)
    losses, chosen, rejected = simpo_losses(c, c, 2.0, 1.2)
    close(losses, torch.full_like(c, math.log1p(math.exp(1.2))), 1e-14)
    close(chosen, rejected, 0.0)


# --- reward model ---------------------------------------------------------------------------------


def trl_reward(rc, rr, margin, center):
    compute = trl_attr("trl.trainer.reward_trainer", "RewardTrainer", "compute_loss")
    self = stand_in(args=types.SimpleNamespace(center_rewards_coefficient=center))
    n = rc.numel()
    ones = torch.ones(2 * n, 4, dtype=torch.long)
    inputs = {"input_ids": ones, "attention_mask": ones}
    if margin is not None:
        inputs["margin"] = margin

    def model(**_):
        return types.SimpleNamespace(logits=torch.cat([rc, rr])[:, None])  # (2n, 1) scores

    return compute(self, model, inputs)


def run_reward(with_margin=False, center=None, perturb=0.0):
    g = torch.Generator().manual_seed(30)
    rc, rr = 2 * torch.randn(B, generator=g, dtype=torch.float64), 2 * torch.randn(B, generator=g, dtype=torch.float64)
    margin = torch.rand(B, generator=g, dtype=torch.float64) if with_margin else None
    theirs_rc = rc.clone()
    theirs_rc[0] += perturb
    ours = bradley_terry_losses(rc, rr, margin, center or 0.0)
    pick = lambda t, i: None if t is None else t[i:i + 1]
    theirs = torch.stack([trl_reward(theirs_rc[i:i + 1], rr[i:i + 1], pick(margin, i), center) for i in range(B)])
    a, b = leaves(rc, rr)
    our_grads = grads(bradley_terry_losses(a, b, margin, center or 0.0).mean(), [a, b])
    a, b = leaves(theirs_rc, rr)
    their_grads = grads(trl_reward(a, b, margin, center), [a, b])
    return {"loss": (ours, theirs), "grad": (our_grads, their_grads)}


@pytest.mark.parametrize("with_margin,center", [(False, None), (True, None), (True, 0.01)],
                         ids=["plain", "margin", "margin+centring"])
def test_bradley_terry_equals_trl_reward_trainer(with_margin, center):
    assert_parity(run_reward(with_margin, center))


def test_bradley_terry_is_ln2_at_equal_rewards():
    r = torch.randn(B, dtype=torch.float64)
    close(bradley_terry_losses(r, r), torch.full_like(r, math.log(2)), 1e-15)
    close(bradley_terry_losses(r, r, center_coef=0.01), math.log(2) + 0.01 * (2 * r) ** 2, 1e-15)


# --- the comparisons can fail ---------------------------------------------------------------------


@pytest.mark.parametrize("run,gradient_moves", [
    (lambda p: run_dpo("sigmoid", perturb=p), True), (lambda p: run_dpo("ipo", perturb=p), True),
    (lambda p: run_dpo("robust", 0.2, perturb=p), True), (lambda p: run_dpo("hinge", perturb=p), False),
    (lambda p: run_kto(perturb=p), True), (lambda p: run_orpo(perturb=p), True),
    (lambda p: run_simpo(perturb=p), True), (lambda p: run_reward(True, 0.01, perturb=p), True),
], ids=["dpo-sigmoid", "dpo-ipo", "dpo-robust", "dpo-hinge", "kto", "orpo", "simpo", "reward"])
def test_a_perturbed_input_breaks_the_comparison(run, gradient_moves):
    """TRL fed one input moved by 1e-4: the losses no longer agree, nor do the gradients (hinge's gradient
    is piecewise constant, so there only the loss can tell)."""
    result = run(1e-4)
    with pytest.raises(AssertionError):
        close(*result["loss"], LOSS_RTOL)
    if gradient_moves:
        with pytest.raises(AssertionError):
            close(*result["grad"], GRAD_RTOL)
