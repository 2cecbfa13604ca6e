"""Peak memory and wall time of merging three models of the default size: tunesmith merge vs mergekit 0.1.5.

    .venv-test/bin/python bench/merge.py [--methods linear,ties,dare_ties] [--tools tunesmith,mergekit]
                                         [--repeats 3] [--keep DIR]

Makes three models from the default model (SmolLM2-135M-Instruct) in a temporary folder: the base
itself (m0) and two copies perturbed with seeded noise (m1, m2; W + 1e-3 N(0, 1), generator seeded
with i), written tensor by tensor. Each method's recipe merges the three (linear: the three
weighted alike; ties and dare_ties: m1 and m2 on the base m0, density 0.5), once by `tunesmith merge` and once by
mergekit's run_merge (mergekit is a test dependency: pip install 'tunesmith[test]'), each in its own
child process (`bench/merge.py --child ...`). The child reads its own peak resident set, VmHWM in
/proc/self/status, when its merge is done (wait4's ru_maxrss would include the parent's peak,
inherited at fork), and its VmRSS before the merge (the interpreter, torch and the library
imported); the merge's wall time is timed inside the child (imports excluded). tunesmith runs in two
children: one as `tunesmith merge` runs (transformers imported by the check after the merge loop), which
gives its peak and process time, and one with the modules the merge imports on first use imported before
the timer (as mergekit's imports are), which gives the merge call's wall time. tunesmith's child also
reads the peak of each phase of the merge (merge_recipe's on_phase: inputs, merge, files, check), resetting
VmHWM after each (writing 5 to /proc/self/clear_refs).

Printed: a markdown table per method with each tool's peak RSS, that peak over one model's size
(the default model's safetensors file), the RSS before merging, the wall time, and tunesmith's
ratio to mergekit. The targets (docs/merging.md): tunesmith's peak at most 1.5x one model, and a wall
time no longer than mergekit's. tunesmith's peak includes its check of the merged folder (streamed: one
tensor at a time); mergekit checks nothing. `--tools tunesmith` measures tunesmith alone (re-measuring it
after a change); `--keep DIR` keeps the models, and a later run with the same DIR reuses them.
Linux only (/proc).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RECIPES = {
    "linear": lambda m: {"models": [{"model": m[i], "parameters": {"weight": 1.0}} for i in range(3)],
                         "merge_method": "linear", "dtype": "float32"},
    "ties": lambda m: {"models": [{"model": m[i], "parameters": {"weight": 1.0, "density": 0.5}} for i in (1, 2)],
                       "base_model": m[0], "merge_method": "ties", "dtype": "float32"},
    "dare_ties": lambda m: {"models": [{"model": m[i], "parameters": {"weight": 1.0, "density": 0.5}} for i in (1, 2)],
                            "base_model": m[0], "merge_method": "dare_ties", "dtype": "float32"},
}


def status_kb(field: str) -> int:
    """A field of /proc/self/status in kB (VmHWM: the peak resident set of this process)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def child(tool: str, recipe_path: str, out: str) -> None:
    """Run one merge in this process and print {"seconds", "rss_before_kb", "peak_kb"} as JSON. Tool "tunesmith-warm":
    tunesmith with the modules its merge imports on first use imported first (its check builds the model from its
    config), as mergekit's own imports are, outside the timed merge call; their memory then counts in every phase."""
    import yaml

    tree = yaml.safe_load(Path(recipe_path).read_text())
    phases: dict[str, int] = {}
    phase_seconds: dict[str, float] = {}
    if tool == "tunesmith-warm":
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer  # noqa: F401
        from transformers.models.llama import modeling_llama  # noqa: F401
    if tool.startswith("tunesmith"):
        from tunesmith.merge.config import parse_recipe
        from tunesmith.merge.run import merge_recipe

        run = lambda: merge_recipe(parse_recipe(tree), out, seed=0, on_phase=phase_recorder(phases, phase_seconds))
    else:
        from mergekit.config import MergeConfiguration
        from mergekit.merge import run_merge
        from mergekit.options import MergeOptions

        run = lambda: run_merge(MergeConfiguration.model_validate(tree), out,
                                MergeOptions(random_seed=0, write_model_card=False, quiet=True))
    before = status_kb("VmRSS")
    start = time.perf_counter()
    run()
    seconds = time.perf_counter() - start
    phases["end"] = status_kb("VmHWM")
    print(json.dumps({"seconds": seconds, "rss_before_kb": before, "peak_kb": max(phases.values()),
                      "phases_kb": phases, "phase_seconds": phase_seconds}))


def phase_recorder(phases: dict, seconds: dict):
    """on_phase for merge_recipe: the peak resident set since the previous phase ended, then the peak reset
    (writing 5 to /proc/self/clear_refs sets VmHWM back to the current VmRSS, Linux 4.0+), and its wall time."""
    last = [time.perf_counter()]

    def on_phase(name: str) -> None:
        phases[name] = status_kb("VmHWM")
        Path("/proc/self/clear_refs").write_text("5")
        now = time.perf_counter()
        seconds[name], last[0] = now - last[0], now
    return on_phase


def make_models(root: Path) -> list[str]:
    """m0: the default model's folder; m1, m2: seeded perturbations of it, written one tensor at a time (kept from
    an earlier run in the same folder when their weights are there)."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    from tunesmith.config import DEFAULT_MODEL, ModelConfig
    from tunesmith.models.loading import resolve_model_folder

    base = resolve_model_folder(ModelConfig(name_or_path=DEFAULT_MODEL))
    models = [str(base)]
    for i in (1, 2):
        folder = root / f"m{i}"
        models.append(str(folder))
        if (folder / "model.safetensors").is_file():
            continue
        folder.mkdir(exist_ok=True)
        for f in base.iterdir():
            if f.suffix != ".safetensors":
                shutil.copy(f, folder / f.name)
        g = torch.Generator().manual_seed(i)
        out = {}
        with safe_open(base / "model.safetensors", "pt") as src:
            for key in sorted(src.keys()):
                v = src.get_tensor(key)
                out[key] = (v.float() + 1e-3 * torch.randn(v.shape, generator=g)).to(v.dtype)
        save_file(out, folder / "model.safetensors.partial", metadata={"format": "pt"})
        (folder / "model.safetensors.partial").rename(folder / "model.safetensors")  # complete, or absent
        del out
    return models


def measure(tool: str, recipe: Path, out: Path) -> dict:
    """The child's result; tunesmith's merge call timed in a second, warm child (see the module docstring)."""
    result = run_child(tool, recipe, out)
    if tool == "tunesmith":
        shutil.rmtree(out, ignore_errors=True)
        warm = run_child("tunesmith-warm", recipe, out)
        result["cold_seconds"], result["seconds"] = result["seconds"], warm["seconds"]
        result["phase_seconds"] = warm["phase_seconds"]
    return result


def run_child(tool: str, recipe: Path, out: Path) -> dict:
    cmd = [sys.executable, __file__, "--child", tool, str(recipe), str(out)]
    os.sync()  # the previous run's written model flushed first, so no run's writes wait on another's writeback
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{tool} merge failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["process_seconds"] = time.perf_counter() - start
    return result


def median_run(runs: list[dict]) -> dict:
    """The run of median merge wall time, with every run's wall time in "all_seconds" (single runs of the same
    merge varied by up to 2x on this machine: mergekit's linear took 1.1, 1.5 and 2.6 s)."""
    chosen = dict(sorted(runs, key=lambda r: r["seconds"])[len(runs) // 2])
    chosen["all_seconds"] = [r["seconds"] for r in runs]
    return chosen


def table(method: str, model_bytes: int, results: dict) -> str:
    mib = lambda kb: f"{kb / 1024:.0f} MiB"
    lines = [f"{method}: three models of {model_bytes / 2**20:.0f} MiB each",
             "| tool | peak RSS | peak / one model | RSS before merging | merge wall time (median) | runs | "
             "process wall time |",
             "|---|---|---|---|---|---|---|"]
    for tool, r in results.items():
        lines.append(f"| {tool} | {mib(r['peak_kb'])} | {r['peak_kb'] * 1024 / model_bytes:.2f}x | "
                     f"{mib(r['rss_before_kb'])} | {r['seconds']:.2f} s | "
                     f"{', '.join(f'{x:.2f}' for x in r.get('all_seconds', [r['seconds']]))} | "
                     f"{r['process_seconds']:.1f} s |")
    phases = results.get("tunesmith", {}).get("phases_kb", {})
    if phases:
        lines.append("tunesmith's peak per phase: " + ", ".join(f"{k} {mib(v)}" for k, v in phases.items()))
        lines.append(f"tunesmith's merge call with its first imports in it: {results['tunesmith']['cold_seconds']:.1f} s; "
                     "the warm call's wall time per phase: " + ", ".join(
            f"{k} {v:.2f} s" for k, v in results["tunesmith"]["phase_seconds"].items()))
    if set(results) != {"tunesmith", "mergekit"}:
        return "\n".join(lines)
    ours, theirs = results["tunesmith"], results["mergekit"]
    lines.append(f"tunesmith / mergekit: peak RSS {ours['peak_kb'] / theirs['peak_kb']:.2f}x, merge wall time "
                 f"{ours['seconds'] / theirs['seconds']:.2f}x")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default="linear,ties,dare_ties", help="comma-separated: " + ", ".join(RECIPES))
    parser.add_argument("--tools", default="tunesmith,mergekit", help="comma-separated: tunesmith, mergekit")
    parser.add_argument("--repeats", type=int, default=3,
                        help="merges per tool, taken in turn; the run of median wall time is reported (default 3)")
    parser.add_argument("--keep", help="make the models and outputs in this folder and keep them (reused when there)")
    parser.add_argument("--child", nargs=3, metavar=("TOOL", "RECIPE", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(*args.child)
    import yaml

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in RECIPES]
    if unknown:
        parser.error(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(RECIPES)}")
    tools = [t.strip() for t in args.tools.split(",") if t.strip()]
    if not tools or set(tools) - {"tunesmith", "mergekit"}:
        parser.error(f"--tools {args.tools!r}: choose from tunesmith, mergekit")
    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="tunesmith-bench-merge-"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        models = make_models(root)
        model_bytes = (Path(models[0]) / "model.safetensors").stat().st_size
        for method in methods:
            recipe = root / f"{method}.yaml"
            recipe.write_text(yaml.safe_dump(RECIPES[method](models)))
            runs = {tool: [] for tool in tools}
            for _ in range(args.repeats):  # in turn, so that a slow spell of the machine hits every tool
                for tool in tools:
                    runs[tool].append(measure(tool, recipe, root / f"{method}-{tool}"))
                    shutil.rmtree(root / f"{method}-{tool}", ignore_errors=True)
            results = {tool: median_run(r) for tool, r in runs.items()}
            print(table(method, model_bytes, results), flush=True)
            for tool in results:
                shutil.rmtree(root / f"{method}-{tool}", ignore_errors=True)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
