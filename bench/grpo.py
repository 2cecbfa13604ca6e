"""tunesmith GRPO against TRL's GRPOTrainer on the same prompts: generated tokens per second and a step's peak memory,
with an SFT step over the same tokens for the memory ratio.

    .venv-test/bin/python bench/grpo.py                    # the default model; 6 steps of 4 prompts x 8 samples
    .venv-test/bin/python bench/grpo.py --tiny             # a tiny random model: proves the pipeline in a minute
    .venv-test/bin/python bench/grpo.py --device cuda --json bench/results/grpo.json

It runs in .venv-test, the test environment: TRL and peft are test and benchmark dependencies of tunesmith, not
runtime ones. Nothing is downloaded: TRL is handed the model and tokenizer that tunesmith loads from its local
cache (SmolLM2-135M-Instruct, converted once), or, with --tiny, a 2-layer random Llama with SmolLM2's tokenizer.

Three runs, one after another, each in a fresh process (so each has its own peak memory):

  tunesmith-grpo  tunesmith's loop, objective grpo: tunesmith/rl/sampling.py samples (each prompt prefilled once,
                  its KV cache shared by its G samples, finished rows leave the batch); every sequence is forwarded,
                  flat groups (all G rewards equal) too, so the SFT step below sees the same tokens (--skip-flat:
                  tunesmith's default, flat groups stay out of the forward and backward, as TRL cannot do)
  trl-grpo        trl.GRPOTrainer with a peft LoraConfig and transformers generation (`model.generate`, no vLLM):
                  its generation batch holds every prompt G times
  tunesmith-sft   tunesmith SFT steps over the very sequences tunesmith-grpo sampled (prompt + completion, labels
                  on the completion, right-padded as GRPO's batches, as many rows a step): the memory baseline

Everything else is equal: the same prompts (the demo's prompt_train.jsonl rows, in tunesmith's epoch order; TRL
takes them in that order with shuffle_dataset=False), G, max new tokens, temperature 0.6 as the demo's (top-p 1,
top-k off; at 1 the base model rambles and nearly every group is flat), the
reward (the built-in field_accuracy, which has TRL's reward signature), beta 0 (no reference forward), loss_type
dapo, scale_rewards group, one update per rollout, LoRA r 16 / alpha 32 / dropout 0 on q, k, v, o, gate, up and
down with the same initial adapter (tunesmith's seeded init, loaded into TRL's peft model), AdamW at a constant lr,
clipping at 1.0, no gradient checkpointing, the same torch threads, fp32 on the CPU (the loader's dtype on CUDA).

Measured per run: seconds per step from the second step on (the first is warm-up); the generation phase's seconds
and generated tokens (a completion's tokens up to and including its end token) around tunesmith's sampler and
TRL's `_generate_single_turn`; generated tokens per second = generated tokens / generation seconds (the figure of
TRL issues 2610 and 2971), and over whole steps; memory after loading and the peak (CPU: RSS, VmHWM; CUDA:
torch.cuda.max_memory_allocated), and the steps' increment peak - after loading, which the ratio compares.

Targets (issue 12): tunesmith >= 2x TRL's generated tokens per second; the increment of a GRPO step <= 1.3x that of
an SFT step over the same tokens.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))  # run as a script: its neighbours import by name
from child import cpu_name, print_result, rss_mib, run_child, step_clock, verdict  # noqa: E402
sys.path.insert(0, str(ROOT))  # the workers import tunesmith from this checkout
RUNS = ["tunesmith-grpo", "trl-grpo", "tunesmith-sft"]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LORA = {"r": 16, "alpha": 32, "dropout": 0.0}
LR, SEED, CLIP, TEMPERATURE, REWARD = 1e-5, 0, 1.0, 0.6, "field_accuracy"
FULL = {"steps": 6, "prompts": 4, "generations": 8, "max_new_tokens": 64}
TINY = {"steps": 3, "prompts": 2, "generations": 4, "max_new_tokens": 16}
TINY_SHAPE = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2}
SPEED_TARGET, MEMORY_TARGET = 2.0, 1.3


# ---------------------------------------------------------------- shared by the parent and the workers

def memory_now(device: str) -> float:
    """MiB in use: CUDA's allocated memory, else the process's RSS."""
    import torch

    return torch.cuda.memory_allocated() / 2**20 if device == "cuda" else rss_mib()


def memory_peak(device: str) -> float:
    """MiB at the peak: CUDA's max allocated since the last reset (after loading), else the process's peak RSS."""
    import torch

    from tunesmith.models.loading import peak_rss_mib

    return torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else peak_rss_mib()


def loaded_mark(device: str) -> float:
    """Memory after loading; CUDA's peak counter starts from here."""
    import torch

    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    return memory_now(device)


def settings(work: Path) -> dict:
    return json.loads((work / "settings.json").read_text())


def prompt_rows(work: Path) -> list[dict]:
    return [json.loads(line) for line in (work / "prompts.jsonl").read_text(encoding="utf-8").splitlines()]


def rows_in_order(work: Path) -> list[dict]:
    """The prompt rows in tunesmith's epoch-0 order, as TRL is to see them."""
    from tunesmith.data.dataset import epoch_order

    rows = prompt_rows(work)
    return [rows[i] for i in epoch_order(len(rows), SEED, 0)]


# ---------------------------------------------------------------- the parent: data, model, initial adapter

def write_tiny_model(folder: Path) -> str:
    """A random 2-layer Llama with SmolLM2's tokenizer and generation config (its end tokens)."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    from tunesmith.config import ModelConfig
    from tunesmith.models.loading import load_model_and_tokenizer

    _, tokenizer = load_model_and_tokenizer(ModelConfig(device="cpu"))
    torch.manual_seed(SEED)
    config = LlamaConfig(vocab_size=len(tokenizer), max_position_embeddings=1024, tie_word_embeddings=True,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, **TINY_SHAPE)
    model = LlamaForCausalLM(config)
    model.save_pretrained(folder)
    GenerationConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                     pad_token_id=tokenizer.pad_token_id).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def prepare(work: Path, s: dict) -> dict:
    """Write the prompts (steps x prompts demo rows), the tiny model if asked, and tunesmith's initial adapter."""
    import torch
    from safetensors.torch import save_file

    from tunesmith.config import ModelConfig
    from tunesmith.data.demo import write_demo
    from tunesmith.methods.io import adapter_state_dict
    from tunesmith.methods.registry import get_method
    from tunesmith.models.loading import load_model_and_tokenizer

    paths = write_demo(work / "demo")
    n = s["steps"] * s["prompts"]
    rows = paths["prompt_train"].read_text(encoding="utf-8").splitlines()[:n]
    (work / "prompts.jsonl").write_text("".join(r + "\n" for r in rows), encoding="utf-8")
    s["model"] = write_tiny_model(work / "tiny-model") if s["tiny"] else "smollm2-135m-instruct"
    (work / "settings.json").write_text(json.dumps(s, indent=2))
    cfg = tunesmith_config(work, s, "grpo")
    model, _ = load_model_and_tokenizer(cfg.model, torch.device("cpu"))
    torch.manual_seed(cfg.train.seed)  # as tunesmith's apply_method does
    get_method(cfg.method.name).apply(model, cfg.method)
    save_file(adapter_state_dict(model), str(work / "init_adapter.safetensors"))
    return {"prompts": len(rows)}


# ---------------------------------------------------------------- workers: tunesmith

def tunesmith_config(work: Path, s: dict, objective: str):
    from tunesmith.config import load_config

    overrides = [
        f"model.name_or_path={s['model']}", f"model.device={s['device']}",
        f"data.train={work / 'prompts.jsonl'}", "data.format=prompt", "data.val_split=0", "data.cache=false",
        "data.max_seq_len=1024", "data.packing=false",
        "method.name=lora", f"method.r={LORA['r']}", f"method.alpha={LORA['alpha']}",
        f"method.dropout={LORA['dropout']}", f"method.target_modules=[{','.join(TARGETS)}]",
        "objective.name=grpo", f"objective.rewards=[{REWARD}]", f"objective.num_generations={s['generations']}",
        f"objective.max_new_tokens={s['max_new_tokens']}", f"objective.temperature={TEMPERATURE}",
        "objective.loss_type=dapo", "objective.scale_rewards=group", "objective.num_iterations=1",
        f"train.batch_size={s['prompts']}", f"train.max_steps={s['steps']}", f"train.lr={LR}",
        "train.schedule=constant", "train.warmup_steps=0", "train.weight_decay=0", f"train.max_grad_norm={CLIP}",
        f"train.seed={SEED}", "train.gradient_checkpointing=false", "eval.before_after=false",
        f"output.dir={work / 'runs' / objective}",
    ]
    return load_config(None, overrides)


class Sampling:
    """Wraps tunesmith.rl.sampling.sample: each call's seconds and generated tokens, and the sequences drawn."""

    def __init__(self, device: str):
        import tunesmith.rl.sampling as sampling

        self.device, self.calls, self.sequences = device, [], []
        self.inner = sampling.sample
        sampling.sample = self

    def __call__(self, model, prompts, g, cfg, seeds, pad_id, *args, **kwargs):
        import torch

        started = time.perf_counter()
        out = self.inner(model, prompts, g, cfg, seeds, pad_id, *args, **kwargs)
        if self.device == "cuda":
            torch.cuda.synchronize()
        self.calls.append((time.perf_counter() - started, sum(len(c.token_ids) for group in out for c in group)))
        self.sequences += [(list(p), list(c.token_ids)) for p, group in zip(prompts, out) for c in group]
        return out


def run_tunesmith_grpo(work: Path, s: dict, skip_flat: bool) -> dict:
    """The steps of `tunesmith train` (commands/train.py) without scoring and saving."""
    import shutil

    import torch

    from tunesmith.commands.train import apply_method, load_run
    from tunesmith.objectives import grpo_rollout
    from tunesmith.train.loop import train as train_loop

    grpo_rollout.SKIP_FLAT = skip_flat
    cfg = tunesmith_config(work, s, "grpo")
    shutil.rmtree(cfg.output.dir, ignore_errors=True)
    run_dir, model, tokenizer, data, obj = load_run(cfg)
    loaded = loaded_mark(s["device"])
    method, _, _ = apply_method(model, cfg, obj)
    obj = obj.configured(cfg.objective, method).bind_run(cfg, tokenizer, run_dir, data)
    sampling = Sampling(s["device"])
    train_loop(model, data.train, data.validation, cfg, run_dir, tokenizer.pad_token_id,
               param_groups=lambda m: method.param_groups(m, cfg.method), after_step=method.after_step, objective=obj)
    records = [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    (work / "sequences.json").write_text(json.dumps(sampling.sequences))
    return {"loaded_mib": loaded, "peak_mib": memory_peak(s["device"]), "threads": torch.get_num_threads(),
            "step_s": [r["step_time"] for r in records], "gen_s": [c[0] for c in sampling.calls],
            "gen_tokens": [c[1] for c in sampling.calls], "rewards": [r["reward"] for r in records],
            "flat": [r["frac_reward_zero_std"] for r in records], "losses": [r["loss"] for r in records]}


def run_tunesmith_sft(work: Path, s: dict) -> dict:
    """SFT steps over tunesmith-grpo's sequences: prompt + completion, labels on the completion, as many rows a step
    as a GRPO step holds, right-padded."""
    import shutil

    import torch

    from tunesmith.commands.train import apply_method
    from tunesmith.data.tokenize import IGNORE
    from tunesmith.models.loading import load_model_and_tokenizer
    from tunesmith.objectives.registry import get_objective
    from tunesmith.train.loop import train as train_loop
    from tunesmith.train.threads import set_cpu_threads

    cfg = tunesmith_config(work, s, "sft")
    rows = s["prompts"] * s["generations"]
    cfg = cfg.model_copy(update={"objective": cfg.objective.model_copy(update={"name": "sft"}),
                                 "train": cfg.train.model_copy(update={"batch_size": rows})})
    shutil.rmtree(cfg.output.dir, ignore_errors=True)
    examples = [{"input_ids": p + c, "labels": [IGNORE] * len(p) + c}
                for p, c in json.loads((work / "sequences.json").read_text())]
    if s["device"] == "cpu":
        set_cpu_threads(cfg.train.threads)  # as load_run does for the GRPO run
    model, tokenizer = load_model_and_tokenizer(cfg.model)
    loaded = loaded_mark(s["device"])
    method, _, _ = apply_method(model, cfg)
    run_dir = Path(cfg.output.dir)
    train_loop(model, examples, [], cfg, run_dir, tokenizer.pad_token_id,
               param_groups=lambda m: method.param_groups(m, cfg.method), after_step=method.after_step,
               objective=get_objective("sft"))
    records = [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    return {"loaded_mib": loaded, "peak_mib": memory_peak(s["device"]), "threads": torch.get_num_threads(),
            "step_s": [r["step_time"] for r in records], "gen_s": [], "gen_tokens": [], "rewards": [], "flat": [],
            "losses": [r["loss"] for r in records], "rows": len(examples)}


# ---------------------------------------------------------------- workers: TRL

def run_trl(work: Path, s: dict) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig, set_peft_model_state_dict
    from safetensors.torch import load_file
    from trl import GRPOConfig, GRPOTrainer

    from tunesmith.config import ModelConfig
    from tunesmith.models.loading import load_model_and_tokenizer
    from tunesmith.rl.rewards import BUILT_INS
    from tunesmith.train.threads import set_cpu_threads

    if s["device"] == "cpu":
        set_cpu_threads(0)  # the threads tunesmith would use here
    model, tokenizer = load_model_and_tokenizer(ModelConfig(name_or_path=s["model"], device=s["device"]))
    loaded = loaded_mark(s["device"])
    g = s["generations"]
    args = GRPOConfig(output_dir=str(work / "runs" / "trl"), per_device_train_batch_size=s["prompts"] * g,
                      gradient_accumulation_steps=1, num_generations=g, max_completion_length=s["max_new_tokens"],
                      temperature=TEMPERATURE, top_p=1.0, top_k=0, beta=0.0, loss_type="dapo", scale_rewards="group",
                      num_iterations=1, epsilon=0.2, shuffle_dataset=False, remove_unused_columns=False,
                      max_steps=s["steps"], learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0,
                      weight_decay=0.0, optim="adamw_torch", adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8,
                      max_grad_norm=CLIP, seed=SEED, gradient_checkpointing=False, use_cpu=s["device"] == "cpu",
                      bf16=False, fp16=False, dataloader_num_workers=0, dataloader_pin_memory=False, logging_steps=1,
                      save_strategy="no", report_to="none", disable_tqdm=True)
    peft_config = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                             target_modules=TARGETS, bias="none", task_type="CAUSAL_LM")
    clock = step_clock()
    trainer = GRPOTrainer(model=model, reward_funcs=[BUILT_INS[REWARD]], args=args,
                          train_dataset=Dataset.from_list(rows_in_order(work)), processing_class=tokenizer,
                          peft_config=peft_config, callbacks=[clock])
    result = set_peft_model_state_dict(trainer.model, load_file(str(work / "init_adapter.safetensors")))
    assert not result.unexpected_keys, result.unexpected_keys
    calls, inner = [], trainer._generate_single_turn

    def timed(*a, **kw):
        started = time.perf_counter()
        out = inner(*a, **kw)
        if s["device"] == "cuda":
            torch.cuda.synchronize()
        calls.append((time.perf_counter() - started, sum(len(c) for c in out[0])))
        return out

    trainer._generate_single_turn = timed
    trainer.train()
    history = [r for r in trainer.state.log_history if "loss" in r]
    return {"loaded_mib": loaded, "peak_mib": memory_peak(s["device"]), "threads": torch.get_num_threads(),
            "step_s": [b - a for a, b in zip(clock.times, clock.times[1:])], "gen_s": [c[0] for c in calls],
            "gen_tokens": [c[1] for c in calls], "rewards": [r.get("reward", float("nan")) for r in history],
            "flat": [r.get("frac_reward_zero_std", float("nan")) for r in history],
            "losses": [r["loss"] for r in history]}


def worker(name: str, work: Path, skip_flat: bool) -> dict:
    s = settings(work)
    if name == "trl-grpo":
        result = run_trl(work, s)
    elif name == "tunesmith-sft":
        result = run_tunesmith_sft(work, s)
    else:
        result = run_tunesmith_grpo(work, s, skip_flat)
    return dict(result, run=name)


# ---------------------------------------------------------------- the parent: runs and the table

def run_worker(name: str, work: Path, skip_flat: bool) -> dict:
    args = ["--worker", name, "--work", str(work)] + (["--skip-flat"] if skip_flat else [])
    return run_child(__file__, args, name, ROOT)


def summarise(r: dict) -> dict:
    """Over the steps after the first (warm-up): seconds per step, generation seconds and tokens per step, generated
    tokens per second of generation and of whole steps; the memory the steps added over the loaded model."""
    later = lambda xs: xs[1:] if len(xs) > 1 else xs  # noqa: E731
    steps, gen_s, gen_tokens = later(r["step_s"]), later(r["gen_s"]), later(r["gen_tokens"])
    out = dict(r, s_per_step=sum(steps) / max(1, len(steps)), increment_mib=r["peak_mib"] - r["loaded_mib"])
    if gen_s:
        out.update(gen_s_per_step=sum(gen_s) / len(gen_s), gen_tokens_per_step=sum(gen_tokens) / len(gen_tokens),
                   gen_tokens_per_s=sum(gen_tokens) / sum(gen_s), step_gen_tokens_per_s=sum(gen_tokens) / sum(steps))
    return out


def fmt(value, spec: str) -> str:
    return format(value, spec) if isinstance(value, (int, float)) else "-"


def report(results: dict[str, dict], device: str) -> tuple[str, dict]:
    """The markdown tables and the numbers checked against the targets."""
    unit = "allocated" if device == "cuda" else "RSS"
    lines = [f"| run | s/step | generation s/step | generated tokens/step | generated tokens/s (generation) | "
             f"generated tokens/s (whole step) | {unit} after load | peak {unit} | peak - load | "
             "reward first -> last |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        rewards = f"{r['rewards'][0]:.3f} -> {r['rewards'][-1]:.3f}" if r["rewards"] else "-"
        lines.append(f"| {name} | {r['s_per_step']:.2f} | {fmt(r.get('gen_s_per_step'), '.2f')} | "
                     f"{fmt(r.get('gen_tokens_per_step'), ',.0f')} | {fmt(r.get('gen_tokens_per_s'), ',.0f')} | "
                     f"{fmt(r.get('step_gen_tokens_per_s'), ',.0f')} | {r['loaded_mib']:,.0f} MiB | "
                     f"{r['peak_mib']:,.0f} MiB | {r['increment_mib']:,.0f} MiB | {rewards} |")
    ours, trl, sft = (results.get(k) for k in RUNS)
    checks = {}
    if ours and trl:
        checks["gen_tokens_per_s_ratio"] = ours["gen_tokens_per_s"] / trl["gen_tokens_per_s"]
        checks["step_gen_tokens_per_s_ratio"] = ours["step_gen_tokens_per_s"] / trl["step_gen_tokens_per_s"]
    if ours and sft:
        checks["step_increment_vs_sft"] = ours["increment_mib"] / max(1e-9, sft["increment_mib"])
        checks["peak_vs_sft"] = ours["peak_mib"] / sft["peak_mib"]
    lines += ["", "| check | measured | target | |", "|---|---|---|---|"]
    rows = [("tunesmith / TRL generated tokens per second (generation)", "gen_tokens_per_s_ratio", SPEED_TARGET, True),
            ("tunesmith / TRL generated tokens per second (whole steps)", "step_gen_tokens_per_s_ratio", None, True),
            (f"GRPO step / SFT step over the same tokens: peak - load ({unit})", "step_increment_vs_sft",
             MEMORY_TARGET, False),
            (f"GRPO / SFT peak {unit}", "peak_vs_sft", None, False)]
    for label, key, target, higher in rows:
        if key in checks:
            v = checks[key]
            if target is None:
                lines.append(f"| {label} | {v:.2f} | (shown) | |")
            else:
                ok = v >= target if higher else v <= target
                lines.append(f"| {label} | {v:.2f} | {'>=' if higher else '<='} {target} | {verdict(ok)} |")
    return "\n".join(lines) + "\n", checks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="a 2-layer random model and a few short steps")
    parser.add_argument("--steps", type=int, help=f"optimizer steps per run (default {FULL['steps']}; "
                        f"--tiny {TINY['steps']})")
    parser.add_argument("--prompts", type=int, help="prompts per step")
    parser.add_argument("--generations", type=int, help="G, samples per prompt")
    parser.add_argument("--max-new-tokens", type=int, help="the longest completion")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--runs", nargs="+", choices=RUNS, default=RUNS)
    parser.add_argument("--skip-flat", action="store_true",
                        help="tunesmith leaves flat groups out of the forward (its default; off here so that the SFT "
                        "step's tokens are the GRPO step's)")
    parser.add_argument("--work", type=Path, default=ROOT / "bench" / "results" / "grpo")
    parser.add_argument("--json", type=Path, help="write the numbers here")
    parser.add_argument("--worker", choices=RUNS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print_result(worker(args.worker, args.work, args.skip_flat))
        return
    s = dict(TINY if args.tiny else FULL, tiny=args.tiny, device=args.device)
    for key in ("steps", "prompts", "generations", "max_new_tokens"):
        if getattr(args, key) is not None:
            s[key] = getattr(args, key)
    if s["steps"] < 2:
        parser.error("--steps must be at least 2 (the first step is warm-up)")
    if "tunesmith-sft" in args.runs and "tunesmith-grpo" not in args.runs:
        parser.error("tunesmith-sft trains on tunesmith-grpo's samples: run both")
    args.work.mkdir(parents=True, exist_ok=True)
    info = prepare(args.work, s)
    results = {}
    for name in [r for r in RUNS if r in args.runs]:
        print(f"--- {name}", flush=True)
        results[name] = summarise(run_worker(name, args.work, args.skip_flat))
        r = results[name]
        print(f"    {r['s_per_step']:.2f} s/step, generated tokens/s {fmt(r.get('gen_tokens_per_s'), '.0f')}, "
              f"peak {r['peak_mib']:.0f} MiB (+{r['increment_mib']:.0f} over loading)", flush=True)
    text, checks = report(results, args.device)
    first = next(iter(results.values()))
    header = (f"{s['steps']} steps of {s['prompts']} prompts x G {s['generations']}, at most {s['max_new_tokens']} new "
              f"tokens, temperature {TEMPERATURE}, reward {REWARD}, lr {LR:g} constant, LoRA r {LORA['r']} alpha "
              f"{LORA['alpha']}; model {'tiny random (--tiny)' if s['tiny'] else s['model']}; {args.device}; torch "
              f"threads {first['threads']}; {cpu_name()}, {os.cpu_count()} CPUs; {datetime.date.today()}; flat groups "
              f"{'skipped' if args.skip_flat else 'forwarded'} by tunesmith; per-step figures over steps 2 on; "
              f"{info['prompts']} prompts.\n")
    print("\n" + header + "\n" + text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"settings": s, "cpu": cpu_name(), "date": str(datetime.date.today()),
                                         "checks": checks, "results": results}, indent=2), encoding="utf-8")


if __name__ == "__main__":
    main()
