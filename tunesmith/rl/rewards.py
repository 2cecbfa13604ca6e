"""Rewards of online RL: plain Python functions with TRL's reward-function signature.

    def my_reward(prompts, completions, **columns) -> list[float]

`prompts` holds each completion's prompt as the data row has it (a string, or a list of {role, content}
messages), `completions` the sampled answers in the same form (a string, or [{"role": "assistant",
"content": ...}] when the prompt is a conversation), and every other column of the data rows comes as a
keyword list of the same length (the demo task's `answer`). Extra keywords should be accepted (`**kwargs`):
TRL's trainer passes a few more, and so may tunesmith. So a reward written for TRL's GRPOTrainer works here
unchanged, as long as it returns one float per completion.

objective.rewards lists them, each a `module:function` name importable from the Python path (the current
folder included), a built-in's short name, or a mapping {name, weight, options}; `options` are keyword
arguments bound into the call (a built-in's pattern or length). The reward a completion gets is

    r = sum_k weight_k * r_k(prompt, completion, ...)              (weights default to 1)

A reward that returns a scalar, the wrong number of values, a None, a NaN or something that is no number
stops the run with a UserError naming it: a silent zero would look like a reward that gives no signal.

Built-ins (short name -> this module's function):

    exact_match     1 if the completion's text equals the `answer` column, surrounding whitespace ignored
    valid_json      1 if the completion is a JSON object (strictly: no prose, no code fence)
    field_accuracy  the share of the `answer` JSON object's leaf fields the completion has right, in [0, 1]
                    (evaluate/metrics/json_fields.py, per row); 0 for a reference that is not an object
    regex_format    1 if the completion's stripped text matches `pattern` in full (Python re, DOTALL)
    length          1 up to `max_chars` characters, max_chars / len beyond (a soft length limit)

The first three score the demo task (tunesmith data demo writes prompt_*.jsonl rows with an `answer`).
"""

from __future__ import annotations

import math
import numbers
import re
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable

from tunesmith.errors import UserError


def completion_text(completion) -> str:
    """A completion's text: the string itself, or the content of its (last) assistant message."""
    if isinstance(completion, str):
        return completion
    return completion[-1]["content"] if completion else ""


def exact_match(prompts, completions, answer, **kwargs) -> list[float]:
    return [float(completion_text(c).strip() == str(a).strip()) for c, a in zip(completions, answer)]


def valid_json(prompts, completions, **kwargs) -> list[float]:
    from tunesmith.evaluate.metrics.json_valid import parse_object

    return [float(parse_object(completion_text(c)) is not None) for c in completions]


def field_accuracy(prompts, completions, answer, **kwargs) -> list[float]:
    from tunesmith.evaluate.metrics.json_fields import row_stats

    scores = []
    for c, a in zip(completions, answer):
        right, fields = row_stats(completion_text(c), a if isinstance(a, str) else _json(a))
        scores.append(right / fields if fields else 0.0)
    return scores


def regex_format(prompts, completions, pattern: str, **kwargs) -> list[float]:
    compiled = re.compile(pattern, re.DOTALL)
    return [float(compiled.fullmatch(completion_text(c).strip()) is not None) for c in completions]


def length(prompts, completions, max_chars: int = 200, **kwargs) -> list[float]:
    return [1.0 if len(t) <= max_chars else max_chars / len(t) for t in map(completion_text, completions)]


def _json(value) -> str:
    import json

    return json.dumps(value)


BUILT_INS: dict[str, Callable] = {"exact_match": exact_match, "valid_json": valid_json,
                                  "field_accuracy": field_accuracy, "regex_format": regex_format, "length": length}


@dataclass(frozen=True)
class Reward:
    name: str  # as logged: reward_<name>
    function: Callable[..., Any]
    weight: float = 1.0


def parse_spec(spec) -> tuple[str, float, dict]:
    """(name, weight, options) of one objective.rewards entry; a config problem is a ValueError (the config's
    validator turns it into the key's message)."""
    if isinstance(spec, str):
        spec = {"name": spec}
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str) or not spec["name"]:
        raise ValueError(f"a reward is a 'module:function' name or {{name, weight, options}}, got {spec!r}")
    unknown = set(spec) - {"name", "weight", "options"}
    if unknown:
        raise ValueError(f"reward {spec['name']!r}: unknown keys {sorted(unknown)}; allowed: name, weight, options")
    weight = spec.get("weight", 1.0)
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
        raise ValueError(f"reward {spec['name']!r}: weight must be a finite number, got {weight!r}")
    options = spec.get("options") or {}
    if not isinstance(options, dict):
        raise ValueError(f"reward {spec['name']!r}: options must be a mapping of keyword arguments, got {options!r}")
    if spec["name"] not in BUILT_INS and ":" not in spec["name"]:
        raise ValueError(f"reward {spec['name']!r} is neither a built-in ({', '.join(BUILT_INS)}) nor a "
                         "'module:function' name")
    return spec["name"], float(weight), options


def load_rewards(specs: list) -> list[Reward]:
    """The configured rewards as callables (imported now, so a typo fails before the model loads)."""
    from tunesmith.evaluate.metrics.user import load

    if not specs:
        raise UserError("objective.rewards is empty: GRPO needs at least one reward, e.g. "
                        "objective.rewards=[field_accuracy] or [my_module:my_reward].")
    rewards = []
    for spec in specs:
        try:
            name, weight, options = parse_spec(spec)
        except ValueError as e:
            raise UserError(f"objective.rewards: {e}") from None
        if name in BUILT_INS:
            function = BUILT_INS[name]
        else:
            try:
                function = load(name)
            except UserError as e:
                raise UserError(str(e).replace("eval.metrics", "objective.rewards").replace("metric", "reward"))
        short = name.rpartition(":")[2]
        rewards.append(Reward(short, partial(function, **options) if options else function, weight))
    names = [r.name for r in rewards]
    if len(set(names)) < len(names):
        raise UserError(f"objective.rewards: two rewards are named alike ({', '.join(names)}); each is logged "
                        "under its function's name, so list each function once.")
    return rewards


def call_reward(reward: Reward, prompts: list, completions: list, columns: dict[str, list]) -> list[float]:
    """One reward's values for the completions, checked: one finite float per completion."""
    try:
        values = reward.function(prompts=prompts, completions=completions, **columns)
    except TypeError as e:
        raise UserError(f"reward {reward.name}: the call failed with {e}. A reward takes (prompts, completions, "
                        f"**columns); the data's other columns are {', '.join(columns) or 'none'}.") from None
    if not isinstance(values, (list, tuple)) and not hasattr(values, "tolist"):
        raise UserError(f"reward {reward.name} returned {values!r} ({type(values).__name__}); it must return a list "
                        f"of {len(completions)} floats, one per completion.")
    values = values.tolist() if hasattr(values, "tolist") else list(values)
    if len(values) != len(completions):
        raise UserError(f"reward {reward.name} returned {len(values)} values for {len(completions)} completions; "
                        "it must return one float per completion.")
    out = []
    for i, v in enumerate(values):
        if not isinstance(v, numbers.Real) or not math.isfinite(v):  # bools count as 0 and 1
            raise UserError(f"reward {reward.name} returned {v!r} for completion {i} (prompt {prompts[i]!r:.80}); "
                            "every value must be a finite number (no None, NaN or inf).")
        out.append(float(v))
    return out


def score(rewards: list[Reward], prompts: list, completions: list, columns: dict[str, list]):
    """(each reward's values (K, B) float64, the weighted sum (B,) float64)."""
    import torch

    per_reward = torch.tensor([call_reward(r, prompts, completions, columns) for r in rewards],
                              dtype=torch.float64).reshape(len(rewards), len(completions))
    weights = torch.tensor([r.weight for r in rewards], dtype=torch.float64)
    return per_reward, (weights[:, None] * per_reward).sum(0)
