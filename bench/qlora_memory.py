"""QLoRA memory: bytes of the default model's weights per format, and the whole-run peak RSS of training.

    .venv/bin/python bench/qlora_memory.py [--no-train] [--only short|long|1b] [--steps 4]

Weights: SmolLM2-135M-Instruct loaded by tunesmith.models.loading with ModelConfig() (fp32), with
dtype=bfloat16, and with quantization int8, nf4 without and with double quantization. Bytes are
summed over the tensors the model's state dict holds (what it keeps in memory and what a checkpoint
stores): for NF4 the packed 4-bit weights, the absmax per block of 64 (fp32, or 8-bit plus the
nested fp32 absmax per 256 blocks and the offset with double quantization), the 16-value code and
bitsandbytes' packed quant-state record; for int8 the int8 weights and one fp32 scale per row.
Bits per parameter divide by the (out x in) count of the quantized layers; "whole model" adds
embeddings (tied to the output head, counted once) and norms, which stay fp32 (bf16 in the bf16 row).

Training, as a user runs it: `python -m tunesmith train` with the demo config (r 16 on all linear
layers, lr 5e-4, seed 0) on the demo data (validation: 8 rows), `--steps` steps, each run a fresh
process with nothing tuned (default malloc, default threads). The whole process's peak RSS is its
own VmHWM, which the run writes into summary.json (not wait4's ru_maxrss: a child inherits its
parent's high-water mark through fork and exec); "model" and "peak after loading" are read from the run's log
(models/loading.py states both). Runs:
  short  batch 2, max_seq_len 96: the weights dominate (the issue's measurement, LoRA 1,283 MiB);
  long   batch 8, max_seq_len 256 (the demo's): the activations dominate;
  1b     a synthetic 1.07B-parameter Llama (bench/synthetic_llama.py, SmolLM2's tokenizer), batch 1,
         max_seq_len 64: LoRA over the fp32 base against QLoRA.
each with LoRA over the fp32 base (without and with activation checkpointing), QLoRA over nf4 (without
checkpointing, then as a user gets it: checkpointing on by default), nf4 + double quantization, and nf4 +
double quantization with paged 8-bit AdamW (the 1b runs: both LoRA rows and nf4 + double quantization).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))  # synthetic_llama
FORMATS = {  # label -> ModelConfig overrides
    "fp32": {},
    "bf16": {"dtype": "bfloat16"},
    "int8": {"quantization": "int8"},
    "nf4": {"quantization": "nf4", "double_quant": False},
    "nf4 + double quant": {"quantization": "nf4", "double_quant": True},
}


def block_linears() -> tuple[list[str], int]:
    """Names of the layers quantization replaces, and their (out x in) parameter count."""
    import torch

    from tunesmith.config import ModelConfig
    from tunesmith.models.loading import load_model_and_tokenizer
    from tunesmith.models.quantize import quantizable_linears

    model, _ = load_model_and_tokenizer(ModelConfig(), torch.device("cpu"))
    layers = quantizable_linears(model)
    return layers, sum(model.get_submodule(n).weight.numel() for n in layers)


def weight_bytes(overrides: dict, layers: list[str], params: int) -> dict:
    """Bytes and bits per parameter of one format, from the model's state dict."""
    import torch

    from tunesmith.config import ModelConfig
    from tunesmith.models.loading import load_model_and_tokenizer

    model, _ = load_model_and_tokenizer(ModelConfig(**overrides), torch.device("cpu"))
    linear = {"weights": 0, "stats": 0}
    seen, total = set(), 0
    for key, t in model.state_dict().items():
        if not torch.is_tensor(t) or t.untyped_storage().data_ptr() in seen:
            continue  # the tied output head shares the embeddings' storage
        seen.add(t.untyped_storage().data_ptr())
        size = t.numel() * t.element_size()
        total += size
        if any(key.startswith(n + ".") for n in layers):
            linear["weights" if key.endswith(".weight") else "stats"] += size
    linear_bytes = linear["weights"] + linear["stats"]
    return {"params": params, "weights": linear["weights"], "stats": linear["stats"], "linear": linear_bytes,
            "bits": 8 * linear_bytes / params, "total": total}


# label -> overrides of the demo config. Each run as a user gets it: train.gradient_checkpointing is auto, on
# over a quantized base and off otherwise; the "no ckpt" and "+ ckpt" rows set it the other way, so the table
# also compares like with like.
RUNS = {
    "LoRA (fp32 base)": [],
    "LoRA (fp32 base) + ckpt": ["train.gradient_checkpointing=true"],
    "QLoRA nf4 no ckpt": ["model.quantization=nf4", "model.double_quant=false", "train.gradient_checkpointing=false"],
    "QLoRA nf4": ["model.quantization=nf4", "model.double_quant=false"],
    "QLoRA nf4 + double quant": ["model.quantization=nf4"],
    "QLoRA nf4 + dq + paged 8-bit AdamW": ["model.quantization=nf4", "train.optimizer=paged_adamw_8bit"],
}
SHAPES = {  # run length -> (overrides, runs)
    "short": (["train.batch_size=2", "data.max_seq_len=96"], list(RUNS)),
    "long": (["train.batch_size=8", "data.max_seq_len=256"], list(RUNS)),
    "1b": (["train.batch_size=1", "data.max_seq_len=64"],
           ["LoRA (fp32 base)", "LoRA (fp32 base) + ckpt", "QLoRA nf4 + double quant"]),
}


def run_train(overrides: list[str], data: Path) -> dict:
    """One `tunesmith train` in a fresh process: its whole-process peak RSS, and what its log says about memory."""
    from tunesmith.commands.train import DEMO_CONFIG

    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, "-m", "tunesmith", "train", str(DEMO_CONFIG), f"data.train={data / 'train.jsonl'}",
               f"data.validation={data / 'validation-8.jsonl'}", "train.save_every=0", "train.eval_every=0",
               f"output.dir={out}", *overrides]
        proc = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        log = proc.stdout
        if proc.returncode != 0:
            sys.exit(log[-3000:])
        peak = json.loads((Path(out) / "summary.json").read_text())["peak_rss_mib"]
        losses = [json.loads(l)["loss"] for l in (Path(out) / "metrics.jsonl").read_text().splitlines()
                  if "loss" in json.loads(l)]
    model = re.search(r"model in memory: (\d+) MiB", log)
    loaded = re.search(r"peak RSS so far (\d+) MiB", log)
    return {"peak_mib": peak, "model_mib": int(model[1]) if model else None,
            "load_peak_mib": int(loaded[1]) if loaded else None, "last_loss": losses[-1] if losses else None}


def synthetic_1b(folder: Path) -> None:
    """bench/synthetic_llama.py's 1b shapes, with the default model's tokenizer (vocabulary 49,152)."""
    import shutil

    import torch

    from synthetic_llama import SIZES, write_random_llama
    from tunesmith.config import ModelConfig
    from tunesmith.models.loading import resolve_model_folder

    write_random_llama(folder, **SIZES["1b"], dtype=torch.float32)
    for path in resolve_model_folder(ModelConfig()).iterdir():
        if path.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copy(path, folder / path.name)


def training_table(shape: str, steps: int, data: Path, model_dir: Path | None, picked: list[int] | None) -> None:
    overrides, labels = SHAPES[shape]
    labels = [labels[i] for i in picked] if picked else labels
    overrides = [*overrides, f"train.max_steps={steps}"]
    if model_dir is not None:
        overrides.append(f"model.name_or_path={model_dir}")
    rows = {label: run_train([*overrides, *RUNS[label]], data) for label in labels}
    lora = rows["LoRA (fp32 base)"]["peak_mib"] if "LoRA (fp32 base)" in rows else float("nan")
    print(f"\n{shape}: {' '.join(overrides)}\n")
    print("| run | model (MiB) | peak after loading (MiB) | whole-run peak RSS (MiB) | vs LoRA | last loss |")
    print("|---|---|---|---|---|---|")
    for label, r in rows.items():
        print(f"| {label} | {r['model_mib']} | {r['load_peak_mib']} | {r['peak_mib']:.0f} | "
              f"{r['peak_mib'] / lora:.2f}x | {r['last_loss']:.4f} |", flush=True)


def weights_table() -> None:
    import logging

    logging.basicConfig(level=logging.WARNING)
    print("SmolLM2-135M-Instruct weights (block linears: every nn.Linear of the 30 transformer blocks)\n")
    print("| format | block linears: weights (MiB) | scales and stats (MiB) | bits per parameter | "
          "whole model (MiB) |")
    print("|---|---|---|---|---|")
    layers, params = block_linears()
    for label, overrides in FORMATS.items():
        r = weight_bytes(overrides, layers, params)
        print(f"| {label} | {r['weights'] / 2**20:.1f} | {r['stats'] / 2**20:.2f} | {r['bits']:.3f} | "
              f"{r['total'] / 2**20:.1f} |")
    print(f"\n({r['params']:,} parameters in the block linears)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--no-train", action="store_true", help="only the weight bytes")
    parser.add_argument("--no-weights", action="store_true", help="only the training runs")
    parser.add_argument("--only", choices=list(SHAPES), help="one of the training tables")
    parser.add_argument("--runs", type=lambda v: [int(i) for i in v.split(",")],
                        help="some rows of the table only, by index (0,3: LoRA and QLoRA nf4): shorter commands")
    args = parser.parse_args()

    if not args.no_weights:
        weights_table()
    if args.no_train:
        return

    from tunesmith.data.demo import write_demo

    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp)
        write_demo(data)
        lines = (data / "validation.jsonl").read_text().splitlines(keepends=True)
        (data / "validation-8.jsonl").write_text("".join(lines[:8]))  # the loop validates at the end: keep it short
        for shape in [args.only] if args.only else list(SHAPES):
            model_dir = None
            if shape == "1b":
                model_dir = data / "synthetic-1b"
                synthetic_1b(model_dir)
            training_table(shape, args.steps, data, model_dir, args.runs)


if __name__ == "__main__":
    main()
