"""Reward model: a scalar head trained with the Bradley-Terry pairwise loss, optional margin and centring.

A reward model scores (prompt, answer) with a scalar r. Under Bradley-Terry, P(y_w > y_l | x) =
sigmoid(r_w - r_l), and the reward model maximises its likelihood (InstructGPT, arXiv 2203.02155, Eq. 1):

    loss = -log sigmoid(r_w - r_l - m) + c * (r_w + r_l)^2

    m   per-pair margin, how much better y_w is (Llama 2, arXiv 2307.09288, Eq. 2); 0 without one
    c   reward-centring coefficient: pulls the rewards towards mean zero, since the pairwise term sees
        only differences (Eisenstein et al., arXiv 2312.09244, Eq. 2; TRL recommends c = 0.01)

At initialisation (r_w = r_l = 0) the loss is ln 2.

TRL (RewardTrainer) adds c * mean over the batch of (r_w + r_l)^2 to the mean pairwise loss, which is
the batch mean of the per-pair losses above; OpenRLHF (PairWiseLoss) has the margin, no centring.

The objective (`objective.name=reward`, `preference` rows; m is a row's optional `margin` field, c is
objective.reward_center). The model gets a head `score`, a bias-free Linear from the hidden size to 1
(what transformers' *ForSequenceClassification calls it), initialised as transformers does, trained with
the method's parameters. r(x, y) is the head applied to the trunk's last hidden state at the last token
of the sequence that is not the pad token: the very position AutoModelForSequenceClassification reads,
so the exported model scores alike. SmolLM2's pad token is its end-of-turn token, so there r is read at
the answer's last token. Both answers of every pair go through one packed forward (preference.py); the
language-model head never runs (when it is not tied to the embeddings it is frozen, so `full` does not
carry optimizer state for it).

What a run writes (export): the method's artifact in output.dir/adapter, which for PEFT-format methods
also holds the head as PEFT writes it for task_type SEQ_CLS (`modules_to_save: ["score"]`, key
base_model.model.score.weight), so AutoModelForSequenceClassification(base, num_labels=1) plus
PeftModel.from_pretrained(adapter) is the reward model; and output.dir/reward_model, a plain
AutoModelForSequenceClassification folder with the method merged into the weights (methods that
cannot be merged, the bottleneck adapter, get the adapter only).
"""

from __future__ import annotations

import logging
from dataclasses import replace
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from tunesmith.objectives.lm import trunk_states
from tunesmith.objectives.preference import collate_pairs, pair_objective, pair_output
from tunesmith.objectives.registry import LossOutput, Objective

log = logging.getLogger(__name__)
HEAD = "score"  # the head's attribute name: transformers' *ForSequenceClassification name, so its key matches


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


# --- the head and where it reads ------------------------------------------------------------------------

def add_score_head(model, cfg=None) -> None:
    """model.score: Linear(hidden, 1, bias=False), N(0, initializer_range) as transformers initialises it, in
    the embeddings' dtype and device; trainable whatever the method froze. An untied LM head is frozen."""
    embeddings = model.get_input_embeddings().weight
    config = model.config.get_text_config()
    head = nn.Linear(config.hidden_size, 1, bias=False, dtype=embeddings.dtype, device=embeddings.device)
    nn.init.normal_(head.weight, std=getattr(config, "initializer_range", 0.02))
    setattr(model, HEAD, head)
    lm_head = model.get_output_embeddings()
    if lm_head is not None and lm_head.weight is not embeddings:
        lm_head.requires_grad_(False)


def last_token_index(input_ids: torch.Tensor, sequence_ids: torch.Tensor, pad_id: int, n: int) -> torch.Tensor:
    """(n,) long: each sequence's last token that is not pad_id, as an index into input_ids.view(-1)
    (transformers' rule for *ForSequenceClassification: the rightmost non-pad token)."""
    ids, owner = input_ids.reshape(-1), sequence_ids.reshape(-1)
    keep = (owner >= 0) & (ids != pad_id)
    flat = torch.arange(ids.numel())
    return torch.full((n,), -1, dtype=torch.long).scatter_reduce(0, owner[keep], flat[keep], reduce="amax")


def collate_reward_pairs(examples: list[dict], pad_id: int, pack_len: int = 0) -> dict[str, torch.Tensor]:
    """collate_pairs plus `reward_index` (2P,): where each sequence's reward is read, and `margin` (P,)."""
    batch = collate_pairs(examples, pad_id, pack_len)
    batch["reward_index"] = last_token_index(batch["input_ids"], batch["sequence_ids"], pad_id, 2 * len(examples))
    batch["margin"] = torch.tensor([float(e.get("margin", 0.0)) for e in examples])
    return batch


def sequence_rewards(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """r (S,) in float32: the head on the trunk's hidden state at each sequence's reward_index."""
    hidden = trunk_states(model, batch)  # (B, T, H)
    picked = hidden.reshape(-1, hidden.shape[-1])[batch["reward_index"]]  # (S, H)
    return getattr(model, HEAD)(picked).squeeze(-1).float()


def reward_pair_loss(model, batch, center_coef: float = 0.0) -> LossOutput:
    """(sum of the pairs' Bradley-Terry losses, pairs, metric sums): reward_chosen and reward_rejected are r."""
    rewards = sequence_rewards(model, batch)  # (2P,): chosen at even, rejected at odd indices
    chosen, rejected = rewards[0::2], rewards[1::2]
    losses = bradley_terry_losses(chosen, rejected, batch["margin"].to(rewards), center_coef)
    return pair_output(losses, chosen.detach(), rejected.detach(), batch["pair_weight"])


def configure(cfg, method=None) -> Objective:
    return replace(OBJECTIVE, loss=partial(reward_pair_loss, center_coef=cfg.reward_center))


# --- scoring the test split and the artifact ------------------------------------------------------------

@torch.no_grad()
def pair_scores(model, examples: list[dict], pad_id: int, batch_size: int = 16) -> dict[str, float]:
    """{"pair_accuracy": % of the pairs whose chosen answer gets the higher reward}."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    rewards = []
    for i in range(0, len(examples), batch_size):
        batch = collate_reward_pairs(examples[i : i + batch_size], pad_id)
        rewards.append(sequence_rewards(model, {k: v.to(device) for k, v in batch.items()}).view(-1, 2).cpu())
    model.train(was_training)
    r = torch.cat(rewards)
    return {"pair_accuracy": 100.0 * int((r[:, 0] > r[:, 1]).sum()) / max(1, len(r))}


def test_pair_scores(model, tokenizer, cfg) -> dict[str, float]:
    """pair_scores on data.test (preference rows; the first eval.max_samples if set), encoded as in training."""
    from tunesmith.data.dataset import encode_rows
    from tunesmith.data.formats import validate_rows
    from tunesmith.data.readers import read_rows

    rows = read_rows(cfg.data.test)[: cfg.eval.max_samples or None]
    validate_rows(rows, "preference", cfg.data.test)
    stats = {"truncated": 0, "dropped": 0}
    examples = encode_rows(rows, "preference", tokenizer, cfg.data, cfg.data.test, stats, OBJECTIVE)
    return pair_scores(model, examples, tokenizer.pad_token_id, cfg.eval.batch_size)


def export_reward_model(model, method, cfg, run_dir: Path, tokenizer) -> None:
    """The head into the PEFT adapter (PEFT-format methods), and output.dir/reward_model: a plain
    AutoModelForSequenceClassification folder, the method merged into the weights. Merges `model` in place."""
    head = getattr(model, HEAD).weight.detach().cpu().contiguous()
    if method.peft_type is not None:
        add_head_to_peft_adapter(Path(run_dir) / "adapter", head)
    if method.merge is None:
        log.warning("%s cannot be merged into the weights: no reward_model folder; score with the base model "
                    "and the adapter (output.dir/adapter holds the head too)", method.name)
        return
    if cfg.model.quantization != "none":
        from tunesmith.models.quantize import dequantize_model

        dequantize_model(model, model.get_input_embeddings().weight.dtype)  # merge into the dequantized base
    save_sequence_classifier(method.merge(model), tokenizer, Path(run_dir) / "reward_model")


def add_head_to_peft_adapter(adapter_dir: Path, head: torch.Tensor) -> None:
    """Make a PEFT adapter folder a SEQ_CLS adapter carrying the head, as peft saves one (modules_to_save)."""
    from tunesmith.files import atomic_save_safetensors, atomic_write_json, read_json, read_safetensors

    config = read_json(adapter_dir / "adapter_config.json", "the adapter's config")
    atomic_write_json(adapter_dir / "adapter_config.json", {**config, "task_type": "SEQ_CLS", "modules_to_save": [HEAD]})
    weights = read_safetensors(adapter_dir / "adapter_model.safetensors", "the adapter's weights")
    atomic_save_safetensors({**weights, f"base_model.model.{HEAD}.weight": head}, adapter_dir / "adapter_model.safetensors")


def save_sequence_classifier(model, tokenizer, out: Path) -> None:
    """model (a causal LM carrying `score`) as an AutoModelForSequenceClassification folder with num_labels 1 and
    the tokenizer's pad id (where the reward is read). Built on the meta device: no second copy of the weights."""
    import copy

    from transformers import AutoModelForSequenceClassification

    config = copy.deepcopy(model.config)
    config.architectures, config.num_labels, config.pad_token_id = None, 1, tokenizer.pad_token_id
    config.problem_type = "regression"  # one score, no softmax (transformers' convention for num_labels=1)
    with torch.device("meta"):
        classifier = AutoModelForSequenceClassification.from_config(config)
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("lm_head.")}
    classifier.load_state_dict(state, strict=True, assign=True)
    classifier.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


OBJECTIVE = replace(pair_objective("reward", reward_pair_loss, configure=configure), collate=collate_reward_pairs,
                    add_head=add_score_head, test_score=test_pair_scores, export=export_reward_model)
