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
them to batch_kl. With n = 1 the only partner would be the example itself (its own reward): kl_partners
refuses it, and the objective below takes z0 = 0 for such a micro-batch (TRL refuses a per-device batch of 1). Across processes TRL and OpenRLHF average the per-process means
and clamp after averaging: pass that all-reduce as `mean_across`. Each micro-batch of a gradient
accumulation window has its own z0, as in TRL.

TRL (KTOTrainer, loss_type="kto") and OpenRLHF (KTOLoss) compute exactly this; TRL's
"apo_zero_unpaired" (no z0) is not offered here.
"""

from __future__ import annotations

from dataclasses import replace
from functools import partial
from typing import Callable

import torch
import torch.nn.functional as F

from tunesmith.errors import UserError
from tunesmith.methods.registry import switch_adapters_off
from tunesmith.objectives.lm import IGNORE
from tunesmith.objectives.preference import answer_logps, collate_sequences, reference_logps
from tunesmith.objectives.registry import LossOutput, Objective


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


# The objective: `unpaired` rows. A micro-batch of n examples is 2n sequences in one forward (packed, or padded
# with data.packing=false): the n examples at indices 0..n-1, then the m mismatched KL sequences
# prompt_i + answer_{p(i)} at n..n+m-1, p = kl_partners over the real (weight > 0) examples:
#
#     row:          [ x1 y1 | x2 y2 | ... | xn yn | x1 yn | x2 y1 | ... | xn y{n-1} ]
#     sequence_ids: [ 0 ..  | 1 ..  | ... | n-1   | n ..  | n+1 ..| ... | 2n-1      ]
#
# The policy's log-probabilities of the KL sequences come out of the same forward and are detached (z0 carries
# no gradient); the reference (the method switched off) runs one forward without gradient over all of them.
# With fewer than 2 real examples (train.batch_size=1, or a process's filler-only micro-batch) kl_partners has
# no partner to give: that micro-batch takes z0 = 0 (TRL refuses a per-device batch of 1). Filler examples
# (weight 0) add no loss, no unit and no metric, and are left out of z0. A KL sequence can be longer than
# data.max_seq_len (its prompt and answer were fitted to each other's lengths); it is not cut.
#
# Accumulation: z0 belongs to each micro-batch, so unlike the pair objectives, 1 x 8 and 2 x 4 give different
# gradients by design (as in TRL); the loop still divides a window's loss sum by its examples.
#
# Metrics, each a sum over examples that the loop divides by the window's examples (all of them, desirable or
# not): reward_desirable and reward_undesirable sum beta * (log pi - log ref) over the examples of that kind
# (so each is its kind's mean reward times its share of the window), kl is z0 times the micro-batch's examples
# (its window mean is z0, the examples' weighted mean of the micro-batches' z0).

DEFAULT_BETA = 0.1  # objective.beta unset, as DPO
KTO_METRICS = ("reward_desirable", "reward_undesirable", "kl")


def encode(fields: dict, fmt: str, tokenizer, cfg) -> dict:
    from tunesmith.data.preference import encode_unpaired

    return encode_unpaired(fields, tokenizer, cfg.max_seq_len, cfg.system_prompt)


def keeps(example: dict) -> bool:
    """The answer keeps at least one labelled token within data.max_seq_len."""
    from tunesmith.data.dataset import has_target

    return has_target(example["labels"])


def kl_sequences(examples: list[dict]) -> tuple[list[dict], list[int]]:
    """(the mismatched sequences prompt_i + answer_{p(i)} over the real examples, labels on the answer only;
    the index in `examples` of each one's prompt); both empty with fewer than 2 real examples."""
    real = [i for i, e in enumerate(examples) if float(e.get("weight", 1.0)) > 0]
    if len(real) < 2:
        return [], []
    seqs = []
    for i, j in zip(real, kl_partners(len(real)).tolist()):
        prompt, answer = examples[i], examples[real[j]]
        prompt_ids = prompt["input_ids"][: prompt["prompt_len"]]
        answer_ids = answer["input_ids"][answer["prompt_len"] :]
        seqs.append({"input_ids": prompt_ids + answer_ids, "labels": [IGNORE] * len(prompt_ids) + answer_ids})
    return seqs, real


def collate_unpaired(examples: list[dict], pad_id: int, pack_len: int = 0) -> dict[str, torch.Tensor]:
    """One micro-batch: the n examples, then their KL sequences, in one forward; `desirable` (n,) bool,
    `example_weight` (n,) (0 for a filler), `kl_prompt` (m,): the example whose prompt each KL sequence has
    (m = 0 with fewer than 2 real examples: z0 = 0)."""
    kl, prompts = kl_sequences(examples)
    seqs = [{"input_ids": e["input_ids"], "labels": e["labels"]} for e in examples] + kl
    batch = collate_sequences(seqs, pad_id, pack_len)
    batch["desirable"] = torch.tensor([bool(e["label"]) for e in examples], dtype=torch.bool)  # (n,)
    batch["example_weight"] = torch.tensor([float(e.get("weight", 1.0)) for e in examples])  # (n,)
    batch["kl_prompt"] = torch.tensor(prompts, dtype=torch.long)  # (m,)
    return batch


def count_examples(batch: dict[str, torch.Tensor]) -> int:
    return int(batch["example_weight"].sum())


def filler(example: dict) -> dict:
    return {**example, "weight": 0.0}


def kto_loss(model, batch, beta: float = DEFAULT_BETA, desirable_weight: float = 1.0,
             undesirable_weight: float = 1.0, reference=switch_adapters_off) -> LossOutput:
    """(sum of the examples' KTO losses, examples, metric sums) for one micro-batch."""
    n, m = batch["example_weight"].numel(), batch["kl_prompt"].numel()
    logps, _ = answer_logps(model, batch, n + m)  # (n + m,): the examples, then the KL sequences
    ref = reference_logps(model, batch, reference, n + m)
    z0 = batch_kl(logps[n:].detach(), ref[n:]) if m else logps.new_zeros(())
    losses, rewards = kto_losses(logps[:n], ref[:n], batch["desirable"], z0, beta, desirable_weight,
                                 undesirable_weight)
    w = batch["example_weight"].to(losses.dtype)
    desirable = batch["desirable"].to(w.dtype)
    units = int(w.sum())
    metrics = {
        "reward_desirable": float((rewards * desirable * w).sum()),
        "reward_undesirable": float((rewards * (1 - desirable) * w).sum()),
        "kl": float(z0) * units,
    }
    return (losses * w).sum(), units, metrics


def configure(cfg, method=None) -> Objective:
    """objective.beta, .desirable_weight, .undesirable_weight and the reference (the method switched off) bound
    into the loss. kto has no precomputed reference yet: a method without a switch (full, freeze) is refused."""
    if method is not None and method.disable is None:
        raise UserError(f"objective.name=kto needs an adapter method for now (its reference is the model with "
                        f"the method switched off, and method.name={method.name} has no such switch). "
                        "Use lora, dora or another adapter method.")
    if cfg.reference == "precomputed":
        raise UserError("objective.name=kto takes no precomputed reference yet; leave objective.reference at auto "
                        "(or adapters_off).")
    loss = partial(kto_loss, beta=cfg.beta or DEFAULT_BETA, desirable_weight=cfg.desirable_weight,
                    undesirable_weight=cfg.undesirable_weight,
                    reference=method.disable if method is not None else switch_adapters_off)
    return replace(OBJECTIVE, loss=loss)


OBJECTIVE = Objective(name="kto", formats=("unpaired",), unit="examples", encode=encode, keeps=keeps,
                      collate=collate_unpaired, units=count_examples, filler=filler, loss=kto_loss,
                      metrics=KTO_METRICS, configure=configure)
