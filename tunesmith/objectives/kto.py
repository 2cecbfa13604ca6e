"""KTO: learn from single answers marked desirable or undesirable, no pairs needed.

KTO (Ethayarajh et al., arXiv 2402.01306; Eq. 7 in the numbering TRL cites) scores each answer by its
implicit reward against a reference point z0, the policy's KL divergence from the reference:

    r(x, y) = log pi(y|x) - log ref(y|x)                        (sums over answer tokens)
    loss    = w_D * (1 - sigmoid(beta * (r - z0)))              y desirable
              w_U * (1 - sigmoid(beta * (z0 - r)))              y undesirable
    reward  = beta * r                                          (logged)

The loss is the plain mean of these over the examples (TRL's nanmean, OpenRLHF's mean), not a mean
weighted by w. At initialisation (r = 0, z0 = 0) every loss is w / 2: 0.5 with the default weights.
Setting w_D * n_D / (w_U * n_U) in [1, 4/3] is the paper's advice for unbalanced data.

z0 is estimated without gradient from mismatched (prompt, answer) pairs. Each example's KL partner is
fixed once, when the data are prepared (`prepare`, before training): within its split, in dataset
order, example i gets the answer of example i - 1 (the first the last's),

    KL sequence of i:  x_i + y_{p(i)},   p = kl_partners(N): p(i) = (i - 1) mod N   (labels on y only)

as TRL's KTOTrainer does at data preparation ("(x_1, y_1), ..., (x_n, y_n) --> (x_1, y_n), (x_2, y_1),
..., (x_n, y_{n-1})"; TRL rotates within chunks of the per-device batch size, here the whole split, so
the partners depend on neither the batch size nor the number of processes). A split of one example is
its own partner. The KL sequence travels with its example (`kl_input_ids`, `kl_labels`). z0 belongs
to an optimizer step: over all KL sequences j of the step's global window (every micro-batch, every
process; w_j the example's weight, 0 for a filler),

    z0 = max(0, sum_j w_j [log pi(y_{p(j)} | x_j) - log ref(y_{p(j)} | x_j)] / sum_j w_j)

computed by the objective's before_window hook (`window_z0`) before the window's first loss: without
gradient it runs the policy and the reference over each micro-batch's KL sequences, all-reduces the two
sums, and stores z0 in every micro-batch. So 1 x 8, 2 x 4, 8 x 1 and two processes of 4 give the same
loss and gradient (up to float summation order); TRL instead takes a z0 per micro-batch, averaging the
processes' means before clamping. The gradient forward holds only the examples. Validation applies the
same hook to the whole validation set as one window: one z0 for the set (train/validate.py).

The reference is the model with the method switched off, or, with objective.reference=precomputed (and
auto for methods without a switch: full, freeze), log-probabilities computed once on the base model before
the method is applied (preference.precompute_reference): each example carries
ref_logps = [log ref(y_i | x_i), log ref(y_{p(i)} | x_i)].

TRL (KTOTrainer, loss_type="kto") and OpenRLHF (KTOLoss) compute this loss; TRL's "apo_zero_unpaired"
(no z0) is not offered here.
"""

from __future__ import annotations

from dataclasses import replace
from functools import partial
from typing import Callable

import torch
import torch.nn.functional as F

from tunesmith.methods.registry import switch_adapters_off
from tunesmith.objectives.lm import IGNORE
from tunesmith.objectives.preference import (answer_logps, collate_sequences, precompute_reference,
                                             reference_logps, uses_precomputed_reference)
from tunesmith.objectives.registry import LossOutput, Objective
from tunesmith.train import distributed


def kl_partners(n: int) -> torch.Tensor:
    """(n,) long: prompt i is paired for z0 with answer kl_partners(n)[i] = (i - 1) mod n (itself when n = 1)."""
    return torch.roll(torch.arange(n), 1)


def batch_kl(policy_kl_logps: torch.Tensor, ref_kl_logps: torch.Tensor,
             mean_across: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """z0 (scalar, detached) of one batch of mismatched pairs (n,): the mean of log pi - log ref, averaged
    across processes by `mean_across` when given (TRL's way), then clamped at 0. The objective pools a whole
    window instead (window_z0); this is the formula the value tests compare with TRL's."""
    kl = (policy_kl_logps - ref_kl_logps).mean().detach()
    if mean_across is not None:
        kl = mean_across(kl)
    return kl.clamp(min=0)


def kto_losses(policy_logps: torch.Tensor, ref_logps: torch.Tensor, desirable: torch.Tensor, kl: torch.Tensor | float,
               beta: float, desirable_weight: float = 1.0,
               undesirable_weight: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(losses (B,), rewards (B,) detached) of B single answers.

    policy_logps, ref_logps (B,): log pi(y | x) summed over each answer's tokens. desirable (B,) bool.
    kl: z0 (no gradient flows through it)."""
    if beta <= 0:
        raise ValueError(f"KTO beta must be > 0, got {beta}.")
    logratio = policy_logps - ref_logps  # (B,)
    kl = torch.as_tensor(kl, dtype=logratio.dtype, device=logratio.device).detach()
    desirable_losses = desirable_weight * (1 - F.sigmoid(beta * (logratio - kl)))
    undesirable_losses = undesirable_weight * (1 - F.sigmoid(beta * (kl - logratio)))
    losses = torch.where(desirable.bool(), desirable_losses, undesirable_losses)
    return losses, beta * logratio.detach()


# The objective: `unpaired` rows. A micro-batch of n examples is two collated sets of sequences: the n
# examples (packed, or padded with data.packing=false), and under the keys "kl.*" their n KL sequences,
# the i-th being example i's prompt with its partner's answer:
#
#     examples:  [ x1 y1 | x2 y2 | ... | xn yn ]          -> the loss, with gradient
#     "kl.*":    [ x1 y1' | x2 y2' | ... | xn yn' ]       -> z0, without gradient (window_z0)
#
# Filler examples (weight 0, a process without a row) add no loss, no unit, no metric and nothing to z0,
# but still run every forward (DDP and FSDP2 need every process in every forward). A KL sequence can be
# longer than data.max_seq_len (its prompt and answer were each fitted to their own example); it is not cut.
#
# Metrics, each a sum over examples that the loop divides by the window's examples (all of them, desirable or
# not): reward_desirable and reward_undesirable sum beta * (log pi - log ref) over the examples of that kind
# (so each is its kind's mean reward times its share of the window), kl is z0 times the micro-batch's examples
# (its window mean is the window's z0).

DEFAULT_BETA = 0.1  # objective.beta unset, as DPO
KTO_METRICS = ("reward_desirable", "reward_undesirable", "kl")
KL = "kl."  # prefix of the KL sequences' tensors in a micro-batch: kl.input_ids, kl.labels, kl.sequence_ids, ...


def encode(fields: dict, fmt: str, tokenizer, cfg) -> dict:
    from tunesmith.data.preference import encode_unpaired

    return encode_unpaired(fields, tokenizer, cfg.max_seq_len, cfg.system_prompt)


def keeps(example: dict) -> bool:
    """The answer keeps at least one labelled token within data.max_seq_len."""
    from tunesmith.data.dataset import has_target

    return has_target(example["labels"])


def assign_kl_partners(examples: list[dict]) -> None:
    """Give each example of a split, in place, its KL sequence: its own prompt with the answer of the example
    before it (`kl_input_ids`, `kl_labels`, labels on the answer only). Idempotent."""
    for example, j in zip(examples, kl_partners(len(examples)).tolist()):
        partner = examples[j]
        prompt_ids = example["input_ids"][: example["prompt_len"]]
        answer_labels = partner["labels"][partner["prompt_len"] :]
        example["kl_input_ids"] = prompt_ids + partner["input_ids"][partner["prompt_len"] :]
        example["kl_labels"] = [IGNORE] * len(prompt_ids) + answer_labels


def kl_sequence(example: dict) -> dict:
    if "kl_input_ids" not in example:
        raise ValueError("a KTO example has no KL sequence: the objective's prepare step (kto.prepare, or "
                         "kto.assign_kl_partners on each split) did not run")
    return {"input_ids": example["kl_input_ids"], "labels": example["kl_labels"]}


def example_sequences(example: dict) -> list[dict]:
    """The two sequences of an example whose reference log-probabilities are precomputed: its own, its KL one."""
    return [{"input_ids": example["input_ids"], "labels": example["labels"]}, kl_sequence(example)]


def prepare(model, data, cfg, run_dir, pad_id: int, method=None) -> None:
    """Before training, on the base model: fix every example's KL partner (each split in dataset order), then,
    with a precomputed reference, the reference log-probabilities of both its sequences (preference.py)."""
    assign_kl_partners(data.train)
    assign_kl_partners(data.validation)
    precompute_reference(model, data, cfg, run_dir, pad_id, method, sequences_of=example_sequences)


def collate_unpaired(examples: list[dict], pad_id: int, pack_len: int = 0) -> dict[str, torch.Tensor]:
    """One micro-batch: the n examples, their n KL sequences under "kl.*", `desirable` (n,) bool and
    `example_weight` (n,) (0 for a filler); with a precomputed reference `ref_logps` and `kl.ref_logps` (n,)."""
    batch = collate_sequences([{"input_ids": e["input_ids"], "labels": e["labels"]} for e in examples],
                              pad_id, pack_len)
    kl = collate_sequences([kl_sequence(e) for e in examples], pad_id, pack_len)
    batch.update({KL + k: v for k, v in kl.items() if k != "real_tokens"})  # the loop counts the examples' tokens
    batch["desirable"] = torch.tensor([bool(e["label"]) for e in examples], dtype=torch.bool)  # (n,)
    batch["example_weight"] = torch.tensor([float(e.get("weight", 1.0)) for e in examples])  # (n,)
    if all(e.get("ref_logps") is not None for e in examples):  # precomputed: [own answer, KL answer] each
        batch["ref_logps"] = torch.tensor([e["ref_logps"][0] for e in examples], dtype=torch.float32)
        batch[KL + "ref_logps"] = torch.tensor([e["ref_logps"][1] for e in examples], dtype=torch.float32)
    return batch


def count_examples(batch: dict[str, torch.Tensor]) -> int:
    return int(batch["example_weight"].sum())


def filler(example: dict) -> dict:
    return {**example, "weight": 0.0}


@torch.no_grad()
def kl_terms(model, batch: dict[str, torch.Tensor], reference=switch_adapters_off) -> torch.Tensor:
    """(2,) float64: sum_j w_j [log pi - log ref] over the micro-batch's KL sequences, and sum_j w_j."""
    kl = {k.removeprefix(KL): v for k, v in batch.items() if k.startswith(KL)}
    n = batch["example_weight"].numel()
    policy = answer_logps(model, kl, n)[0]
    ref = reference_logps(model, kl, reference, n)
    w = batch["example_weight"].double()
    return torch.stack([(w * (policy - ref).double()).sum(), w.sum()])


def window_z0(model, window: list[dict], reference=switch_adapters_off) -> list[dict]:
    """The window's micro-batches, each with the window's z0 (`z0`, a scalar): the before_window hook.

    One forward through `model` (the loop's possibly wrapped runner) per micro-batch on every process, then
    one all-reduce of the two sums, so every process gets the z0 of the global window."""
    with torch.no_grad():  # outside the DDP wrapper too: it must not expect a backward after these forwards
        terms = [distributed.run_through(model, partial(kl_terms, reference=reference), b) for b in window]
    total, count = distributed.sum_over_ranks(*torch.stack(terms).sum(0).tolist())
    z0 = max(0.0, total / count) if count > 0 else 0.0
    return [{**b, "z0": torch.tensor(z0, device=b["example_weight"].device)} for b in window]


def kto_loss(model, batch, beta: float = DEFAULT_BETA, desirable_weight: float = 1.0,
             undesirable_weight: float = 1.0, reference=switch_adapters_off) -> LossOutput:
    """(sum of the examples' KTO losses, examples, metric sums) for one micro-batch whose z0 window_z0 set."""
    if "z0" not in batch:
        raise ValueError("a KTO micro-batch has no z0: the objective's before_window hook (kto.window_z0) must "
                         "run over the window first")
    n = batch["example_weight"].numel()
    logps, _ = answer_logps(model, batch, n)  # (n,)
    ref = reference_logps(model, batch, reference, n)
    z0 = batch["z0"]
    losses, rewards = kto_losses(logps, ref, batch["desirable"], z0, beta, desirable_weight, undesirable_weight)
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
    """objective.beta, .desirable_weight, .undesirable_weight and the reference bound into the loss and the z0
    hook: the method switched off, or (objective.reference=precomputed, or a method without a switch) the
    log-probabilities the batches carry."""
    reference = None if uses_precomputed_reference(cfg, method) else (method.disable if method else switch_adapters_off)
    loss = partial(kto_loss, beta=cfg.beta or DEFAULT_BETA, desirable_weight=cfg.desirable_weight,
                   undesirable_weight=cfg.undesirable_weight, reference=reference)
    return replace(OBJECTIVE, loss=loss, before_window=partial(window_z0, reference=reference))


OBJECTIVE = Objective(name="kto", formats=("unpaired",), unit="examples", encode=encode, keeps=keeps,
                      collate=collate_unpaired, units=count_examples, filler=filler, loss=kto_loss,
                      metrics=KTO_METRICS, configure=configure, prepare=prepare, before_window=window_z0)
