"""`tunesmith data demo`: write the built-in demo task in the file format users bring; `tunesmith data harness`:
the built-in lm-evaluation-harness tasks (evaluate/harness_tasks.py)."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers) -> None:
    p = subparsers.add_parser("data", help="data utilities", description="Data utilities.")
    data_sub = p.add_subparsers(dest="data_command", required=True, metavar="DATA_COMMAND")
    d = data_sub.add_parser("demo", help="write a built-in demo task (train/validation/test JSONL)",
                            description="Write a built-in demo task (seeded) as train/validation/test JSONL, in the "
                            "same format users bring. --task json (default): JSON extraction, and the same rows as "
                            "preference pairs (preference_*.jsonl), unpaired rows (unpaired_*.jsonl) and prompts "
                            "with their answer for GRPO (prompt_*.jsonl); --task qa: "
                            "questions on a short text with one-sentence answers (free text, docs/evaluation.md).")
    d.add_argument("--out", required=True, help="output folder")
    d.add_argument("--seed", type=int, default=0, help="generator seed (default 0)")
    d.add_argument("--task", choices=["json", "qa"], default="json", help="which task (default json)")
    d.add_argument("--variant", choices=["easy", "hard"], default="easy",
                   help="json task difficulty (default easy)")
    d.set_defaults(run=_run_demo_data)
    h = data_sub.add_parser("harness", help="write tunesmith's lm-evaluation-harness tasks (YAML + JSONL)",
                            description="Write the built-in lm-evaluation-harness tasks (seeded, offline): "
                            "tunesmith_json_choice, tunesmith_qa_choice (multiple choice) and tunesmith_arithmetic "
                            "(generate until), a folder each with the task YAML over local JSONL; for lm-eval "
                            "--include_path, or to copy and edit (docs/evaluation.md). tunesmith eval --harness "
                            "needs no such step: it writes them into its cache.")
    h.add_argument("--out", required=True, help="output folder")
    h.add_argument("--seed", type=int, default=0, help="generator seed (default 0)")
    h.set_defaults(run=_run_harness_data)


def _run_demo_data(args: argparse.Namespace) -> None:
    paths = write_demo_data(Path(args.out), args.seed, args.variant, args.task)
    for split, path in paths.items():
        print(f"{split}: {path}")


def _run_harness_data(args: argparse.Namespace) -> None:
    from tunesmith.evaluate.harness_tasks import write_tasks

    for name, path in write_tasks(Path(args.out), args.seed).items():
        print(f"{name}: {path}")


def write_demo_data(out: Path, seed: int = 0, variant: str = "easy", task: str = "json") -> dict:
    if task == "qa":
        from tunesmith.data.qa import write_qa

        return write_qa(out, seed=seed)
    from tunesmith.data.demo import write_demo

    return write_demo(out, seed=seed, variant=variant)
