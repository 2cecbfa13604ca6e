"""The `tunesmith` command line: one entry point, one subcommand per job.

User errors (bad config, bad data, missing files) print one paragraph and exit with code 2;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from tunesmith.errors import UserError

OVERRIDES_HELP = "section.key=value overrides applied after the YAML, e.g. train.max_steps=40 method.r=8"


def build_parser() -> argparse.ArgumentParser:
    from tunesmith.config import DEFAULT_MODEL, describe_options

    parser = argparse.ArgumentParser(
        prog="tunesmith",
        description="Fine-tune language models on the hardware you have. Start with `tunesmith demo`.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    options = "config keys (YAML sections or dotted overrides):\n" + describe_options()
    fmt = argparse.RawDescriptionHelpFormatter

    p = sub.add_parser("train", help="fine-tune a model from a YAML config", epilog=options, formatter_class=fmt,
                       description="Fine-tune, evaluate before/after, save the adapter, metrics, plots and report.")
    p.add_argument("config", help="YAML config file (sections model, method, data, objective, train, eval, output)")
    p.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)

    p = sub.add_parser("eval", help="score a model (optionally with an adapter) on the test split",
                       epilog=options, formatter_class=fmt)
    p.add_argument("config", help="YAML config naming the model and data.test")
    p.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)
    p.add_argument("--adapter", help="adapter folder (PEFT format) to apply before scoring")

    for name, text in (("generate", "complete one prompt"), ("chat", "talk to the model interactively")):
        p = sub.add_parser(name, help=text, description=text)
        p.add_argument("--model", default=DEFAULT_MODEL, help=f"model name, folder or .gguf (default {DEFAULT_MODEL})")
        p.add_argument("--adapter", help="adapter folder (PEFT format) to apply")
        p.add_argument("--max-new-tokens", type=int, default=256, help="generation budget (default 256)")
        p.add_argument("--system", help="system prompt")
        p.add_argument("--quantization", choices=["auto", "none", "nf4", "fp4", "int8"], default="auto",
                       help="base quantization (default auto: as in the adapter's run, from the config.yaml beside "
                       "it; none: the float base)")
        if name == "generate":
            p.add_argument("prompt", help="the user message")

    p = sub.add_parser("data", help="data utilities")
    data_sub = p.add_subparsers(dest="data_command", required=True, metavar="DATA_COMMAND")
    d = data_sub.add_parser("demo", help="write the built-in demo task (train/validation/test JSONL)")
    d.add_argument("--out", required=True, help="output folder")
    d.add_argument("--seed", type=int, default=0, help="generator seed (default 0)")
    d.add_argument("--variant", choices=["easy", "hard"], default="easy", help="task difficulty (default easy)")

    p = sub.add_parser("demo", help="the whole workflow on the built-in task: score, fine-tune, score again",
                       description="Writes the demo data, scores the base model on the test split, fine-tunes "
                       "with LoRA, scores again and prints both.")
    p.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)
    p.add_argument("--out", default="runs/demo", help="run directory (default runs/demo)")

    p = sub.add_parser("merge", help="merge an adapter into its base and save a plain transformers folder")
    p.add_argument("--adapter", required=True, help="adapter folder (PEFT format)")
    p.add_argument("--out", required=True, help="output model folder")
    p.add_argument("--model", help="base model (default: the adapter's base_model_name_or_path)")
    p.add_argument("--quantization", choices=["auto", "none", "nf4", "fp4", "int8"], default="auto",
                   help="QLoRA adapters: quantize the base as in training, then dequantize and merge (default auto: "
                   "model.quantization of the run's config.yaml beside the adapter folder; none: the float base)")

    p = sub.add_parser("quantize", help="write a bitsandbytes 4-bit or 8-bit checkpoint that transformers loads",
                       description="Quantize the linear layers of the transformer blocks with bitsandbytes and save "
                       "a Hugging Face folder (config.json carries the quantization_config). See docs/qlora.md.")
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"model name, folder or .gguf (default {DEFAULT_MODEL})")
    p.add_argument("--out", required=True, help="output model folder")
    p.add_argument("--bits", type=int, choices=[4, 8], default=4, help="4 (nf4 or fp4) or 8 (LLM.int8); default 4")
    p.add_argument("--quant-type", choices=["nf4", "fp4"], default="nf4", help="4-bit data type (default nf4)")
    p.add_argument("--no-double-quant", action="store_true", help="4-bit: keep the fp32 absmax scales unquantized")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # offline-first: never reach for a hub
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        return dispatch(args)
    except UserError as e:
        print(f"tunesmith: error: {e}", file=sys.stderr)
        return UserError.exit_code
    except KeyboardInterrupt:
        print("tunesmith: interrupted", file=sys.stderr)
        return 130


def dispatch(args: argparse.Namespace) -> int:
    from tunesmith import commands
    from tunesmith.config import load_config

    if args.command == "train":
        commands.train(load_config(args.config, args.overrides))
    elif args.command == "eval":
        commands.evaluate(load_config(args.config, args.overrides), args.adapter)
    elif args.command == "generate":
        print(commands.generate_one(args.model, args.adapter, args.prompt, args.max_new_tokens, args.system,
                                    args.quantization))
    elif args.command == "chat":
        commands.chat(args.model, args.adapter, args.max_new_tokens, args.system, args.quantization)
    elif args.command == "data":
        paths = commands.write_demo_data(Path(args.out), args.seed, args.variant)
        for split, path in paths.items():
            print(f"{split}: {path}")
    elif args.command == "demo":
        commands.demo(Path(args.out), args.overrides)
    elif args.command == "merge":
        commands.merge(args.adapter, args.out, args.model, args.quantization)
    elif args.command == "quantize":
        commands.quantize(args.model, args.out, args.bits, args.quant_type, not args.no_double_quant)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
