"""`tunesmith export`: a model, or a base with an adapter, to one GGUF file for llama.cpp and Ollama
(docs/export.md)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from tunesmith.commands.infer import BaseQuantization
from tunesmith.commands.options import add_section_options, resolve_options
from tunesmith.config import ModelConfig, Section
from tunesmith.errors import UserError

log = logging.getLogger(__name__)


class ExportConfig(Section):
    """`tunesmith export` (file section `export:`)."""

    model: str | None = Field(None, description="Model name, folder or .gguf to export; with --adapter, its base "
                              "(unset: the base the adapter records).")
    adapter: str | None = Field(None, description="Adapter folder: merged into its base before export (QLoRA into "
                                "the dequantized 4-bit base it was trained on), or alone with --format gguf-lora.")
    format: Literal["gguf", "gguf-lora"] = Field(
        "gguf", description="gguf: the whole model in one file; gguf-lora: a LoRA adapter alone, which llama.cpp "
        "applies to its base file (--lora).")
    type: Literal["f32", "f16", "q8_0", "q4_1", "q4_0"] = Field(
        "f16", description="Weight type of the 2-D weights (norms stay f32); gguf-lora: f32 or f16.")
    out: str = Field(description="Output .gguf file; a Modelfile for Ollama is written beside a whole model.")
    quantization: BaseQuantization = Field(
        "auto", description="QLoRA adapters: merge into the base quantized as in training, then dequantized (auto: "
        "as the run's config.yaml says); none: the float base.")

    @model_validator(mode="after")
    def _something_to_export(self) -> "ExportConfig":
        if self.model is None and self.adapter is None:
            raise ValueError("name what to export: --model DIR, or --adapter DIR (with its base)")
        if self.format == "gguf-lora" and self.adapter is None:
            raise ValueError("--format gguf-lora writes an adapter: give --adapter DIR")
        if not self.out.endswith(".gguf"):
            raise ValueError(f"--out {self.out!r}: the output is one file ending in .gguf")
        return self


def register(subparsers) -> None:
    p = subparsers.add_parser("export", help="write a model (or base + adapter) as GGUF for llama.cpp and Ollama",
                              description="Write a Llama-family model, or a base with an adapter merged in, as one "
                              "GGUF file (f32, f16, q8_0, q4_1, q4_0) with its tokenizer and chat template, and an Ollama "
                              "Modelfile beside it; or a LoRA adapter alone as a GGUF LoRA file. See docs/export.md.")
    add_section_options(p, "export", ExportConfig)
    p.set_defaults(run=_run_export)


def _run_export(args: argparse.Namespace) -> None:
    export(resolve_options(args))


def export(o: ExportConfig) -> Path:
    from tunesmith.export.gguf import export_gguf
    from tunesmith.export.ollama import write_modelfile

    out = Path(o.out)
    if o.format == "gguf-lora":
        return export_lora(o, out)
    if o.adapter is not None:
        from tunesmith.commands.artifacts import merged_model

        model, tokenizer = merged_model(o.adapter, o.model, o.quantization)
    else:
        from tunesmith.models.loading import load_model_and_tokenizer

        model, tokenizer = load_model_and_tokenizer(ModelConfig(name_or_path=o.model))
    export_gguf(model, tokenizer, out, o.type)
    modelfile = write_modelfile(tokenizer, out)
    print(f"{o.type} GGUF written to {out} ({out.stat().st_size / 2**20:.1f} MiB); Ollama: {modelfile}")
    return out


def export_lora(o: ExportConfig, out: Path) -> Path:
    from transformers import AutoConfig

    from tunesmith.export.gguf_lora import export_gguf_lora
    from tunesmith.methods.registry import artifact_base_model
    from tunesmith.models.loading import resolve_model_folder

    base = o.model or artifact_base_model(Path(o.adapter))
    if not base:
        raise UserError(f"The adapter in {o.adapter!r} names no base model; pass --model.")
    config = AutoConfig.from_pretrained(resolve_model_folder(ModelConfig(name_or_path=base)))
    export_gguf_lora(Path(o.adapter), config, out, o.type)
    print(f"GGUF LoRA written to {out}; with llama.cpp: llama-cli -m BASE.gguf --lora {out}")
    return out
