"""The `tunesmith embed train` configuration: one typed schema, as config.py is for language models.

The sections mirror the LLM run's (model, method, data, objective, train, eval, output) and reuse its
method and train sections, so the loop, the methods, checkpoints and resume run unchanged; `--help`, the
saved config.yaml and docs/embeddings.md come from the field descriptions below. Nothing here imports torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from tunesmith.config import (MethodConfig, OutputConfig, Section, TrainConfig, apply_override,
                              format_validation_error, parse_override)
from tunesmith.errors import UserError
from tunesmith.files import read_yaml

DEFAULT_ENCODER = "all-minilm-l6-v2"  # = embed.encoder.DEFAULT_ENCODER, without importing torch


class EncoderModelConfig(Section):
    name_or_path: str = Field(DEFAULT_ENCODER, description="Encoder to fine-tune: the built-in all-minilm-l6-v2 or a "
                              "local sentence-transformers or transformers folder (nothing is downloaded).")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="Where to train; auto picks CUDA when present.")

    @property
    def quantization(self) -> str:
        """Encoders train unquantized (the loop asks, for train.gradient_checkpointing=auto)."""
        return "none"


class EmbedDataConfig(Section):
    train: str | None = Field(None, description="Training pairs: .jsonl, .json, .csv or .parquet with query, "
                              "positive, optional negative(s) and doc_id (docs/embeddings.md); or a folder of .txt, "
                              ".md or .html documents, given questions by the template generator (embed pairs).")
    validation: str | None = Field(None, description="Held-out pairs file or BEIR folder that picks the best "
                                   "checkpoint (NDCG@10); unset: data.val_split of the training documents.")
    test: str | None = Field(None, description="Pairs file or BEIR folder scored before and after training; unset: "
                             "data.test_split of the training documents.")
    val_split: float = Field(0.1, ge=0.0, lt=1.0, description="Share of the training pairs held out for validation "
                             "when data.validation is unset, whole documents at a time.")
    test_split: float = Field(0.0, ge=0.0, lt=1.0, description="Share of the training pairs held out as the test set "
                              "when data.test is unset, whole documents at a time (0: no before/after scores).")
    max_seq_len: int | None = Field(None, ge=8, description="Tokens per text; unset: the encoder's own max_seq_length.")
    chunk_size: int = Field(120, ge=8, description="Documents folder as data.train: words per chunk.")
    chunk_overlap: int = Field(20, ge=0, description="Documents folder as data.train: words shared by neighbouring "
                               "chunks.")

    @property
    def packing(self) -> bool:  # the loop asks: contrastive batches are never packed
        return False

    @property
    def group_by_length(self) -> bool:
        return False


class EmbedObjectiveConfig(Section):
    name: Literal["contrastive"] = Field("contrastive", description="contrastive: multiple-negatives ranking "
                                         "(InfoNCE over in-batch and given hard negatives; docs/embeddings.md).")
    scale: float = Field(20.0, gt=0, description="s in softmax(s * cos): 1 / temperature (20 as sentence-transformers).")
    mask_same_document: bool = Field(True, description="Mask passages of a query's own document out of its negatives "
                                     "(no false negatives); false: plain MultipleNegativesRankingLoss.")
    cached: bool = Field(False, description="GradCache: the same loss and gradients, embedding chunk_size texts at a "
                         "time, so a large train.batch_size fits in bounded memory (one more forward).")
    chunk_size: int = Field(32, ge=1, description="cached: texts embedded per forward.")
    matryoshka_dims: list[int] = Field(default_factory=list, description="Matryoshka: the loss summed over embeddings "
                                       "cut to each of these leading dimensions and renormalised, e.g. [384, 256, "
                                       "128, 64]; the evaluation then reports each dimension. []: off.")

    @field_validator("matryoshka_dims")
    @classmethod
    def _dims_distinct_positive(cls, dims: list[int]) -> list[int]:
        if any(d < 1 for d in dims) or len(set(dims)) < len(dims):
            raise ValueError(f"matryoshka_dims must be distinct positive dimensions (got {dims})")
        return sorted(dims, reverse=True)


class EmbedEvalConfig(Section):
    before_after: bool = Field(True, description="Score the test set with the base encoder too, and the difference.")
    batch_size: int = Field(64, ge=1, description="Texts per forward when encoding for evaluation.")
    bootstrap: int = Field(1000, ge=0, description="Bootstrap resamples of the test queries for the 95% intervals "
                           "and the paired difference; 0: none.")
    seed: int = Field(0, description="Seed of the bootstrap resamples.")
    select_best: bool = Field(True, description="Keep the checkpoint with the best validation NDCG@10 (validated every "
                              "train.eval_every steps and at the end) as the final model, not simply the last one.")
    export_if_worse: bool = Field(False, description="Export the tuned model as <output.dir>/model even when it scores "
                                  "below its base on the test set's NDCG@10 (off: it is reported and not exported).")


class EmbedTrainConfig(TrainConfig):
    batch_size: int = Field(32, ge=1, description="Queries per micro-batch: each query's negatives are the other "
                            "passages of the batch, so larger batches give harder training (objective.cached bounds "
                            "the memory).")
    lr: float = Field(5e-5, gt=0, description="Peak learning rate (full fine-tuning wants ~2e-5 to 1e-4, LoRA ~1e-3).")
    warmup_steps: int = Field(10, ge=0, description="Linear warmup steps from 0 to lr.")
    report_to: list[Literal["tensorboard", "mlflow", "wandb"]] = Field(
        default_factory=list, description="Loggers fed what metrics.jsonl gets (as tunesmith train): tensorboard, "
        "mlflow, wandb. []: metrics.jsonl alone.")


class EmbedConfig(Section):
    model: EncoderModelConfig = Field(default_factory=EncoderModelConfig)
    method: MethodConfig = Field(default_factory=MethodConfig)
    data: EmbedDataConfig = Field(default_factory=EmbedDataConfig)
    objective: EmbedObjectiveConfig = Field(default_factory=EmbedObjectiveConfig)
    train: EmbedTrainConfig = Field(default_factory=EmbedTrainConfig)
    eval: EmbedEvalConfig = Field(default_factory=EmbedEvalConfig)
    output: OutputConfig = Field(default_factory=lambda: OutputConfig(dir="runs/embed"))

    @model_validator(mode="after")
    def _supported(self) -> "EmbedConfig":
        if self.train.gradient_checkpointing is True or self.train.compile:
            raise ValueError("train.gradient_checkpointing and train.compile apply to decoder LLMs; embed train runs "
                             "encoders without them (objective.cached bounds memory instead)")
        if self.method.name == "peft" or self.model.quantization != "none":
            raise ValueError("method.name=peft is not supported by embed train; use full, lora, dora, ...")
        return self

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


def load_embed_config(path: str | Path | None, overrides: list[str] = ()) -> EmbedConfig:
    """YAML file (or nothing) plus `section.key=value` overrides -> a validated EmbedConfig."""
    tree = read_yaml(path) if path else {}
    for text in overrides:
        key_path, value = parse_override(text)
        apply_override(tree, key_path, value)
    try:
        return EmbedConfig.model_validate(tree)
    except ValidationError as e:
        raise UserError(format_validation_error(e, str(path) if path else "command line", EmbedConfig)) from None
