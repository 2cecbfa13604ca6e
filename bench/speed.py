"""tunesmith against the Hugging Face stack on the same run: tokens per second, memory, loss, MFU.

    .venv/bin/python bench/speed.py                      # about 13 minutes on 2 CPU cores
    .venv/bin/python bench/speed.py --rows 64 --stacks tunesmith plain    # quicker look

One invocation runs, one after another and each in a fresh process (so each has its own peak RSS):

  tunesmith       our loop with its defaults (packed rows, per-sample attention, head on labelled
                  positions only, the fused LoRA update)
  tunesmith-ckpt  the same with train.gradient_checkpointing=true
  plain           transformers + peft in the plain PyTorch loop people write by hand: right-padded
                  batches, `model(**batch).loss`, AdamW, clipping
  trl-padfree     TRL's SFTTrainer with peft, padding_free=True (each batch flattened into one row),
                  gradient_checkpointing=False: TRL's fastest setting here
  trl-padfree-ckpt  the same with TRL's default gradient_checkpointing=True (less memory, slower)
  trl-padded      TRL's SFTTrainer with peft, its default padded batches (not run by default: slowest)

Everything else is equal: SmolLM2-135M-Instruct in fp32, LoRA r 16 / alpha 32 / dropout 0.05 on
every linear layer, AdamW at a constant lr 2e-4, gradient clipping at 1.0, batch 8, seed 0, one
pass over the same rows in the same order (TRL gets the same token ids and labels, already
tokenised, and a sequential sampler), so every stack trains on the same number of target tokens.
The rows are the demo task's (short) plus a long-tailed length mix (log-normal prompt and answer
lengths, 20 to 1000 tokens), the shape of real instruction data.

Reported per stack: useful (non-pad) tokens per second over the training loop, peak RSS of the
process, the mean training loss over the run, and the loss on 32 held-out rows computed after
training by one shared function (these must agree within noise: same data, same math), plus
model-FLOPs utilisation against the fp32 matmul peak measured at the start of the run:

    model FLOPs per token = 6 * N + 6 * L * d * S     N: parameters in matmuls (body + head)
                                                      L layers, d width, S mean sample length
    MFU = model FLOPs per second / peak FLOPs per second

(the usual 6N convention, counted the same way for every stack; a frozen base needs no weight
gradients, so the hardware does less than 6N per token in every stack alike.)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STACKS = ["tunesmith", "tunesmith-ckpt", "plain", "trl-padfree", "trl-padfree-ckpt", "trl-padded"]
DEFAULT_STACKS = STACKS[:5]
LORA = {"r": 16, "alpha": 32, "dropout": 0.05}
LR, BATCH, SEED, CLIP, MAX_LEN = 2e-4, 8, 0, 1.0, 1024
WORDS = ("time year people way day man thing woman life child world school state family student group "
         "country problem hand part place case week company system program question work government number "
         "night point home water room mother area money story fact month lot right study book eye job word "
         "business issue side kind head house service friend father power hour game line end member law car "
         "city community name president team minute idea kid body information back parent face others level "
         "office door health person art war history party result change morning reason research girl guy").split()


# ---------------------------------------------------------------- data (built once, in the parent)

def long_tail_rows(n: int, seed: int) -> list[dict]:
    """Instruction rows whose prompt and answer lengths (in words) are log-normal: mostly short, a few long."""
    rng = random.Random(seed)

    def text(words: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(words)).capitalize() + "."

    rows = []
    for _ in range(n):
        prompt = min(600, max(10, int(rng.lognormvariate(math.log(60), 0.9))))
        answer = min(400, max(10, int(rng.lognormvariate(math.log(50), 1.0))))
        rows.append({"messages": [{"role": "user", "content": "Continue this text: " + text(prompt)},
                                  {"role": "assistant", "content": text(answer)}]})
    return rows


def build_examples(n_rows: int, path: Path) -> dict:
    """Token ids and labels for the run (half demo rows, half long-tailed) and the held-out rows."""
    from tunesmith.data.demo import demo_rows
    from tunesmith.data.tokenize import encode_row
    from tunesmith.config import ModelConfig
    from tunesmith.models.loading import load_model_and_tokenizer

    _, tokenizer = load_model_and_tokenizer(ModelConfig())
    rows = demo_rows(n_rows // 2 + 16, seed=SEED) + long_tail_rows(n_rows - n_rows // 2 + 16, seed=SEED)
    random.Random(SEED).shuffle(rows)
    encoded = [encode_row(r, "messages", tokenizer, MAX_LEN) for r in rows]
    encoded = [{"input_ids": e["input_ids"], "labels": e["labels"]} for e in encoded]
    data = {"train": encoded[:n_rows], "heldout": encoded[n_rows : n_rows + 32], "pad_id": tokenizer.pad_token_id}
    path.write_text(json.dumps(data), encoding="utf-8")
    lengths = sorted(len(e["input_ids"]) for e in data["train"])
    return {"rows": len(lengths), "tokens": sum(lengths), "median": lengths[len(lengths) // 2], "max": lengths[-1],
            "labelled": sum(sum(l != -100 for l in e["labels"][1:]) for e in data["train"])}


def measure_peak_flops(size: int = 2048, repeats: int = 5) -> float:
    """Best fp32 matmul rate on this machine now, in FLOP/s."""
    import torch

    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


# ---------------------------------------------------------------- workers (one process per stack)

def ordered_batches(examples: list[dict]) -> list[list[dict]]:
    """The batches of one epoch in tunesmith's order (a seeded permutation), shared by every stack."""
    from tunesmith.data.dataset import epoch_order

    order = epoch_order(len(examples), SEED, 0)
    return [[examples[i] for i in order[s : s + BATCH]] for s in range(0, len(order), BATCH)]


def peft_model(model):
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                                            target_modules="all-linear", task_type="CAUSAL_LM"))


def heldout_loss(model, examples: list[dict], pad_id: int) -> float:
    """Token-mean loss on the held-out rows, by one function for every stack."""
    import torch

    from tunesmith.train.validate import validation_loss

    model.eval()
    with torch.no_grad():
        return validation_loss(model, examples, BATCH, pad_id)


def run_tunesmith(data: dict, out: Path, checkpointing: bool = False) -> dict:
    from tunesmith.config import Config
    from tunesmith.methods.registry import get_method
    from tunesmith.models.loading import load_model_and_tokenizer
    from tunesmith.train import loop
    import torch

    cfg = Config()
    cfg.method.r, cfg.method.alpha, cfg.method.dropout = LORA["r"], LORA["alpha"], LORA["dropout"]
    cfg.data.packing, cfg.data.max_seq_len = True, MAX_LEN
    t = cfg.train
    t.batch_size, t.lr, t.schedule, t.warmup_steps, t.max_grad_norm, t.seed, t.epochs = BATCH, LR, "constant", 0, CLIP, SEED, 1
    t.gradient_checkpointing = checkpointing
    model, _ = load_model_and_tokenizer(cfg.model)
    torch.manual_seed(SEED)
    method = get_method("lora")
    method.apply(model, cfg.method)
    start = time.perf_counter()
    loop.train(model, data["train"], [], cfg, out, data["pad_id"])
    seconds = time.perf_counter() - start
    losses = [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    return {"seconds": seconds, "losses": losses, "heldout": heldout_loss(model, data["heldout"], data["pad_id"])}


def run_plain(data: dict, out: Path) -> dict:
    """transformers + peft, the loop from the peft quicktour: padded batches and model(...).loss."""
    import torch

    from tunesmith.config import ModelConfig
    from tunesmith.data.dataset import collate
    from tunesmith.models.loading import load_model_and_tokenizer

    model, _ = load_model_and_tokenizer(ModelConfig())
    torch.manual_seed(SEED)
    model = peft_model(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR, weight_decay=0.0)
    model.train()
    losses = []
    start = time.perf_counter()
    for rows in ordered_batches(data["train"]):
        batch = collate(rows, data["pad_id"])  # right-padded input_ids, attention_mask, labels
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], CLIP)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss))
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "losses": losses,
            "heldout": heldout_loss(model.get_base_model(), data["heldout"], data["pad_id"])}


def run_trl(data: dict, out: Path, padding_free: bool, checkpointing: bool) -> dict:
    import torch
    from datasets import Dataset
    from torch.utils.data import SequentialSampler
    from trl import SFTConfig, SFTTrainer

    from tunesmith.config import ModelConfig
    from tunesmith.models.loading import load_model_and_tokenizer

    class InOrder(SFTTrainer):
        """The same row order as the other stacks (Trainer shuffles with its own sampler otherwise)."""

        def _get_train_sampler(self, *args, **kwargs):
            return SequentialSampler(self.train_dataset)

    model, tokenizer = load_model_and_tokenizer(ModelConfig())
    torch.manual_seed(SEED)
    model = peft_model(model)
    rows = [r for batch in ordered_batches(data["train"]) for r in batch]
    dataset = Dataset.from_list([{"input_ids": r["input_ids"], "labels": r["labels"]} for r in rows])
    args = SFTConfig(output_dir=str(out), per_device_train_batch_size=BATCH, learning_rate=LR,
                     lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=CLIP,
                     num_train_epochs=1, seed=SEED, logging_steps=1, save_strategy="no", report_to=[],
                     padding_free=padding_free, gradient_checkpointing=checkpointing, max_length=None, use_cpu=True, bf16=False, fp16=False,
                     dataloader_num_workers=0, disable_tqdm=True)
    # max_length None: the rows come tokenised and cut to MAX_LEN already
    trainer = InOrder(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    return {"seconds": seconds, "losses": losses,
            "heldout": heldout_loss(model.get_base_model(), data["heldout"], data["pad_id"])}


def worker(stack: str, data_path: Path, out: Path) -> dict:
    data = json.loads(data_path.read_text(encoding="utf-8"))
    out.mkdir(parents=True, exist_ok=True)
    checkpointing = stack.endswith("-ckpt") or stack == "trl-padded"  # trl-padded: TRL's defaults
    if stack.startswith("tunesmith"):
        result = run_tunesmith(data, out, checkpointing)
    elif stack == "plain":
        result = run_plain(data, out)
    else:
        result = run_trl(data, out, padding_free=stack.startswith("trl-padfree"), checkpointing=checkpointing)
    peak_kib = next(int(l.split()[1]) for l in Path("/proc/self/status").read_text().splitlines()
                    if l.startswith("VmHWM:"))
    return dict(result, stack=stack, peak_rss_mib=peak_kib / 1024)


# ---------------------------------------------------------------- the table

def model_flops_per_token(mean_len: float) -> float:
    """6 N + 6 L d S for SmolLM2-135M (N: parameters in matmuls, the tied head counted once as the head)."""
    from tunesmith.config import ModelConfig
    from tunesmith.models.loading import load_model_and_tokenizer

    model, _ = load_model_and_tokenizer(ModelConfig())
    c = model.config
    body = sum(p.numel() for n, p in model.named_parameters() if "layers." in n and p.dim() == 2)
    head = c.vocab_size * c.hidden_size
    return 6 * (body + head) + 6 * c.num_hidden_layers * c.hidden_size * mean_len


def table(results: list[dict], stats: dict, peak: float, flops_per_token: float) -> str:
    ours = next(r for r in results if r["stack"] == "tunesmith")
    lines = [f"{stats['rows']} rows, {stats['tokens']:,} tokens ({stats['labelled']:,} labelled), median length "
             f"{stats['median']}, max {stats['max']}; fp32 matmul peak measured now: {peak / 1e9:.0f} GFLOP/s; "
             f"{os.cpu_count()} CPUs, torch threads {__import__('torch').get_num_threads()}.", "",
             "| stack | tokens/s | tunesmith is x faster | peak RSS | RSS vs tunesmith | mean train loss | "
             "held-out loss | MFU |", "|---|---|---|---|---|---|---|---|"]
    for r in results:
        tps = stats["tokens"] / r["seconds"]
        ours_tps = stats["tokens"] / ours["seconds"]
        mfu = tps * flops_per_token / peak
        lines.append(f"| {r['stack']} | {tps:,.0f} | {ours_tps / tps:.2f} | {r['peak_rss_mib']:,.0f} MiB | "
                     f"{r['peak_rss_mib'] / ours['peak_rss_mib']:.2f} | {sum(r['losses']) / len(r['losses']):.4f} | "
                     f"{r['heldout']:.4f} | {100 * mfu:.1f}% |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=160, help="training rows (default 160: 20 steps of 8)")
    parser.add_argument("--stacks", nargs="+", choices=STACKS, default=DEFAULT_STACKS)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "speed")
    parser.add_argument("--worker", choices=STACKS, help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.worker:
        print("RESULT " + json.dumps(worker(args.worker, args.data, args.out / args.worker)))
        return
    args.out.mkdir(parents=True, exist_ok=True)
    data_path = args.out / "data.json"
    stats = build_examples(args.rows, data_path)
    peak = measure_peak_flops()
    print(f"data: {stats}; peak {peak / 1e9:.0f} GFLOP/s", flush=True)
    results = []
    for stack in args.stacks:
        print(f"--- {stack}", flush=True)
        proc = subprocess.run([sys.executable, __file__, "--worker", stack, "--data", str(data_path),
                               "--out", str(args.out)], capture_output=True, text=True, cwd=ROOT)
        line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT ")), None)
        if line is None:
            sys.exit(f"{stack} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
        results.append(json.loads(line[len("RESULT "):]))
        print(f"    {results[-1]['seconds']:.1f} s, peak RSS {results[-1]['peak_rss_mib']:.0f} MiB", flush=True)
    flops = model_flops_per_token(stats["tokens"] / stats["rows"])
    text = table(results, stats, peak, flops)
    (args.out / "speed.md").write_text(text, encoding="utf-8")
    (args.out / "speed.json").write_text(json.dumps({"stats": stats, "peak_flops": peak, "results": results},
                                                    indent=2), encoding="utf-8")
    print(text)


if __name__ == "__main__":
    main()
