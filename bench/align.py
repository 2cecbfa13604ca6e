"""tunesmith DPO against TRL's DPOTrainer on the same pairs: tokens per second, peak memory, losses.

    .venv-test/bin/python bench/align.py                 # 12 steps; about 5 minutes on 2 CPU cores
    .venv-test/bin/python bench/align.py --steps 3       # a quick look
    .venv-test/bin/python bench/align.py --json bench/results/align.json

It runs in .venv-test, the test environment: TRL and peft are test and benchmark dependencies of
tunesmith, not runtime ones. Nothing is downloaded: TRL is handed the model and tokenizer that
tunesmith loads from its local cache (SmolLM2-135M-Instruct, converted once to safetensors).

Four runs, one after another, each in a fresh process (so each has its own peak RSS):

  tunesmith-dpo    tunesmith's loop, objective dpo, method lora, reference = the same weights with the
                   adapters switched off (one more forward per step, no copy), packed rows (data.packing
                   default: one padding-free row per micro-batch, per-sample attention)
  trl-dpo          trl.DPOTrainer with a peft LoraConfig: its reference is the same model with the
                   adapters disabled too (DPOTrainer keeps ref_model None for a peft model and runs the
                   reference forward under `model.disable_adapter()`; the worker checks both); padded
                   batches (TRL's padding_free falls back to padding since its DPO refactor)
  tunesmith-dpo-pre  tunesmith DPO with objective.reference=precomputed: the reference log-probabilities
                   of every pair computed once before training (time reported apart, not in the steps)
  tunesmith-orpo   tunesmith ORPO (no reference), for the cost of a DPO step with cached reference

Everything else is equal: fp32 on the CPU, the same torch threads (tunesmith's choice, applied to
both), LoRA r 16 / alpha 32 / dropout 0 on q, k, v, o, gate, up and down of every block, the same
initial adapter weights (tunesmith's seeded init, written once and loaded into TRL's peft model),
AdamW (betas 0.9/0.999, eps 1e-8, no weight decay) at a constant lr with no warmup, clipping at
1.0, beta 0.1, the sigmoid loss, batch 4 pairs, no gradient checkpointing (--gradient-checkpointing:
on both sides, TRL's DPOConfig default), nothing truncated. The
pairs are the first steps x 4 rows of the demo's preference_train.jsonl, and both sides see them in
tunesmith's epoch order (a seeded permutation; TRL gets the rows permuted so and a sequential
sampler). By default TRL gets tunesmith's token ids: the same prompt ids, and each answer ending at
its <|im_end|>. With --trl-tokenize TRL tokenises the conversational rows itself; its answers then
also hold the newline the chat template writes after <|im_end|> (one more labelled token each).

Measured per run: the loss of every step (TRL's from its log history, logging every step);
seconds per step, from the second step on (the first is warm-up), tunesmith's from metrics.jsonl
(step_time: batch, forward, backward, optimizer), TRL's as the time between the ends of consecutive
optimizer steps (a TrainerCallback; the same work plus the Trainer's per-step logging); tokens per
second = the real (non-padding) tokens of the chosen and rejected sequences of those steps divided
by their seconds; RSS once libraries and model are loaded, and the process's peak RSS
(getrusage ru_maxrss, nothing subtracted).

Targets (issue 11): tunesmith >= 1.5x TRL's tokens per second, <= 0.6x its peak RSS, losses equal
within 1e-3 relative at every step, a DPO step with precomputed reference <= 1.15x an ORPO step.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))  # run as a script: its neighbours import by name
from child import cpu_name, print_result, rss_mib, run_child, step_clock, verdict  # noqa: E402
RUNS = ["tunesmith-dpo", "trl-dpo", "tunesmith-dpo-pre", "tunesmith-orpo"]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LORA = {"r": 16, "alpha": 32, "dropout": 0.0}
BATCH, LR, BETA, SEED, CLIP, MAX_LEN = 4, 1e-4, 0.1, 0, 1.0, 1024
LOSS_TOL, SPEED_TARGET, MEMORY_TARGET, PRE_VS_ORPO_TARGET = 1e-3, 1.5, 0.6, 1.15


# ---------------------------------------------------------------- shared by the parent and the workers

def peak_rss_mib() -> float:
    """The process's peak resident memory (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def pairs_in_order(work: Path) -> list[dict]:
    """The benchmark's pairs in tunesmith's epoch-0 order, as TRL is to see them."""
    from tunesmith.data.dataset import epoch_order

    rows = [json.loads(l) for l in (work / "pairs.jsonl").read_text(encoding="utf-8").splitlines()]
    return [rows[i] for i in epoch_order(len(rows), SEED, 0)]


# ---------------------------------------------------------------- the parent: data and the initial adapter

def prepare(work: Path, steps: int) -> dict:
    """Write the pairs (the first steps x BATCH demo pairs) and tunesmith's initial adapter weights."""
    import torch
    from safetensors.torch import save_file

    from tunesmith.config import load_config
    from tunesmith.data.demo import write_demo
    from tunesmith.methods.io import adapter_state_dict
    from tunesmith.methods.registry import get_method
    from tunesmith.models.loading import load_model_and_tokenizer

    paths = write_demo(work / "demo")
    rows = (paths["preference_train"]).read_text(encoding="utf-8").splitlines()[: steps * BATCH]
    if len(rows) < steps * BATCH:
        sys.exit(f"the demo has {len(rows)} pairs, fewer than {steps} steps of {BATCH}")
    (work / "pairs.jsonl").write_text("".join(r + "\n" for r in rows), encoding="utf-8")
    cfg = load_config(None, tunesmith_overrides(work, steps, "dpo", "adapters_off"))
    model, _ = load_model_and_tokenizer(cfg.model)
    torch.manual_seed(cfg.train.seed)  # as tunesmith's apply_method does
    get_method(cfg.method.name).apply(model, cfg.method)
    save_file(adapter_state_dict(model), str(work / "init_adapter.safetensors"))
    return {"pairs": len(rows)}


# ---------------------------------------------------------------- workers: tunesmith

def checkpointing() -> bool:
    """--gradient-checkpointing, passed to the workers through the environment (TRL's DPOConfig default)."""
    return os.environ.get("BENCH_ALIGN_CHECKPOINTING") == "1"


def tunesmith_overrides(work: Path, steps: int, objective: str, reference: str) -> list[str]:
    return [f"train.gradient_checkpointing={str(checkpointing()).lower()}",
        f"data.train={work / 'pairs.jsonl'}", "data.format=preference", "data.val_split=0",
        f"data.max_seq_len={MAX_LEN}", "data.cache=false",
        "method.name=lora", f"method.r={LORA['r']}", f"method.alpha={LORA['alpha']}",
        f"method.dropout={LORA['dropout']}", f"method.target_modules=[{','.join(TARGETS)}]",
        f"objective.name={objective}", f"objective.beta={BETA}", f"objective.reference={reference}",
        f"train.batch_size={BATCH}", f"train.max_steps={steps}", f"train.lr={LR}", "train.schedule=constant",
        "train.warmup_steps=0", "train.weight_decay=0", f"train.max_grad_norm={CLIP}", f"train.seed={SEED}",
        "eval.before_after=false", f"output.dir={work / 'runs' / objective / reference}",
    ]


def run_tunesmith(work: Path, steps: int, objective: str, reference: str) -> dict:
    """The steps of `tunesmith train` (commands/train.py) without scoring and saving."""
    import shutil

    import torch

    from tunesmith.commands.train import apply_method, load_run
    from tunesmith.config import load_config
    from tunesmith.methods.registry import get_method
    from tunesmith.train.loop import train as train_loop

    cfg = load_config(None, tunesmith_overrides(work, steps, objective, reference))
    shutil.rmtree(cfg.output.dir, ignore_errors=True)  # no cached reference log-probs from an earlier run
    run_dir, model, tokenizer, data, obj = load_run(cfg)
    if data.stats["truncated"]:
        sys.exit(f"{data.stats['truncated']} pairs were truncated; raise MAX_LEN")
    loaded = rss_mib()
    started = time.perf_counter()
    if obj.prepare is not None:  # the precomputed reference, on the base model
        obj.prepare(model, data, cfg, run_dir, tokenizer.pad_token_id, get_method(cfg.method.name))
    prepare_s = time.perf_counter() - started
    method, _, _ = apply_method(model, cfg)
    obj = obj.configured(cfg.objective, method)
    train_loop(model, data.train, data.validation, cfg, run_dir, tokenizer.pad_token_id,
               param_groups=lambda m: method.param_groups(m, cfg.method), after_step=method.after_step,
               objective=obj)
    records = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    records = [r for r in records if "loss" in r]
    return {"loaded_mib": loaded, "prepare_s": prepare_s, "threads": torch.get_num_threads(),
            "losses": [r["loss"] for r in records], "step_s": [r["step_time"] for r in records],
            "step_tokens": [round(r["tokens_per_s"] * r["step_time"]) for r in records],
            "reference": "precomputed" if reference == "precomputed" else ("none" if objective == "orpo"
                                                                            else "adapters off")}


# ---------------------------------------------------------------- workers: TRL

def trl_dataset(work: Path, tokenizer, tokenize_in_trl: bool):
    """The pairs in tunesmith's order: conversational rows (TRL tokenises), or tunesmith's token ids."""
    from datasets import Dataset

    from tunesmith.data.preference import encode_pair

    rows = pairs_in_order(work)
    if tokenize_in_trl:
        return Dataset.from_list(rows)
    encoded = [encode_pair(r, tokenizer, MAX_LEN) for r in rows]
    if any(e["truncated"] for e in encoded):
        sys.exit("a pair was truncated; raise MAX_LEN")
    return Dataset.from_list([{"prompt_ids": e["chosen_ids"][: e["prompt_len"]],
                               "chosen_ids": e["chosen_ids"][e["prompt_len"]:],
                               "rejected_ids": e["rejected_ids"][e["prompt_len"]:]} for e in encoded])


def run_trl(work: Path, steps: int, tokenize_in_trl: bool) -> dict:
    import torch
    from peft import LoraConfig, set_peft_model_state_dict
    from safetensors.torch import load_file
    from trl import DPOConfig, DPOTrainer

    from tunesmith.config import ModelConfig
    from tunesmith.models.loading import load_model_and_tokenizer
    from tunesmith.train.threads import set_cpu_threads

    class PreTokenized(DPOTrainer):
        """Takes the rows' prompt_ids, chosen_ids and rejected_ids as they are (tunesmith's tokens)."""

        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            return dataset

    set_cpu_threads(0)  # the threads tunesmith would use here
    model, tokenizer = load_model_and_tokenizer(ModelConfig())
    loaded = rss_mib()
    args = DPOConfig(output_dir=str(work / "runs" / "trl"), per_device_train_batch_size=BATCH, max_steps=steps,
                     learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
                     optim="adamw_torch", adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, max_grad_norm=CLIP,
                     seed=SEED, beta=BETA, loss_type=["sigmoid"], max_length=None, precompute_ref_log_probs=False,
                     gradient_checkpointing=checkpointing(), gradient_checkpointing_kwargs={"use_reentrant": False},
                     use_cpu=True, bf16=False, fp16=False,
                     train_sampling_strategy="sequential", dataloader_num_workers=0, dataloader_pin_memory=False,
                     logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True)
    peft_config = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                             target_modules=TARGETS, bias="none", task_type="CAUSAL_LM")
    clock = step_clock()
    trainer = (DPOTrainer if tokenize_in_trl else PreTokenized)(
        model=model, args=args, train_dataset=trl_dataset(work, tokenizer, tokenize_in_trl),
        processing_class=tokenizer, peft_config=peft_config, callbacks=[clock])
    # TRL's reference: no second model, and no "ref" adapter copy: the adapters are disabled for it
    assert trainer.ref_model is None and list(trainer.model.peft_config) == ["default"]
    result = set_peft_model_state_dict(trainer.model, load_file(str(work / "init_adapter.safetensors")))
    assert not result.unexpected_keys, result.unexpected_keys
    trainer.train()
    rows = trainer.train_dataset
    tokens = [sum(2 * len(p) + len(c) + len(r) for p, c, r in
                  zip(*(rows[s * BATCH : (s + 1) * BATCH][k] for k in ("prompt_ids", "chosen_ids", "rejected_ids"))))
              for s in range(steps)]
    return {"loaded_mib": loaded, "prepare_s": 0.0, "threads": torch.get_num_threads(),
            "losses": [r["loss"] for r in trainer.state.log_history if "loss" in r],
            "step_s": [b - a for a, b in zip(clock.times, clock.times[1:])], "step_tokens": tokens,
            "reference": "adapters off"}


def worker(name: str, work: Path, steps: int, tokenize_in_trl: bool) -> dict:
    if name == "trl-dpo":
        result = run_trl(work, steps, tokenize_in_trl)
    else:
        objective = "orpo" if name == "tunesmith-orpo" else "dpo"
        result = run_tunesmith(work, steps, objective, "precomputed" if name == "tunesmith-dpo-pre" else "adapters_off")
    return dict(result, run=name, peak_mib=peak_rss_mib())


# ---------------------------------------------------------------- the parent: runs and the table

def run_worker(name: str, work: Path, steps: int, tokenize_in_trl: bool) -> dict:
    args = ["--worker", name, "--work", str(work), "--steps", str(steps)] + (["--trl-tokenize"] if tokenize_in_trl else [])
    return run_child(__file__, args, name, ROOT)


def summarise(r: dict) -> dict:
    """Seconds per step and tokens per second over the steps after the first."""
    seconds, tokens = sum(r["step_s"][1:]), sum(r["step_tokens"][1:])
    n = max(1, len(r["step_s"]) - 1)
    return dict(r, s_per_step=seconds / n, tokens_per_s=tokens / seconds if seconds else float("nan"))


def report(results: dict[str, dict]) -> tuple[str, dict]:
    """The markdown tables and the numbers checked against the targets."""
    ours, trl = results.get("tunesmith-dpo"), results.get("trl-dpo")
    lines = ["| run | reference | s/step | tokens/s | RSS after load | peak RSS | peak - load | "
             "loss step 1 | loss last step |", "|---|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        extra = f" (+{r['prepare_s']:.1f} s once)" if r["reference"] == "precomputed" else ""
        lines.append(f"| {name} | {r['reference']}{extra} | {r['s_per_step']:.3f} | {r['tokens_per_s']:,.0f} | "
                     f"{r['loaded_mib']:,.0f} MiB | {r['peak_mib']:,.0f} MiB | {r['peak_mib'] - r['loaded_mib']:,.0f} MiB"
                     f" | {r['losses'][0]:.6f} | {r['losses'][-1]:.6f} |")
    checks = {}
    if ours and trl:
        rel = [abs(a - b) / abs(b) for a, b in zip(ours["losses"], trl["losses"])]
        lines += ["", "| step | tunesmith loss | TRL loss | relative difference |", "|---|---|---|---|"]
        lines += [f"| {i + 1} | {a:.6f} | {b:.6f} | {d:.1e} |"
                  for i, (a, b, d) in enumerate(zip(ours["losses"], trl["losses"], rel))]
        checks["tokens_per_s_ratio"] = ours["tokens_per_s"] / trl["tokens_per_s"]
        checks["peak_rss_ratio"] = ours["peak_mib"] / trl["peak_mib"]
        checks["loss_max_rel_diff"] = max(rel)
        checks["tokens"] = [sum(ours["step_tokens"][1:]), sum(trl["step_tokens"][1:])]
    pre, orpo = results.get("tunesmith-dpo-pre"), results.get("tunesmith-orpo")
    if pre and orpo:
        checks["dpo_pre_vs_orpo_step_ratio"] = pre["s_per_step"] / orpo["s_per_step"]
    lines += ["", "| check | measured | target | |", "|---|---|---|---|"]
    if "tokens" in checks:
        a, b = checks["tokens"]
        lines.append(f"| real tokens in steps 2 on, tunesmith and TRL | {a:,} and {b:,} | equal | {verdict(a == b)} |")
    rows = [("tunesmith / TRL tokens per second", "tokens_per_s_ratio", f">= {SPEED_TARGET}", lambda v: v >= SPEED_TARGET),
            ("tunesmith / TRL peak RSS", "peak_rss_ratio", f"<= {MEMORY_TARGET}", lambda v: v <= MEMORY_TARGET),
            ("largest relative loss difference", "loss_max_rel_diff", f"<= {LOSS_TOL:g}", lambda v: v <= LOSS_TOL),
            ("DPO (precomputed reference) / ORPO seconds per step", "dpo_pre_vs_orpo_step_ratio",
             f"<= {PRE_VS_ORPO_TARGET}", lambda v: v <= PRE_VS_ORPO_TARGET)]
    for label, key, target, ok in rows:
        if key in checks:
            shown = f"{checks[key]:.1e}" if key == "loss_max_rel_diff" else f"{checks[key]:.2f}"
            lines.append(f"| {label} | {shown} | {target} | {verdict(ok(checks[key]))} |")
    return "\n".join(lines) + "\n", checks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=12, help="optimizer steps per run (default 12)")
    parser.add_argument("--runs", nargs="+", choices=RUNS, default=RUNS)
    parser.add_argument("--trl-tokenize", action="store_true",
                        help="let TRL tokenise the conversational rows itself (its answers keep the newline after "
                        "<|im_end|>) instead of taking tunesmith's token ids")
    parser.add_argument("--gradient-checkpointing", action="store_true",
                        help="activation checkpointing on both sides (TRL's DPOConfig default; off by default here)")
    parser.add_argument("--work", type=Path, default=ROOT / "bench" / "results" / "align")
    parser.add_argument("--json", type=Path, help="write the numbers here")
    parser.add_argument("--worker", choices=RUNS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.steps < 2:
        parser.error("--steps must be at least 2 (the first step is warm-up)")
    if args.gradient_checkpointing:
        os.environ["BENCH_ALIGN_CHECKPOINTING"] = "1"  # the workers inherit it
    if args.worker:
        print_result(worker(args.worker, args.work, args.steps, args.trl_tokenize))
        return
    args.work.mkdir(parents=True, exist_ok=True)
    info = prepare(args.work, args.steps)
    results = {}
    for name in args.runs:
        print(f"--- {name}", flush=True)
        results[name] = summarise(run_worker(name, args.work, args.steps, args.trl_tokenize))
        r = results[name]
        print(f"    {r['s_per_step']:.2f} s/step, {r['tokens_per_s']:.0f} tokens/s, peak RSS {r['peak_mib']:.0f} MiB, "
              f"losses {', '.join(f'{x:.4f}' for x in r['losses'])}", flush=True)
    text, checks = report(results)
    header = (f"{args.steps} steps of {BATCH} pairs ({info['pairs']} demo pairs), lr {LR:g} constant, beta {BETA}, "
              f"LoRA r {LORA['r']} alpha {LORA['alpha']}, fp32; torch threads {results[args.runs[0]]['threads']}; "
              f"{cpu_name()}, {os.cpu_count()} CPUs; {datetime.date.today()}; TRL "
              f"{'tokenises itself' if args.trl_tokenize else 'takes tunesmith token ids'}; gradient checkpointing "
              f"{'on' if checkpointing() else 'off'} on both sides; s/step and tokens/s "
              "over steps 2 on.\n")
    print("\n" + header + "\n" + text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"steps": args.steps, "cpu": cpu_name(), "date": str(datetime.date.today()),
                                         "trl_tokenize": args.trl_tokenize, "checks": checks, "results": results},
                                        indent=2), encoding="utf-8")


if __name__ == "__main__":
    main()
