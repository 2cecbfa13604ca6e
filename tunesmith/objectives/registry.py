"""Every training objective behind one small interface, chosen by `objective.name`.

The data pipeline and the loop know no objective by name. An objective says:

    formats                       the data formats (data.format) whose rows it can learn from
    encode(fields, fmt, tok, cfg) one validated row -> an example (a dict of lists; `truncated`
                                  says whether it was cut to data.max_seq_len)
    keeps(example)                whether an encoded example has anything to learn from
    collate(examples, pad, pack)  examples -> one micro-batch of tensors (pack > 0: padding-free
                                  rows of at most that many tokens, if the objective packs)
    unit, units(batch)            what the loss is normalised by (labelled tokens, pairs,
                                  sequences) and how many a collated batch holds; counted before
                                  the forward, so a window's loss is its sum / its units
    filler(example)               an example like this one that adds no loss and a zero gradient
                                  (a process left without a row still runs forward and backward)
    loss(model, batch)            (sum of the loss over the batch's units, units, {metric: sum});
                                  the metric sums are divided by the window's units too and go to
                                  metrics.jsonl and the progress bar under the names in `metrics`
    rollout(model, window, step, generator)
                                  optional: replaces the window by the model's own samples (online
                                  RL). `generator` is seeded from (train.seed, step), so a resumed
                                  run samples exactly what the uninterrupted one did
    score(model, examples, ...)   held-out scoring: {"val_loss": ..., "val_<metric>": ...}
    configure(cfg, method)        optional: the objective with objective.* options and the method's
                                  `disable` (the reference model of DPO and its relatives) bound in
    check_step(metrics)           optional: a warning about a step's mean metrics (DPO's likelihood
                                  displacement), logged the first time it is given
    prepare(model, data, ...)     optional: runs once on the base model before the method is applied
                                  (DPO's precomputed reference log-probabilities)
    before_window(model, window)  optional: the window's micro-batches, completed from forwards without
                                  gradient over all of them before any loss (KTO's z0 over the window
                                  and all processes); also run on the validation batches, as one window.
                                  `model` is what the loss runs through: forward with
                                  distributed.run_through, the same number of times on every process
    add_head(model, cfg)          optional: after the method is applied, adds the objective's own trainable
                                  head to the model (reward: a scalar score on the last answer token)
    test_score(model, tok, cfg)   optional: the test split's scores, instead of generating answers and
                                  scoring them (reward: pair accuracy)
    export(model, method, ...)    optional: an artifact of the objective's own, written after training
                                  beside the method's (reward: an AutoModelForSequenceClassification folder)
    bind_run(cfg, tok, run_dir, data)
                                  optional: the configured objective bound to the run, after configure:
                                  what its rollout needs beyond the model (GRPO: the tokenizer to decode
                                  samples for the rewards, the rows they score, output.dir for its buffer)
    carry                         optional: what the objective carries between steps (online RL: reward
                                  call counters, the no-signal warning's streak; tunesmith/rl/carry.py), an
                                  object with state_dict() -> a JSON-able dict and load_state_dict(dict):
                                  saved in every checkpoint and restored on resume

Adding an objective is one file that defines `OBJECTIVE = Objective(...)` and one line in
OBJECTIVES below (name -> module); objective.name accepts it from then on. `auto` picks one by the
data format (AUTO_BY_FORMAT).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable

from tunesmith.errors import UserError

# name -> the module that defines OBJECTIVE. Imported on first use: reading a config needs no torch.
OBJECTIVES: dict[str, str] = {
    "sft": "tunesmith.objectives.sft",
    "causal_lm": "tunesmith.objectives.causal_lm",
    "dpo": "tunesmith.objectives.dpo",
    "orpo": "tunesmith.objectives.orpo",
    "simpo": "tunesmith.objectives.simpo",
    "kto": "tunesmith.objectives.kto",
    "reward": "tunesmith.objectives.reward",
    "ppo": "tunesmith.objectives.ppo",
    "grpo": "tunesmith.objectives.grpo",
}

# objective.name=auto: the objective for each data format.
AUTO_BY_FORMAT = {"text": "causal_lm", "alpaca": "sft", "prompt_completion": "sft", "messages": "sft",
                  "preference": "dpo", "unpaired": "kto", "prompt": "grpo"}

LossOutput = tuple[Any, int, dict[str, Any]]  # (loss summed over units, units, {metric: summed over units})


@dataclass(frozen=True)
class Objective:
    name: str
    formats: tuple[str, ...]
    unit: str
    encode: Callable[..., dict]
    keeps: Callable[[dict], bool]
    collate: Callable[[list[dict], int, int], dict]
    units: Callable[[dict], int]
    filler: Callable[[dict], dict]
    loss: Callable[..., LossOutput]
    metrics: tuple[str, ...] = ()
    packs: bool = True
    rollout: Callable[..., list[dict]] | None = None
    score: Callable[..., dict] | None = None  # None: the mean loss and metrics (train/validate.py)
    configure: Callable[..., "Objective"] | None = None  # (objective config, method) -> the objective as run
    check_step: Callable[[dict], str | None] | None = None  # a step's mean metrics -> a warning, or None
    prepare: Callable[..., None] | None = None  # (base model, data, cfg, run_dir, pad_id, method): once, before
                                               # the method is applied (e.g. reference log-probabilities)
    before_window: Callable[..., list[dict]] | None = None  # (model, window) -> window, before its losses
    add_head: Callable[..., None] | None = None  # (model, cfg): the objective's trainable head, after the method
    test_score: Callable[..., dict] | None = None  # (model, tokenizer, cfg) -> test scores, instead of generating
    export: Callable[..., None] | None = None  # (model, method, cfg, run_dir, tokenizer): its own artifact
    bind_run: Callable[..., "Objective"] | None = None  # (cfg, tokenizer, run_dir, data) -> the objective as run
    carry: Any = None  # state_dict() / load_state_dict(dict): saved in checkpoints (rl/carry.py)

    def configured(self, cfg, method=None) -> "Objective":
        """This objective with the run's options (objective.beta, ...) and the method's reference switch bound
        into its loss; objectives without options are returned as they are."""
        return self.configure(cfg, method) if self.configure is not None else self

    def check_format(self, fmt: str, path: str) -> None:
        if fmt not in self.formats:
            raise UserError(f"{path}: objective.name={self.name} learns from {', '.join(self.formats)} rows, "
                            f"but the data format is {fmt}. Choose another objective or other data.")


def known_objectives() -> list[str]:
    return list(OBJECTIVES)


def resolve_name(name: str, data_format: str) -> str:
    """objective.name with `auto` replaced by the objective for the data format."""
    return AUTO_BY_FORMAT.get(data_format, "sft") if name == "auto" else name


def get_objective(name: str) -> Objective:
    if name not in OBJECTIVES:
        raise UserError(f"objective.name={name!r} is not a known objective; known: auto, {', '.join(OBJECTIVES)}.")
    return importlib.import_module(OBJECTIVES[name]).OBJECTIVE


def as_loss_output(out) -> LossOutput:
    """A loss function's result as (sum, units, metrics): plain (sum, units) pairs get no metrics."""
    return out if len(out) == 3 else (out[0], out[1], {})
