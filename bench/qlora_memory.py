"""QLoRA memory: bytes of the default model's weights per format, and peak RSS of LoRA vs QLoRA training.

    .venv/bin/python bench/qlora_memory.py [--steps 10] [--no-train]

Weights: SmolLM2-135M-Instruct loaded by tunesmith.models.loading with ModelConfig() (fp32), with
dtype=bfloat16, and with quantization int8, nf4 without and with double quantization. Bytes are
summed over the tensors the model's state dict holds (what it keeps in memory and what a checkpoint
stores): for NF4 the packed 4-bit weights, the absmax per block of 64 (fp32, or 8-bit plus the
nested fp32 absmax per 256 blocks and the offset with double quantization), the 16-value code and
bitsandbytes' packed quant-state record; for int8 the int8 weights and one fp32 scale per row.
Bits per parameter divide by the (out x in) count of the quantized layers; "whole model" adds
embeddings (tied to the output head, counted once) and norms, which stay fp32 (bf16 in the bf16 row).

Training: the demo's settings (r 16 on all linear layers, batch 8, max_seq_len 256, lr 5e-4,
seed 0) on the demo data, `--steps` optimizer steps, LoRA over fp32 vs LoRA over NF4 (double
quant), each in a fresh process with glibc's mmap threshold fixed at 64 KiB so freed tensors leave
RSS. Reported: RSS once the model is loaded (and quantized), the peak RSS over the training steps
(VmHWM reset through /proc/self/clear_refs just before them), the process's overall peak (loading
included: the model is read in fp32 before it is quantized), and seconds per step.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FORMATS = {  # label -> ModelConfig overrides
    "fp32": {},
    "bf16": {"dtype": "bfloat16"},
    "int8": {"quantization": "int8"},
    "nf4": {"quantization": "nf4", "double_quant": False},
    "nf4 + double quant": {"quantization": "nf4", "double_quant": True},
}


def rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


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


def train_worker(quantization: str, steps: int, data_dir: Path) -> dict:
    import torch

    from tunesmith.commands.train import DEMO_CONFIG
    from tunesmith.config import load_config
    from tunesmith.data.dataset import prepare_datasets
    from tunesmith.methods.registry import get_method
    from tunesmith.models.loading import load_model_and_tokenizer
    from tunesmith.train.loop import train as train_loop

    with tempfile.TemporaryDirectory() as run_dir:
        cfg = load_config(DEMO_CONFIG, [f"data.train={data_dir / 'train.jsonl'}",
                                        f"data.validation={data_dir / 'validation.jsonl'}",
                                        f"model.quantization={quantization}", f"train.max_steps={steps}",
                                        "train.save_every=0", "train.eval_every=0", f"output.dir={run_dir}"])
        model, tokenizer = load_model_and_tokenizer(cfg.model)
        load_peak = rss_kib("VmHWM")
        data = prepare_datasets(cfg.data, tokenizer, cfg.train.seed)
        data.validation = data.validation[:8]  # the loop validates at the end; keep that short
        method = get_method(cfg.method.name)
        torch.manual_seed(cfg.train.seed)
        method.apply(model, cfg.method)
        loaded = rss_kib("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # reset the peak RSS to the current RSS
        started = time.time()
        train_loop(model, data.train, data.validation, cfg, Path(run_dir), tokenizer.pad_token_id,
                   param_groups=method.param_groups(model, cfg.method), after_step=method.after_step)
        seconds = time.time() - started
        train_peak = rss_kib("VmHWM")  # since the reset; the kernel's peak (ru_maxrss) was reset with it
        losses = [json.loads(l)["loss"] for l in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
                  if "loss" in json.loads(l)]
    return {"quantization": quantization, "loaded_mib": loaded / 1024, "train_peak_mib": train_peak / 1024,
            "process_peak_mib": max(load_peak, train_peak) / 1024,
            "s_per_step": seconds / steps, "last_loss": losses[-1] if losses else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--no-train", action="store_true", help="only the weight bytes")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(train_worker(args.worker, args.steps, Path(args.data))))
        return

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
    if args.no_train:
        return

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        from tunesmith.data.demo import write_demo

        write_demo(Path(tmp))
        for quantization in ("none", "nf4"):
            cmd = [sys.executable, __file__, "--worker", quantization, "--steps", str(args.steps), "--data", tmp]
            # a fixed mmap threshold: freed tensors go back to the OS, so RSS follows the live tensors
            env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
            if proc.returncode != 0:
                sys.exit(proc.stderr)
            rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    print(f"\nTraining, demo settings (r 16, all linear layers, batch 8, fp32 compute), {args.steps} steps\n")
    print("| run | RSS after loading (MiB) | peak RSS while training (MiB) | process peak (MiB) | s/step | "
          "last loss |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        label = "LoRA (fp32 base)" if r["quantization"] == "none" else "QLoRA (NF4 + double quant base)"
        print(f"| {label} | {r['loaded_mib']:.0f} | {r['train_peak_mib']:.0f} | {r['process_peak_mib']:.0f} | "
              f"{r['s_per_step']:.1f} | {r['last_loss']:.4f} |")


if __name__ == "__main__":
    main()
