"""The run configuration: one typed schema, loaded from YAML plus `section.key=value` overrides.

The schema below is the single source of truth for every option: its type, its default and
its documentation. The CLI's `--help`, the docs and the saved `config.yaml` all come from it.
Validation happens before anything heavy starts, and every problem names the key, the bad
value and what is allowed.
"""

from __future__ import annotations

import reprlib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from tunesmith.errors import UserError
from tunesmith.files import read_yaml
from tunesmith.methods.registry import METHODS, get_method
from tunesmith.objectives.config import ObjectiveConfig
from tunesmith.objectives.registry import OBJECTIVES, get_objective
from tunesmith.section import Section

DEFAULT_MODEL = "smollm2-135m-instruct"


class ModelConfig(Section):
    name_or_path: str = Field(
        DEFAULT_MODEL,
        description="Built-in name (smollm2-135m-instruct), a local Hugging Face folder, a .gguf file, "
        "or a hub id already in the local cache.",
    )
    gguf_file: str | None = Field(None, description="GGUF file name inside name_or_path, when it is a folder.")
    trust_remote_code: bool = Field(False, description="Run model code shipped with the checkpoint (off by default).")
    allow_pickle: bool = Field(
        False,
        description="Accept a model folder with only pickle weights (.bin, .pt). Unpickling can run arbitrary code, "
        "so they are read only with torch.load(weights_only=True), which admits tensors and plain containers.",
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Weight and compute dtype; auto is float32 on CPU and bfloat16 on CUDA."
    )
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="Where to train; auto picks CUDA when present.")
    quantization: Literal["none", "nf4", "fp4", "int8"] = Field(
        "none", description="QLoRA: store the frozen linear layers of the transformer blocks in 4-bit NF4 or FP4, or "
        "8-bit, with bitsandbytes (docs/qlora.md); embeddings, norms and the output head keep model.dtype.",
    )
    double_quant: bool = Field(
        True, description="nf4/fp4: quantize the quantization scales too (4.127 instead of 4.5 bits per weight)."
    )
    compute_dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Dtype quantized layers dequantize to and multiply in; auto is float32 on CPU and "
        "bfloat16 on CUDA.",
    )


class MethodConfig(Section):
    name: str = Field(
        "lora",
        description=f"Adaptation method, one of {', '.join(METHODS)} (docs/methods/ has each one's math, options "
        "and a side-by-side run).",
    )
    r: int = Field(16, ge=1, description="LoRA rank: the inner dimension of B A (VeRA: of its shared projections).")
    alpha: float = Field(32.0, gt=0, description="LoRA scaling numerator: the update is (alpha/r) B A x.")
    dropout: float = Field(0.05, ge=0.0, lt=1.0, description="Dropout on the adapter input.")
    rslora: bool = Field(False, description="Rank-stabilised scaling alpha/sqrt(r) instead of alpha/r.")
    lora_plus_ratio: float | None = Field(
        None, gt=0, description="LoRA+: B's learning rate is this many times A's (the paper suggests 16); unset is off."
    )
    target_modules: str | list[str] = Field(
        "all-linear",
        description="Which linear layers get adapters: all-linear (every linear layer but the output head), "
        "a list of module-name suffixes (e.g. [q_proj, v_proj]), or a regex matched against full module names. "
        "Plain lora also adapts an embedding table named in a list or regex (e.g. embed_tokens, word_embeddings), "
        "as PEFT does.",
    )
    trainable_blocks: int = Field(2, ge=0, description="freeze: how many of the last transformer blocks train.")
    trainable_modules: list[str] = Field(
        default_factory=list,
        description="freeze: more modules that train, by full name or name suffix (e.g. [norm, lm_head]).",
    )
    vera_seed: int = Field(0, description="vera: seed of the shared random projections (peft's projection_prng_key).")
    vera_d_init: float = Field(0.1, description="vera: initial value of every entry of the scaling vector d.")
    delta_lambda: float = Field(
        0.5, ge=0, description="delta_lora: after each step W moves by delta_lambda times the change of (alpha/r) B A."
    )
    delta_start_step: int = Field(
        0, ge=0, description="delta_lora: warm-up, the paper's K: the first this many optimizer steps train A and B "
        "as plain LoRA and leave W alone; W follows the change of (alpha/r) B A from then on.",
    )
    adapter_size: int = Field(64, ge=1, description="adapter: bottleneck width of each adapter.")
    peft_config: dict[str, Any] | None = Field(
        None, description="peft: the peft config as a mapping with its peft_type, e.g. {peft_type: IA3, "
        "target_modules: [k_proj, v_proj, down_proj], feedforward_modules: [down_proj]}.",
    )

    @field_validator("name")
    @classmethod
    def _known_method(cls, name: str) -> str:
        if name not in METHODS:
            raise ValueError(f"unknown method {name!r}; known: {', '.join(METHODS)}")
        return name

    @model_validator(mode="after")
    def _options_fit_method(self) -> "MethodConfig":
        if self.lora_plus_ratio and not get_method(self.name).uses_lora_plus:
            lora_plus = [n for n in METHODS if get_method(n).uses_lora_plus]
            raise ValueError(f"method.lora_plus_ratio applies to {', '.join(lora_plus)}, not to {self.name}")
        if self.name == "peft" and not (self.peft_config and self.peft_config.get("peft_type")):
            raise ValueError("method.name=peft needs method.peft_config with a peft_type (e.g. {peft_type: IA3, ...})")
        return self



class DataConfig(Section):
    train: str | None = Field(None, description="Training file (.jsonl, .json, .csv, .parquet).")
    validation: str | None = Field(None, description="Validation file; if unset, val_split of train is held out.")
    test: str | None = Field(None, description="Test file for the before/after task evaluation.")
    format: Literal["auto", "text", "alpaca", "prompt_completion", "messages", "preference", "unpaired",
                    "prompt"] = Field(
        "auto", description="Row format; auto detects it from the fields of the first row."
    )
    max_seq_len: int = Field(512, ge=8, description="Longer sequences are truncated (and counted).")
    val_split: float = Field(0.1, ge=0.0, lt=1.0, description="Share of train held out when no validation file is given.")
    packing: bool = Field(
        True,
        description="Padding-free training: pack each micro-batch's rows into sequences of up to max_seq_len tokens, "
        "each sample isolated by restarting position ids and attending only to itself (same loss, no compute on "
        "padding; measured speed-up in docs/speed.md). false: right-padded batches.",
    )
    train_on_prompt: bool = Field(False, description="Also train on system/user/prompt tokens (default: completions only).")
    system_prompt: str | None = Field(None, description="System message added to rows that have none.")
    group_by_length: bool = Field(
        False,
        description="Without packing: put rows of similar length in the same micro-batch, so less compute goes to "
        "padding (each run of 50 micro-batches is sorted by length, then their order shuffled by the seed; resume "
        "stays exact). Off by default: a step then sees rows of similar length, not a uniform sample.",
    )
    cache: bool = Field(
        True,
        description="Keep the tokenised examples on disk (Arrow, in $TUNESMITH_CACHE/data, default "
        "~/.cache/tunesmith/data), so the next run with the same files, tokenizer and data options skips tokenising.",
    )

    @model_validator(mode="after")
    def _grouping_needs_padding(self) -> "DataConfig":
        if self.group_by_length and self.packing:
            raise ValueError("data.group_by_length applies to padded batches, but data.packing=true leaves no padding "
                             "to save; set one of them to false")
        return self


class TrainConfig(Section):
    max_steps: int = Field(0, ge=0, description="Optimizer steps to run; 0 means run train.epochs epochs.")
    epochs: float = Field(1.0, gt=0, description="Passes over the training data when max_steps is 0.")
    batch_size: int = Field(8, ge=1, description="Rows per micro-batch, per process under torchrun (the global "
                            "micro-batch is batch_size times the number of processes; docs/distributed.md).")
    grad_accum: int = Field(1, ge=1, description="Micro-batches accumulated per optimizer step.")
    lr: float = Field(3e-4, gt=0, description="Peak learning rate.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    optimizer: Literal["adamw", "adamw_8bit", "paged_adamw_8bit"] = Field(
        "adamw", description="adamw (torch); adamw_8bit or paged_adamw_8bit (bitsandbytes: 8-bit moments, a "
        "quarter of AdamW's state; paged also moves it out of GPU memory under pressure). Where bitsandbytes cannot "
        "run them: torch AdamW, with a logged message.",
    )
    warmup_steps: int = Field(0, ge=0, description="Linear warmup steps from 0 to lr.")
    schedule: Literal["cosine", "linear", "constant"] = Field("cosine", description="Decay after warmup.")
    max_grad_norm: float = Field(1.0, ge=0, description="Gradient clipping by global norm; 0 turns it off.")
    save_every: int = Field(0, ge=0, description="Checkpoint every N steps (0: only at the end).")
    eval_every: int = Field(0, ge=0, description="Validation loss every N steps (0: only at the end).")
    log_every: int = Field(1, ge=1, description="Write metrics.jsonl every N steps.")
    seed: int = Field(0, description="Seed for initialisation, shuffling and dropout.")
    resume: bool = Field(False, description="Continue from the newest complete checkpoint in output.dir.")
    max_bad_steps: int = Field(5, ge=1, description="Abort after this many non-finite steps in a row.")
    keep_checkpoints: int = Field(2, ge=1, description="Keep only the newest N checkpoints.")
    gradient_checkpointing: bool | Literal["auto"] = Field(
        "auto",
        description="Activation checkpointing: each decoder layer keeps only its input and recomputes the rest in "
        "backward, so far less memory is kept for backward at the cost of one more forward per layer (measured in "
        "docs/speed.md); same gradients. auto: on over a quantized base (model.quantization, QLoRA: a run chosen "
        "for memory, as peft's prepare_model_for_kbit_training and the QLoRA paper do), off otherwise.",
    )
    compile: bool = Field(
        False,
        description="torch.compile each decoder layer (dynamic shapes; the first step pays the compile time), "
        "same results. On the CPU it pays off only with method.dropout=0: adapter dropout's CPU masks cannot be "
        "compiled (measured in docs/speed.md).",
    )
    threads: int = Field(
        0, ge=0, description="CPU threads for torch; 0: OMP_NUM_THREADS if set, else the CPUs this process may use "
        "(affinity and cgroup quota) divided by the processes on the node.",
    )
    report_to: list[Literal["tensorboard", "mlflow", "wandb"]] = Field(
        default_factory=lambda: ["tensorboard"],
        description="Loggers fed what metrics.jsonl gets, plus the config and the test scores (docs/evaluation.md): "
        "tensorboard (event files in <output.dir>/tensorboard), mlflow (a local store in <output.dir>/mlflow.db unless "
        "MLFLOW_TRACKING_URI is set), wandb (offline unless WANDB_MODE is set); mlflow and wandb need their package "
        "installed. []: metrics.jsonl alone.",
    )

    @field_validator("report_to", mode="before")
    @classmethod
    def _one_name_is_a_list(cls, names: Any) -> Any:
        return [names] if isinstance(names, str) else names  # train.report_to=tensorboard

    @field_validator("report_to")
    @classmethod
    def _once_each(cls, names: list[str]) -> list[str]:
        if len(set(names)) < len(names):
            raise ValueError(f"a logger is listed twice in {names}")
        return names


class EvalConfig(Section):
    before_after: bool = Field(True, description="Score the test split before and after training.")
    max_new_tokens: int = Field(96, ge=1, description="Generation budget per test row.")
    batch_size: int = Field(16, ge=1, description="Rows generated at once.")
    max_samples: int = Field(0, ge=0, description="Score at most this many test rows (0: all).")
    metrics: list[str] = Field(
        default_factory=list,
        description="Task metrics of the test split (docs/evaluation.md): exact_match, contains, token_f1, "
        "rouge_l, bleu, chrf, json_valid (or valid_json), json_fields (or field_accuracy), regex, perplexity, "
        "log_likelihood, or module:function for your own. Empty: by the data, JSON-object answers (the demo task) "
        "get exact_match, valid_json, field_accuracy; any others exact_match, token_f1, perplexity.",
    )
    normalize: list[Literal["case", "whitespace", "punctuation", "articles"]] = Field(
        default_factory=list, description="exact_match and contains compare answers after these steps (all four: "
        "SQuAD's normalisation); none: only surrounding whitespace is ignored.",
    )
    regex: str | None = Field(None, description="The pattern of the regex metric (Python re, searched).")
    temperature: float = Field(0.0, ge=0, description="0: greedy answers; above 0: sampled at this temperature.")
    top_p: float = Field(1.0, gt=0, le=1, description="Sampling only: keep the smallest set of tokens whose "
                         "probability reaches top_p (nucleus sampling); 1: all.")
    seed: int = Field(0, description="Seed of sampled answers and of the bootstrap resamples.")
    bootstrap: int = Field(1000, ge=0, description="Bootstrap resamples of the test rows for the 95% intervals and "
                           "the paired before/after differences; 0: no intervals.")
    examples: int = Field(3, ge=0, description="report.md lists this many best and as many worst test rows.")

    @field_validator("metrics")
    @classmethod
    def _known_metrics(cls, names: list[str]) -> list[str]:
        from tunesmith.evaluate.metrics import canonical_name, check_name

        for name in names:
            check_name(name)
        canonical = [canonical_name(n) for n in names]
        if len(set(canonical)) < len(canonical):
            raise ValueError(f"a metric is listed twice in {names}")
        return names

    @model_validator(mode="after")
    def _options_fit(self) -> "EvalConfig":
        import re

        if "regex" in self.metrics and not self.regex:
            raise ValueError("the regex metric needs its pattern: set eval.regex (e.g. eval.regex='answer: (\\S+)')")
        if self.regex is not None:
            try:
                re.compile(self.regex)
            except re.error as e:
                raise ValueError(f"eval.regex={self.regex!r} is not a valid Python regular expression: {e}") from None
        if self.top_p < 1 and self.temperature == 0:
            raise ValueError("eval.top_p applies to sampled answers; set eval.temperature above 0 too")
        return self


class OutputConfig(Section):
    dir: str = Field("runs/latest", description="Run directory: config, metrics, checkpoints, adapter, report.")


class Config(Section):
    model: ModelConfig = Field(default_factory=ModelConfig)
    method: MethodConfig = Field(default_factory=MethodConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    objective: ObjectiveConfig = Field(default_factory=ObjectiveConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)

    @model_validator(mode="after")
    def _objective_matches_format(self) -> "Config":
        fmt, name = self.data.format, self.objective.name
        if fmt != "auto" and name != "auto" and fmt not in get_objective(name).formats:
            fitting = [n for n in OBJECTIVES if fmt in get_objective(n).formats]
            raise ValueError(f"objective.name={name} learns from {', '.join(get_objective(name).formats)} rows, "
                             f"but data.format is {fmt}; use {' or '.join(fitting) or 'other data'}")
        return self

    @model_validator(mode="after")
    def _method_fits_quantized_base(self) -> "Config":
        why = get_method(self.method.name).not_on_quantized_base
        if self.model.quantization != "none" and why:
            able = [n for n in METHODS if not get_method(n).not_on_quantized_base]
            raise ValueError(f"method.name={self.method.name} cannot train on a quantized base (model.quantization="
                             f"{self.model.quantization}): {why}. Use one of {', '.join(able)}, "
                             "or model.quantization=none (docs/qlora.md)")
        return self

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


# ---------------------------------------------------------------------------------------------
# Loading, overrides and error messages


def parse_override(text: str) -> tuple[list[str], Any]:
    """`train.lr=1e-4` -> (["train", "lr"], 1e-4). Values are parsed as YAML scalars/lists."""
    if "=" not in text:
        raise UserError(f"Override {text!r} is not of the form section.key=value (e.g. train.max_steps=40).")
    key, raw = text.split("=", 1)
    path = key.strip().split(".")
    if len(path) < 2 or not all(path):
        raise UserError(f"Override key {key!r} must name a section and a key, e.g. train.lr=1e-4.")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except (yaml.YAMLError, ValueError, RecursionError):  # ValueError: a date like 2024-13-45
        value = raw  # not valid YAML: take it as a plain string and let the schema judge it
    return path, value


def apply_override(tree: dict[str, Any], path: list[str], value: Any) -> None:
    node = tree
    for part in path[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise UserError(f"Override {'.'.join(path)}: {part!r} is a value, not a section.")
        node = child
    node[path[-1]] = value


def build_config(tree: dict[str, Any], source: str = "config") -> Config:
    """Validate a plain dict into a Config, turning pydantic's errors into one UserError."""
    try:
        return Config.model_validate(tree)
    except ValidationError as e:
        raise UserError(format_validation_error(e, source)) from None


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    tree = read_yaml(path) if path else {}
    for text in overrides:
        key_path, value = parse_override(text)
        apply_override(tree, key_path, value)
    return build_config(tree, str(path) if path else "command line")


def format_validation_error(error: ValidationError, source: str, root: type[BaseModel] | None = None) -> str:
    """One line per problem; `root` is the schema validated (default Config; embed train passes its own)."""
    lines = [f"Invalid configuration in {source}:"]
    for item in error.errors():
        key = ".".join(str(p) for p in item["loc"]) or "(top level)"
        if item["type"] == "extra_forbidden":
            lines.append(f"  - unknown key {key!r}; allowed here: {', '.join(_allowed_keys(item['loc'], root))}")
            continue
        value = item.get("input")
        shown = "" if isinstance(value, dict) else f" (got {_SHORT.repr(value)[:300]})"
        lines.append(f"  - {key}: {item['msg']}{shown}")
    return "\n".join(lines)


# Bounded reprs: a value may be a 2 MB string or a YAML alias bomb that expands exponentially.
_SHORT = reprlib.Repr()  # keyword arguments need Python 3.12
_SHORT.maxstring, _SHORT.maxother, _SHORT.maxlevel, _SHORT.maxlist, _SHORT.maxdict = 200, 200, 2, 6, 6


def _allowed_keys(loc: tuple, root: type[BaseModel] | None = None) -> list[str]:
    model: type[BaseModel] = root or Config
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        annotation = getattr(field, "annotation", None)
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            break
        model = annotation
    return sorted(model.model_fields)


def save_config(config: Config, path: str | Path) -> None:
    from tunesmith.files import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(config.to_dict(), sort_keys=False))
