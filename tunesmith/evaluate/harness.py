"""`tunesmith eval CONFIG --harness TASKS`: EleutherAI's lm-evaluation-harness on the model as tunesmith holds it.

The loaded model (the base, an adapter active on it, a quantized base: whatever `tunesmith eval` would score) and
its tokenizer are wrapped in the harness's own Hugging Face model class, `lm_eval.models.huggingface.HFLM`, which
takes a model instance, and `lm_eval.simple_evaluate` runs the tasks on it: the harness's prompts, requests,
filters, metrics and standard errors, unchanged, without saving the model to a folder first. A task's score here
equals the harness's `hf` model loading the same weights from a folder (tests/test_harness.py).

Tasks are found by the harness's TaskManager in: the built-in tunesmith tasks (evaluate/harness_tasks.py, written
once into the cache), then the folders given with --harness-include (later ones win). Only when a name is in
none of them are the harness's own ~14,000 task configs indexed too (8 s), whose datasets must then already be on
disk: nothing is downloaded (docs/evaluation.md: pointing a standard benchmark at local files).
"""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from tunesmith.errors import UserError

INSTALL = "pip install 'tunesmith[harness]'"
LIST_TASKS = ("`lm-eval ls tasks --include_path DIR` lists every task the harness knows; tunesmith's own are "
              "tunesmith_json_choice, tunesmith_qa_choice, tunesmith_arithmetic (the tag tunesmith runs all three; "
              "`tunesmith data harness --out DIR` writes them)")


@dataclass(frozen=True)
class HarnessOptions:
    """What to run and how; the flags of `tunesmith eval --harness`."""

    tasks: list[str]
    include: list[str] = field(default_factory=list)  # task folders of the user's own (YAML configs)
    limit: int | None = None  # score at most this many rows per task (None: all)
    num_fewshot: int | None = None  # None: each task's own setting
    chat_template: bool = False  # render each prompt with the tokenizer's chat template
    batch_size: int = 16

    def __post_init__(self):
        if self.limit is not None and self.limit < 1:
            raise UserError(f"--harness-limit {self.limit}: give a number of rows of at least 1 (or leave it out).")
        if self.num_fewshot is not None and self.num_fewshot < 0:
            raise UserError(f"--harness-fewshot {self.num_fewshot}: give 0 or more examples.")


def require_lm_eval():
    """The lm_eval module, or a UserError saying how to install it."""
    try:
        import lm_eval
        import lm_eval.evaluator  # noqa: F401
    except ImportError as e:
        raise UserError(f"tunesmith eval --harness runs EleutherAI's lm-evaluation-harness, which is not installed "
                        f"({e}); install it with: {INSTALL}") from e
    return lm_eval


def parse_tasks(text: str) -> list[str]:
    """'a, b,c' -> ['a', 'b', 'c']; a UserError for an empty list."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise UserError(f"--harness {text!r} names no task; give a comma-separated list, e.g. --harness tunesmith. "
                        f"{LIST_TASKS}.")
    return names


def task_manager(names: list[str], include: list[str]):
    """A TaskManager that knows every name: tunesmith's tasks and `include` first; the harness's own configs only
    when needed (indexing them takes seconds). A UserError names what is unknown and how to see the tasks."""
    from lm_eval.tasks import TaskManager

    from tunesmith.evaluate.harness_tasks import builtin_tasks_dir

    for folder in include:
        if not Path(folder).is_dir():
            raise UserError(f"--harness-include {folder!r} is not a folder (a folder of harness task YAMLs).")
    paths = [str(builtin_tasks_dir()), *include]
    manager = TaskManager(include_path=paths, include_defaults=False)
    if all(n in manager.all_tasks for n in names):
        return manager
    manager = TaskManager(include_path=paths)
    unknown = [n for n in names if n not in manager.all_tasks]
    if unknown:
        raise UserError(f"Unknown harness task{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))} "
                        f"(searched the built-in tunesmith tasks, {', '.join(include) or 'no --harness-include'} and "
                        f"the harness's own). {LIST_TASKS}.")
    return manager


def harness_model(model, tokenizer, batch_size: int):
    """The harness's HFLM around the model and tokenizer in memory (no copy, no folder)."""
    from lm_eval.models.huggingface import HFLM

    quiet = logging.getLogger("lm_eval.models.huggingface")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # it warns that a model instance, not a name, was passed: that is the point
    try:
        return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    finally:
        quiet.setLevel(level)


def run_tasks(lm, manager, options: HarnessOptions, log_samples: bool = False) -> dict:
    """lm_eval.simple_evaluate on `lm` (an HFLM, or the name "hf" with model_args); the harness's result dict."""
    import lm_eval

    return lm_eval.simple_evaluate(model=lm, tasks=options.tasks, task_manager=manager, limit=options.limit,
                                   num_fewshot=options.num_fewshot, apply_chat_template=options.chat_template,
                                   batch_size=options.batch_size, log_samples=log_samples)


def scores(results: dict) -> dict[str, dict]:
    """{task: {metric[,filter]: {"value", "stderr"}}} from the harness's `results` (a stderr it could not compute,
    "N/A", becomes None); the harness's keys are "acc,none" and "acc_stderr,none"."""
    out = {}
    for task, row in results["results"].items():
        metrics = {}
        for key, value in row.items():
            metric, _, filt = key.partition(",")
            if not filt or metric.endswith("_stderr") or not isinstance(value, (int, float)):
                continue
            stderr = row.get(f"{metric}_stderr,{filt}")
            name = metric if filt == "none" else f"{metric},{filt}"
            metrics[name] = {"value": value, "stderr": stderr if isinstance(stderr, (int, float)) else None}
        out[task] = metrics
    return out


def compare(targets: list, load: Callable, options: HarnessOptions) -> dict:
    """Run the tasks on each target (`load(target)` -> (model, tokenizer); one model in memory at a time) and
    return the report: the settings and, per target, its scores, row counts and the tasks' versions."""
    lm_eval = require_lm_eval()
    manager = task_manager(options.tasks, options.include)
    report = {"lm_eval_version": getattr(lm_eval, "__version__", None), "tasks": options.tasks,
              "include": options.include, "limit": options.limit, "num_fewshot": options.num_fewshot,
              "chat_template": options.chat_template, "targets": []}
    for target in targets:
        model, tokenizer = load(target)
        results = run_tasks(harness_model(model, tokenizer, options.batch_size), manager, options)
        del model, tokenizer
        report["targets"].append({"name": target.name, "path": target.path, "kind": target.kind,
                                  "scores": scores(results), "n_samples": results.get("n-samples", {}),
                                  "n_shot": results.get("n-shot", {}), "versions": results.get("versions", {})})
    return report


def table(report: dict) -> str:
    """Markdown: a row per task and metric, a column per target, each cell "value ± stderr" as the harness
    reports them (shares as 0-1 fractions)."""
    targets = report["targets"]
    lines = ["| task | metric | " + " | ".join(t["name"] for t in targets) + " |",
             "|---|---|" + "---|" * len(targets)]
    rows = dict.fromkeys((task, metric) for t in targets for task, ms in t["scores"].items() for metric in ms)
    for task, metric in rows:
        cells = []
        for t in targets:
            s = t["scores"].get(task, {}).get(metric)
            cells.append("n/a" if s is None else f"{s['value']:.4f}" + (
                f" ± {s['stderr']:.4f}" if s["stderr"] is not None else ""))
        lines.append(f"| {task} | {metric} | " + " | ".join(cells) + " |")
    rows_scored = {task: n.get("effective") for task, n in targets[0]["n_samples"].items()}
    lines.append("")
    lines.append("lm-evaluation-harness " + str(report["lm_eval_version"]) + "; rows scored: " + ", ".join(
        f"{task} {n}" for task, n in rows_scored.items()) + "; ± the harness's standard error.")
    return "\n".join(lines)


def evaluate_harness(targets: list, load: Callable, options: HarnessOptions, out: Path) -> dict:
    """Run, print the table (stderr) and the report as JSON (stdout), and save the JSON at `out`."""
    from tunesmith.files import atomic_write_json

    report = compare(targets, load, options)
    print(table(report), file=sys.stderr)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out, report)
    print(f"harness results: {out}", file=sys.stderr)
    print(json.dumps(report, indent=2, default=str))
    return report
