"""A reward model as a reward function: `f(prompts, completions, **columns) -> list[float]`, TRL's signature.

The model is an AutoModelForSequenceClassification folder with one label: output.dir/reward_model of an
`objective.name=reward` run (tunesmith/objectives/reward.py), or one from elsewhere. A (prompt, completion)
pair is scored exactly as `tunesmith score` scores a prompt_completion row (tunesmith/commands/score.py):

    messages  = the prompt (a string is one user message; a list is already messages), with the system
                prompt inserted first if one is given and the prompt has none
    ids       = render(messages, generation prompt) + the completion and its end-of-turn marker
                (data/preference.py encode_answers: the very tokens the reward objective trained on)
    score     = the classifier's logit at the last token that is not the pad token (transformers' rule;
                the reward objective reads its head there too)

So a policy's completion is judged as the reward model saw answers in training, whatever the policy's own
tokenizer: the completion goes in as text (a string, or TRL's `[{"role": "assistant", "content": ...}]`).

Used by PPO (its score at the last token of each completion) and by GRPO (`objective.reward_model: PATH`),
beside or instead of `module:function` rewards, weighted by objective.reward_model_weight (objective_rewards). The
model is loaded on first call, not at construction; construction only reads config.json, so a folder that is no
reward model (a typo, a policy's folder) stops the run before its first step.
"""

from __future__ import annotations

import json
from pathlib import Path

from tunesmith.errors import UserError

NAME = "reward_model"  # the reward model's name among the rewards: GRPO logs reward_reward_model


def objective_rewards(opts, objective: str) -> list:
    """The rewards of objective.* as rewards.Reward entries: the reward model (objective.reward_model, weighted by
    objective.reward_model_weight, named NAME) first, then the functions of objective.rewards. Each is checked now
    (an import typo, a folder that is no reward model), so a mistake stops the run before any training step."""
    from tunesmith.rl.rewards import Reward, load_rewards

    found = []
    if opts.reward_model:
        weight = float(getattr(opts, "reward_model_weight", 1.0))
        found.append(Reward(NAME, RewardModelFunction(opts.reward_model), weight))
    if opts.rewards:
        found += load_rewards(opts.rewards)
    if not found:
        raise UserError(f"objective.name={objective} needs a reward: objective.reward_model (output.dir/reward_model "
                        "of an objective.name=reward run) or objective.rewards (functions, e.g. [field_accuracy]), "
                        "or both.")
    if sum(r.name == NAME for r in found) > 1:
        raise UserError(f"objective.rewards: a reward function is named {NAME!r}, the name of objective.reward_model "
                        "in the metrics; rename the function.")
    return found


def check_reward_model_folder(path: str) -> None:
    """A UserError unless `path` holds a config.json of a one-label sequence classifier (read as JSON: no model is
    loaded yet): a typo, or a policy's adapter or causal LM folder given by mistake, fails at once."""
    config_path = Path(path) / "config.json"
    if not config_path.is_file():
        raise UserError(f"objective.reward_model={path!r} is not a model folder (no config.json); pass "
                        "output.dir/reward_model of an objective.name=reward run.")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(f"objective.reward_model={path!r}: {config_path} is not readable JSON ({e}).") from None
    architectures = config.get("architectures") or []
    labels = config.get("num_labels", len(config["id2label"]) if config.get("id2label") else None)
    if (architectures and not any(a.endswith("ForSequenceClassification") for a in architectures)) or labels != 1:
        raise UserError(f"objective.reward_model={path!r} is not a reward model (architectures "
                        f"{architectures or 'unset'}, {labels if labels is not None else 'no'} labels; a reward model "
                        "is a sequence classifier with one label): pass output.dir/reward_model of an "
                        "objective.name=reward run, not a policy's model or adapter folder.")


class RewardModelFunction:
    """A callable reward backed by a reward model folder; `__name__` is what metrics and errors call it."""

    def __init__(self, path: str | Path, batch_size: int = 16, max_seq_len: int = 1024,
                 system_prompt: str | None = None, device=None):
        self.path = str(path)
        self.batch_size, self.max_seq_len, self.system_prompt = batch_size, max_seq_len, system_prompt
        self.device = device  # None: the device of the first call's `device` keyword, else CPU
        self.__name__ = f"reward_model:{Path(self.path).name}"
        self._model = self._tokenizer = None
        check_reward_model_folder(self.path)

    def load(self):
        """(model in eval mode, tokenizer), loaded once (tunesmith score's loader: one label, a pad id)."""
        if self._model is None:
            from tunesmith.commands.score import load_reward_model

            self._model, self._tokenizer = load_reward_model(self.path)
            if self.device is not None:
                self._model.to(self.device)
        return self._model, self._tokenizer

    def sequences(self, prompts: list, completions: list) -> list[list[int]]:
        """The token ids the reward model reads for each (prompt, completion), as `tunesmith score` builds them."""
        from tunesmith.data.preference import encode_answers
        from tunesmith.data.tokenize import as_messages

        _, tokenizer = self.load()
        out = []
        for prompt, completion in zip(prompts, completions):
            messages = as_messages(prompt, "user")
            if self.system_prompt and messages[0]["role"] != "system":
                messages.insert(0, {"role": "system", "content": self.system_prompt})
            prompt_ids, (answer,), _ = encode_answers(messages, [completion], tokenizer, self.max_seq_len)
            out.append(prompt_ids + answer)
        return out

    def __call__(self, prompts: list, completions: list, **columns) -> list[float]:
        """One score per completion (float); the other columns (TRL passes completion_ids, trainer_state and the
        data's fields) are accepted and not read."""
        if len(prompts) != len(completions):
            raise ValueError(f"{self.__name__}: {len(prompts)} prompts for {len(completions)} completions")
        model, tokenizer = self.load()
        if not prompts:
            return []
        return scores_on_device(model, self.sequences(prompts, completions), tokenizer.pad_token_id, self.batch_size)


def scores_on_device(model, sequences: list[list[int]], pad_id: int, batch_size: int) -> list[float]:
    """commands/score.py's sequence_scores (right-padded batches, the logit at each row's last non-pad token) on
    the model's own device."""
    import torch

    from tunesmith.data.dataset import collate

    device = next(model.parameters()).device
    scores = []
    with torch.no_grad():
        for i in range(0, len(sequences), batch_size):
            batch = collate([{"input_ids": ids, "labels": ids} for ids in sequences[i : i + batch_size]], pad_id)
            logits = model(input_ids=batch["input_ids"].to(device),
                           attention_mask=batch["attention_mask"].to(device)).logits
            scores += logits[:, 0].float().tolist()
    return scores
