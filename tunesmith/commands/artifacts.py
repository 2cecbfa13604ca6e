"""`tunesmith merge` and `tunesmith quantize`: write a model folder that plain transformers loads."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Literal

from pydantic import Field

from tunesmith.commands.infer import BaseQuantization, adapter_base_config
from tunesmith.commands.options import add_section_options, resolve_options
from tunesmith.config import DEFAULT_MODEL, ModelConfig, Section
from tunesmith.errors import UserError

log = logging.getLogger(__name__)


# The options of merge and quantize, as flags or as the `merge:` / `quantize:` section of a --config file.
class MergeConfig(Section):
    """`tunesmith merge` (file section `merge:`)."""

    adapter: str = Field(description="Adapter folder (PEFT format).")
    out: str = Field(description="Output model folder.")
    model: str | None = Field(None, description="Base model; unset: the adapter's base_model_name_or_path.")
    quantization: BaseQuantization = Field(
        "auto", description="QLoRA adapters: quantize the base as in training, then dequantize and merge. auto: "
        "model.quantization of the run's config.yaml beside the adapter folder; none: the float base.",
    )


class QuantizeConfig(Section):
    """`tunesmith quantize` (file section `quantize:`)."""

    model: str = Field(DEFAULT_MODEL, description="Model name, folder or .gguf.")
    out: str = Field(description="Output model folder.")
    bits: Literal[4, 8] = Field(4, description="4 (nf4 or fp4) or 8 (LLM.int8).")
    quant_type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit data type.")
    double_quant: bool = Field(
        True, description="4-bit: quantize the fp32 absmax scales too; false keeps them unquantized."
    )


def register(subparsers) -> None:
    p = subparsers.add_parser("merge", help="merge an adapter into its base, or models by a mergekit recipe "
                              "(merge CONFIG.yaml OUT_DIR)",
                              description="Fold an adapter (any mergeable method) into its base model and save a "
                              "plain transformers folder; a QLoRA adapter is merged into the dequantized base it was "
                              "trained on (docs/qlora.md). With CONFIG.yaml OUT_DIR instead: merge models (linear, "
                              "task_arithmetic, ties, dare_*, breadcrumbs*, della*, slerp, model_stock) by a "
                              "mergekit recipe (docs/merging.md).")
    add_section_options(p, "merge", MergeConfig)
    # `tunesmith merge CONFIG.yaml OUT_DIR`: a mergekit recipe (tunesmith/merge/, docs/merging.md)
    p.add_argument("recipe", nargs="?", metavar="CONFIG.yaml",
                   help="a mergekit-style merge recipe (models, merge_method, parameters, ...); see docs/merging.md")
    p.add_argument("recipe_out", nargs="?", metavar="OUT_DIR", help="with CONFIG.yaml: the output model folder")
    p.add_argument("--random-seed", type=int, default=0,
                   help="with CONFIG.yaml: seed of the random methods (dare_*, della*), as mergekit-yaml's (default 0)")
    p.add_argument("--eval", action="append", default=[], metavar="EVAL.yaml",
                   help="with CONFIG.yaml: score every input and the merge on this config's test split (data.test, "
                   "eval.metrics); repeatable, one held-out set each; table in OUT_DIR/merge_eval.md")
    p.add_argument("--sweep", action="append", default=[], metavar="KEY=V1,V2",
                   help="with --eval: merge once per value (into OUT_DIR/KEY=V) and score each; KEY: weight (the first "
                   "model's share, the rest split 1 - V), density, lambda, t, ... or models.I.KEY; repeatable (every "
                   "combination)")
    p.set_defaults(run=_run_merge)

    p = subparsers.add_parser("quantize", help="write a bitsandbytes 4-bit or 8-bit checkpoint that transformers loads",
                              description="Quantize the linear layers of the transformer blocks with bitsandbytes and "
                              "save a Hugging Face folder (config.json carries the quantization_config). See "
                              "docs/qlora.md.")
    add_section_options(p, "quantize", QuantizeConfig)
    p.set_defaults(run=_run_quantize)


def _run_merge(args: argparse.Namespace) -> None:
    if args.recipe is not None and (args.eval or args.sweep):
        from tunesmith.merge.evaluate import merge_and_evaluate

        if not args.eval or args.recipe_out is None:
            raise UserError("tunesmith merge CONFIG.yaml OUT_DIR --eval EVAL.yaml [--sweep KEY=V1,V2]: --sweep needs "
                            "--eval, and both need the output folder after the config file.")
        merge_and_evaluate(args.recipe, args.recipe_out, args.random_seed, args.eval, args.sweep)
        return None
    if args.recipe is not None:
        from tunesmith.merge.run import run_from_cli

        return run_from_cli(args.recipe, args.recipe_out, args.random_seed)
    if args.eval or args.sweep:
        raise UserError("--eval and --sweep work with a merge recipe: tunesmith merge CONFIG.yaml OUT_DIR --eval "
                        "EVAL.yaml.")
    o: MergeConfig = resolve_options(args)
    merge(o.adapter, o.out, o.model, o.quantization)


def _run_quantize(args: argparse.Namespace) -> None:
    o: QuantizeConfig = resolve_options(args)
    quantize(o.model, o.out, o.bits, o.quant_type, o.double_quant)


def merge(adapter: str, out: str, model_name: str | None, quantization: str = "auto") -> None:
    """Base model + artifact (any method) -> one plain transformers folder (see merged_model), reloaded and checked;
    a QLoRA merge also reports how close it stays to the adapter on its 4-bit base (qlora_merge_report)."""
    from tunesmith.export.check import check_saved_model

    held: dict = {}
    model, tokenizer = merged_model(adapter, model_name, quantization, on_unmerged=held.update)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    check_saved_model(out, model, tokenizer)
    print(f"merged model saved to {out} (reloaded and checked)")
    if held.get("quantized"):
        print(qlora_merge_report(held["reference"], model, tokenizer, adapter, model_name))


def qlora_merge_report(reference, merged, tokenizer, adapter: str, model_name: str | None) -> str:
    """KL(adapter on its 4-bit base || merged model) per token on held-out text, next to the same for a naive merge
    into the original float weights: what merging into the dequantized base saves (docs/qlora.md)."""
    from tunesmith.export.fidelity import compare, held_out_texts, log_probs

    texts = held_out_texts(tokenizer)
    ours = compare(reference, log_probs(merged, tokenizer, texts))
    naive_model, _ = merged_model(adapter, model_name, "none")
    naive = compare(reference, log_probs(naive_model, tokenizer, texts))
    return (f"QLoRA merge, on {len(texts)} held-out demo conversations, against the adapter on its 4-bit base: "
            f"KL {ours['kl']:.2e} nats per token, top-1 agreement {100 * ours['top1']:.2f}% (merged into the "
            f"dequantized base); a merge into the original float weights would give KL {naive['kl']:.2e}, "
            f"{100 * naive['top1']:.2f}%.")


def merged_model(adapter: str, model_name: str | None, quantization: str = "auto", on_unmerged=None):
    """(model, tokenizer): the artifact in `adapter` folded into its base (model_name, else the base it records).
    `on_unmerged(dict)`, if given, gets {"quantized": bool, "reference": log-probabilities of held-out text} of the
    artifact on its base before anything is merged, when the base is quantized (QLoRA).

    A QLoRA adapter was trained against the quantized base, so by default (quantization auto: the
    model.quantization of the run's config.yaml beside the adapter folder) the base is quantized the
    same way, then dequantized to float and the update folded into that (docs/qlora.md)."""
    from tunesmith.methods.registry import artifact_base_model, get_method, load_artifact
    from tunesmith.models.loading import load_model_and_tokenizer

    adapter_dir = Path(adapter)
    if model_name is None:
        model_name = artifact_base_model(adapter_dir)
        if not model_name:
            raise UserError(f"The artifact in {adapter!r} names no base model; pass --model.")
    model_cfg = adapter_base_config(ModelConfig(name_or_path=model_name), adapter_dir, quantization)
    model, tokenizer = load_model_and_tokenizer(model_cfg)
    method = get_method(load_artifact(model, adapter_dir).name)
    if method.merge is None:
        raise UserError(f"{method.name} artifacts cannot be merged into the weights (the adapter is not a weight "
                        "update); use the base model with --adapter instead.")
    if model_cfg.quantization != "none" and on_unmerged is not None:
        from tunesmith.export.fidelity import held_out_texts, log_probs

        on_unmerged({"quantized": True, "reference": log_probs(model, tokenizer, held_out_texts(tokenizer))})
    if model_cfg.quantization != "none":
        from tunesmith.models.quantize import dequantize_model

        log.info("dequantizing the base before merging")
        dequantize_model(model, model.get_input_embeddings().weight.dtype)
    return method.merge(model), tokenizer


def quantize(model_name: str, out: str, bits: int, quant_type: str = "nf4", double_quant: bool = True) -> None:
    """A bitsandbytes 4-bit (nf4/fp4) or 8-bit checkpoint that AutoModelForCausalLM.from_pretrained loads."""
    from tunesmith.export.check import check_saved_model
    from tunesmith.models.loading import load_model_and_tokenizer, resolve_device
    from tunesmith.models.quantize import resolve_compute_dtype, save_quantized

    quantization = "int8" if bits == 8 else quant_type
    cfg = ModelConfig(name_or_path=model_name, quantization=quantization, double_quant=double_quant)
    device = resolve_device(cfg.device)
    model, tokenizer = load_model_and_tokenizer(cfg, device)
    save_quantized(model, tokenizer, out, quantization, double_quant, resolve_compute_dtype(cfg.compute_dtype, device))
    check_saved_model(out, model, tokenizer, quantized=True)
    print(f"{bits}-bit ({quantization}) model saved to {out} (reloaded and checked)")
