"""Every method on the same task, step budget and seed: a markdown table and a chart.

    .venv/bin/python bench/compare_methods.py --steps 40 --eval-samples 100 --out bench/results
    .venv/bin/python bench/compare_methods.py --steps 3 --eval-samples 0 --n-validation 16   # costs only, quick

The task is the demo's JSON extraction, `hard` variant (tunesmith.data.demo.write_demo), on the
default model SmolLM2-135M-Instruct, with tunesmith/configs/demo.yaml's settings (batch 8, cosine
schedule with warmup) and the same seed for every method. Each method runs `tunesmith train` in a
fresh process; per method the table reports

  trainable        parameters that receive gradients
  artifact         bytes on disk of what `train` saved (run_dir/adapter)
  peak RSS         the process's peak resident memory (model load, training, test scoring)
                   (--rss-live: glibc's mmap threshold fixed so that only live tensors count)
  step             mean step_time of metrics.jsonl (data, forward, backward, optimizer, the method's
                   after_step, logging), over all but the first step (warm-up)
  val loss         validation loss after the last step
  exact match      share of test rows (the first --eval-samples) answered exactly right;
                   --eval-samples 0 skips test scoring (and the base row)

Each method trains at a learning rate in its usual range (LR below; --lr overrides them all);
VeRA uses r 256, as its paper does. A `base` row gives the untrained model's exact match.
Everything runs on this machine's CPU unless CUDA is present; timings depend on the machine
and on what else runs on it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

METHODS = ["lora", "lora_fa", "dora", "vera", "delta_lora", "adapter", "freeze", "full", "peft"]
LR = {"lora": 5e-4, "lora_fa": 5e-4, "dora": 5e-4, "delta_lora": 5e-4, "vera": 5e-3, "adapter": 5e-4,
      "freeze": 1e-4, "full": 5e-5, "peft": 5e-3}
EXTRA = {
    "vera": ["method.r=256"],
    "peft": ["method.peft_config={peft_type: IA3, target_modules: [k_proj, v_proj, down_proj], "
             "feedforward_modules: [down_proj]}"],
}


def worker(method: str, data: Path, run_dir: Path, steps: int, seed: int, eval_samples: int, lr: float | None,
           score_base: bool) -> dict:
    """Train one method in this process; return its row of the table."""
    import logging

    from tunesmith.commands.train import DEMO_CONFIG, train
    from tunesmith.config import load_config
    from tunesmith.evaluate.report import read_metrics

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    test = [f"data.test={data / 'test.jsonl'}"] if eval_samples else []  # without a test file: no scoring
    overrides = [
        f"data.train={data / 'train.jsonl'}", f"data.validation={data / 'validation.jsonl'}", *test,
        f"output.dir={run_dir}", f"method.name={method}",
        f"train.max_steps={steps}", f"train.seed={seed}", f"train.lr={lr or LR[method]}",
        "train.save_every=0", "train.eval_every=0", f"eval.max_samples={eval_samples}",
        f"eval.before_after={'true' if score_base else 'false'}", *EXTRA.get(method, []),
    ]
    summary = train(load_config(DEMO_CONFIG, overrides))
    # Each step's time as the loop recorded it, without the first (it pays for warm-up).
    intervals = [r["step_time"] for r in read_metrics(run_dir / "metrics.jsonl") if "step_time" in r][1:]
    artifact = sum(f.stat().st_size for f in (run_dir / "adapter").rglob("*") if f.is_file())
    peak = next(int(l.split()[1]) for l in Path("/proc/self/status").read_text().splitlines()
                if l.startswith("VmHWM:"))
    return {"method": method, "lr": lr or LR[method], "trainable": summary["trainable"], "total": summary["total"],
            "artifact_bytes": artifact, "peak_rss_mib": peak / 1024,
            "step_s": sum(intervals) / len(intervals) if intervals else None,
            "val_loss": summary["val_loss"], "exact_match": (summary["after"] or {}).get("exact_match"),
            "base_exact_match": (summary["before"] or {}).get("exact_match")}


def fmt_bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)


def table(rows: list[dict], args) -> str:
    scored = f"exact match on the first {args.eval_samples} test rows" if args.eval_samples else "test not scored"
    lines = [f"SmolLM2-135M-Instruct, demo task `hard`, {args.steps} steps of batch 8, seed {args.seed}, "
             f"validation loss on {args.n_validation} rows, {scored}.", "",
             "| method | lr | trainable | artifact | peak RSS | step | val loss | exact match |",
             "|---|---|---|---|---|---|---|---|"]
    base = next((r["base_exact_match"] for r in rows if r.get("base_exact_match") is not None), None)
    if base is not None:
        lines.append(f"| base model | | | | | | | {base:.1f}% |")
    for r in rows:
        share = 100 * r["trainable"] / r["total"]
        step = f"{r['step_s']:.2f} s" if r["step_s"] is not None else "n/a"
        val = f"{r['val_loss']:.4f}" if r["val_loss"] is not None else "n/a"
        em = f"{r['exact_match']:.1f}%" if r["exact_match"] is not None else "n/a"
        lines.append(f"| {r['method']} | {r['lr']:g} | {r['trainable']:,} ({share:.2f}%) | "
                     f"{fmt_bytes(r['artifact_bytes'])} | {r['peak_rss_mib']:,.0f} MiB | {step} | {val} | {em} |")
    return "\n".join(lines) + "\n"


def chart(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["method"] for r in rows]
    panels = [("trainable parameters", [r["trainable"] for r in rows], True),
              ("artifact size (MB)", [r["artifact_bytes"] / 1e6 for r in rows], True),
              ("peak RSS (MiB)", [r["peak_rss_mib"] for r in rows], False),
              ("mean step time (s)", [r["step_s"] for r in rows], False),
              ("final validation loss", [r["val_loss"] for r in rows], False),
              ("test exact match (%)", [r["exact_match"] for r in rows], False)]
    panels = [p for p in panels if any(v is not None for v in p[1])]  # e.g. no scoring: no exact match
    fig, axes = plt.subplots(2, 3, figsize=(15, 7.5))
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    for ax, (title, values, log) in zip(axes.flat, panels):
        ax.bar(names, [v or 0 for v in values], color="#4c72b0")
        ax.set_title(title)
        if log:
            ax.set_yscale("log")
        ax.tick_params(axis="x", rotation=45)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated (default: all)")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-samples", type=int, default=100, help="test rows to score; 0: no scoring")
    parser.add_argument("--n-validation", type=int, default=100, help="validation rows (demo data)")
    parser.add_argument("--lr", type=float, help="one learning rate for every method (default: per method)")
    parser.add_argument("--out", default="bench/results", help="folder for data, runs, table and chart")
    parser.add_argument("--rss-live", action="store_true", help="peak RSS of live tensors only (slower steps)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--score-base", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    out = Path(args.out).resolve()
    data = out / "data"
    if args.worker:
        row = worker(args.worker, data, out / "runs" / args.worker, args.steps, args.seed, args.eval_samples,
                     args.lr, args.score_base)
        print("RESULT " + json.dumps(row))
        return

    from tunesmith.data.demo import write_demo

    write_demo(data, seed=args.seed, variant="hard", n_validation=args.n_validation)
    rows = []
    for i, method in enumerate(args.methods.split(",")):
        cmd = [sys.executable, __file__, "--worker", method, "--steps", str(args.steps), "--seed", str(args.seed),
               "--eval-samples", str(args.eval_samples), "--out", str(out)]
        cmd += ["--lr", str(args.lr)] if args.lr else []
        cmd += ["--score-base"] if i == 0 else []  # the untrained model's score, once
        print(f"[{i + 1}/{len(args.methods.split(','))}] {method} ...", flush=True)
        # --rss-live: a fixed mmap threshold makes freed tensors leave RSS, so the peak follows live memory
        # rather than glibc's caching, but page faults then make every step ~40% slower (docs/speed.md)
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536") if args.rss_live else None
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
        result = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
        if proc.returncode != 0 or not result:
            print(proc.stdout[-2000:], proc.stderr[-4000:], sep="\n", file=sys.stderr)
            raise SystemExit(f"{method} failed (exit {proc.returncode})")
        rows.append(json.loads(result[-1][len("RESULT "):]))
        (out / "results.json").write_text(json.dumps(rows, indent=2), encoding="utf-8")
    text = table(rows, args)
    (out / "results.md").write_text(text, encoding="utf-8")
    chart(rows, out / "results.png")
    print(text)
    print(f"table: {out / 'results.md'}\nchart: {out / 'results.png'}")


if __name__ == "__main__":
    main()
