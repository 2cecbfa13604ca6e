"""LoRA vs LoRA-FA: activation memory of one training step on the default model.

    .venv/bin/python bench/lora_fa_memory.py [--batch 8] [--seq 256] [--r 16] [--dropout 0.05]

Each method runs in a fresh process (same seed, same batch of random tokens, every position
labelled): load SmolLM2-135M-Instruct, apply the method to all linear layers, then one forward and
backward. Reported per method:

  saved for backward   bytes of the distinct tensors autograd keeps between forward and backward
                       (torch.autograd.graph.saved_tensors_hooks), minus the parameters among them:
                       the activation memory the method is responsible for; exact and noise-free
  step peak RSS        the process's peak resident memory during forward + backward, above its RSS
                       just before (Linux: VmHWM reset through /proc/self/clear_refs; glibc's mmap
                       threshold fixed at 64 KiB so that freed tensors leave RSS)
  CUDA peak            torch.cuda.max_memory_allocated above the allocation before the step (GPU only)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def worker(method: str, batch: int, seq: int, r: int, dropout: float) -> dict:
    import torch

    from tunesmith.config import MethodConfig, ModelConfig
    from tunesmith.methods.registry import get_method
    from tunesmith.models.loading import load_model_and_tokenizer
    from tunesmith.objectives.lm import token_loss_sum

    model, _ = load_model_and_tokenizer(ModelConfig())
    torch.manual_seed(0)
    get_method(method).apply(model, MethodConfig(name=method, r=r, alpha=2 * r, dropout=dropout))
    device = next(model.parameters()).device
    input_ids = torch.randint(0, model.config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0))
    data = {"input_ids": input_ids.to(device), "attention_mask": torch.ones_like(input_ids).to(device),
            "labels": input_ids.to(device)}
    model.train()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        cuda_before = torch.cuda.memory_allocated()
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak RSS to the current RSS
    rss_before = rss_kib("VmRSS")
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss, count = token_loss_sum(model, data)
    (loss / count).backward()
    out = {"method": method, "saved_mib": sum(saved.values()) / 2**20,
           "rss_peak_mib": (rss_kib("VmHWM") - rss_before) / 1024, "loss": float(loss / count)}
    if cuda:
        torch.cuda.synchronize()
        out["cuda_peak_mib"] = (torch.cuda.max_memory_allocated() - cuda_before) / 2**20
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--dropout", type=float, default=0.05)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.batch, args.seq, args.r, args.dropout)))
        return
    rows = []
    for method in ("lora", "lora_fa"):
        cmd = [sys.executable, __file__, "--worker", method, "--batch", str(args.batch), "--seq", str(args.seq),
               "--r", str(args.r), "--dropout", str(args.dropout)]
        # a fixed mmap threshold: freed tensors go back to the OS, so RSS follows the live tensors
        # (glibc's dynamic threshold otherwise keeps freed blocks resident, and RSS measures the allocator)
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, check=True, env=env)
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    print(f"SmolLM2-135M-Instruct, all linear layers, r={args.r}, dropout={args.dropout}, "
          f"batch {args.batch} x {args.seq} tokens, one forward + backward\n")
    cuda = "cuda_peak_mib" in rows[0]
    print("| method | saved for backward (MiB) | step peak RSS (MiB) |" + (" CUDA peak (MiB) |" if cuda else ""))
    print("|---|---|---|" + ("---|" if cuda else ""))
    for row in rows:
        line = f"| {row['method']} | {row['saved_mib']:.0f} | {row['rss_peak_mib']:.0f} |"
        print(line + (f" {row['cuda_peak_mib']:.0f} |" if cuda else ""))
    losses = ", ".join(f"{row['loss']:.4f}" for row in rows)
    print(f"\nlosses (same weights at init, so equal): {losses}")


if __name__ == "__main__":
    main()
