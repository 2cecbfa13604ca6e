"""The two-task merge demo: two LoRA adapters trained on two built-in tasks, merged by every adapter-merge
method, each scored on both tasks' test splits.

    .venv/bin/python bench/merge_demo.py --out runs/merge-demo [--steps 50] [--test-rows 100] [--device auto]

1. `tunesmith data demo` (JSON extraction) and `tunesmith data demo --task qa` (one-sentence answers
   about a short text) into OUT/data/json and OUT/data/qa (seeded).
2. One LoRA adapter per task, trained with the demo config (tunesmith/configs/demo.yaml: r 16 on all
   linear layers, lr 5e-4, batch 8) for --steps steps, without scoring before and after.
3. The two adapters merged into one adapter, weights 1 and 1, by each method (merge/adapters.py):
   linear (their average), task_arithmetic (their sum), ties, dare_linear and dare_ties (density 0.5,
   written by SVD at rank 64, seed 0), and peft's add_weighted_adapter linear (variant: peft, factors
   combined separately) next to tunesmith's full-change merge.
4. Every adapter and merge scored on the first --test-rows rows of each task's test split with the
   task's default metrics (evaluate/: JSON field accuracy; token F1 and exact match for qa), greedy.

The table is printed and written to OUT/merge_demo.md (scores as JSON in OUT/merge_demo.json); the
adapters' rows say what each skill is alone, the merges' rows how much of both a merge keeps.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

METHODS = [  # (row name, method, merge_adapters keyword arguments)
    ("linear (average)", "linear", {}),
    ("task_arithmetic (sum)", "task_arithmetic", {}),
    ("ties d=0.5 r=64", "ties", {"density": 0.5, "rank": 64}),
    ("dare_linear d=0.5 r=64", "dare_linear", {"density": 0.5, "rank": 64}),
    ("dare_ties d=0.5 r=64", "dare_ties", {"density": 0.5, "rank": 64}),
    ("peft linear (A, B apart)", "linear", {"parameters": {"variant": "peft"}}),
]
TASKS = ("json", "qa")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/merge-demo")
    parser.add_argument("--steps", type=int, default=50, help="training steps per adapter (default 50)")
    parser.add_argument("--test-rows", type=int, default=100, help="test rows scored per task (default 100)")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()

    from tunesmith.commands.data import write_demo_data
    from tunesmith.commands.train import DEMO_CONFIG, train
    from tunesmith.config import load_config
    from tunesmith.files import atomic_write_json, atomic_write_text
    from tunesmith.merge.adapters import merge_adapters
    from tunesmith.merge.evaluate import Scored, score_targets, table

    out = Path(args.out)
    configs, adapters = [], {}
    for task in TASKS:
        data = out / "data" / task
        write_demo_data(data, seed=0, task=task)
        cfg = load_config(DEMO_CONFIG, [
            f"data.train={data / 'train.jsonl'}", f"data.validation={data / 'validation.jsonl'}",
            f"data.test={data / 'test.jsonl'}", f"output.dir={out / task}", f"train.max_steps={args.steps}",
            "eval.before_after=false", f"eval.max_samples={args.test_rows}", "eval.bootstrap=0",
            f"model.device={args.device}", f"train.save_every={args.steps}", f"train.eval_every={args.steps}",
        ])
        adapter = out / task / "adapter"
        if not (adapter / "adapter_config.json").is_file():
            train(cfg)
        adapters[task] = adapter
        configs.append((task, cfg))
    targets = [Scored(f"adapter 1 ({t})" if i == 0 else f"adapter 2 ({t})", str(adapters[t]), "adapter")
               for i, t in enumerate(TASKS)]
    for name, method, kwargs in METHODS:
        folder = out / "merged" / re.sub(r"\W+", "_", name).strip("_")
        merge_adapters([adapters[t] for t in TASKS], [1.0, 1.0], method, folder, seed=0, **kwargs)
        targets.append(Scored(name, str(folder), "adapter"))
    rows = score_targets(targets, configs)
    text = table(rows)
    print(text)
    atomic_write_text(out / "merge_demo.md", text + "\n")
    atomic_write_json(out / "merge_demo.json", {"steps": args.steps, "test_rows": args.test_rows, "rows": rows})
    print(json.dumps({r["name"]: r["scores"] for r in rows}, indent=2))


if __name__ == "__main__":
    main()
