"""PPO's critic: a scalar value head on the policy's last hidden states, one value per token.

    V(x, y_<=t) = w . h_t        h_t (H,): the trunk's last hidden state (after its final norm) at position t,
                                 the state the LM head reads to predict y_{t+1}; w (H,): the head, no bias

The head shares the policy's trunk (and its adapter), as TRL 0.x's AutoModelForCausalLMWithValueHead did, so
values cost one Linear on the forward the policy loss runs anyway; the value loss trains the head and, through
the trunk, the method's parameters.

Initialisation (objective.value_init):
    normal        N(0, initializer_range), as the reward objective initialises its `score` head (reward.py)
    reward_model  a copy of the reward model's `score.weight`: the critic starts predicting the reward model's
                  score from every prefix, a useful start when the policy and the reward model share a base
                  (same hidden size required; same model type, else refused)

Saved with the run: `value_head.safetensors` ({"value_head.weight": (1, H)}) beside the adapter, in
output.dir/adapter; the training checkpoints carry it as a trainable parameter of the model (key
`value_head.weight`), so a resumed run continues the critic exactly.
"""

from __future__ import annotations

from pathlib import Path

from tunesmith.errors import UserError

ATTR = "value_head"  # the model attribute; its weight's key is value_head.weight
FILE = "value_head.safetensors"


def add_value_head(model, init: str = "normal", reward_model: str | None = None) -> None:
    """model.value_head: Linear(hidden, 1, bias=False) in the embeddings' dtype and device, trainable, initialised
    by `init` (module docstring). An untied LM head is left as the method set it (PPO trains through it)."""
    import torch
    from torch import nn

    embeddings = model.get_input_embeddings().weight
    config = model.config.get_text_config()
    head = nn.Linear(config.hidden_size, 1, bias=False, dtype=embeddings.dtype, device=embeddings.device)
    if init == "reward_model":
        if not reward_model:
            raise UserError("objective.value_init=reward_model needs objective.reward_model (the folder whose score "
                            "head starts the value head).")
        weight = reward_score_weight(reward_model, config)
        with torch.no_grad():
            head.weight.copy_(weight.to(head.weight))
    elif init == "normal":
        nn.init.normal_(head.weight, std=getattr(config, "initializer_range", 0.02))
    else:
        raise UserError(f"objective.value_init={init!r} is not known; known: normal, reward_model.")
    head.requires_grad_(True)
    setattr(model, ATTR, head)


def token_values(model, hidden):
    """(B, T) float32: the value head on hidden states (B, T, H)."""
    return getattr(model, ATTR)(hidden).squeeze(-1).float()


def reward_score_weight(folder: str, policy_config):
    """The (1, H) `score.weight` of a reward model folder (its safetensors files, shards too), checked against the
    policy's config: the same hidden size and model type."""
    import json

    from safetensors import safe_open

    root = Path(folder)
    try:
        config = json.loads((root / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(f"objective.reward_model={folder!r}: cannot read its config.json ({e}).") from None
    config = config.get("text_config", config)
    if config.get("hidden_size") != policy_config.hidden_size or config.get("model_type") != policy_config.model_type:
        raise UserError(f"objective.value_init=reward_model: the reward model {folder!r} ({config.get('model_type')}, "
                        f"hidden size {config.get('hidden_size')}) is not on the policy's base "
                        f"({policy_config.model_type}, hidden size {policy_config.hidden_size}); use "
                        "objective.value_init=normal.")
    for file in sorted(root.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            if "score.weight" in f.keys():
                weight = f.get_tensor("score.weight")
                if weight.shape[0] != 1:
                    raise UserError(f"{file}: score.weight has {weight.shape[0]} rows; a reward model has one label.")
                return weight
    raise UserError(f"objective.reward_model={folder!r} has no score.weight in its safetensors files; is it an "
                    "AutoModelForSequenceClassification folder?")


def save_value_head(model, folder: str | Path) -> Path:
    """Write folder/value_head.safetensors (atomically) and return its path."""
    from tunesmith.files import atomic_save_safetensors

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    weight = getattr(model, ATTR).weight.detach().cpu().contiguous()
    atomic_save_safetensors({f"{ATTR}.weight": weight}, folder / FILE)
    return folder / FILE


def load_value_head(model, folder: str | Path) -> None:
    """Add a value head to `model` holding the weights of folder/value_head.safetensors (a PPO run's adapter)."""
    import torch

    from tunesmith.files import read_safetensors

    path = Path(folder) / FILE
    if not path.is_file():
        raise UserError(f"{str(folder)!r} has no {FILE}; it is written beside the adapter of an "
                        "objective.name=ppo run.")
    weights = read_safetensors(path, "the value head")
    add_value_head(model, "normal")
    head = getattr(model, ATTR)
    if f"{ATTR}.weight" not in weights or weights[f"{ATTR}.weight"].shape != head.weight.shape:
        raise UserError(f"{path}: expected {ATTR}.weight of shape {tuple(head.weight.shape)}.")
    with torch.no_grad():
        head.weight.copy_(weights[f"{ATTR}.weight"].to(head.weight))
