"""`tunesmith runs [DIR]`: the run directories under DIR side by side, and their loss curves in one chart.

A run directory is what `tunesmith train` writes to output.dir: config.yaml, metrics.jsonl, and once it
has finished summary.json and report.md. A run without summary.json (still running, or killed) is
listed with what its metrics.jsonl says; a summary.json that cannot be read is named in the table,
not a traceback. Nothing here imports torch: the table is instant, matplotlib loads only for --plot.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import yaml

from tunesmith.config import OutputConfig
from tunesmith.errors import UserError

# Where runs go by default: the folder of output.dir's default (runs/latest -> runs).
DEFAULT_ROOT = Path(OutputConfig.model_fields["dir"].default).parent
COLUMNS = ("run", "status", "method", "objective", "steps", "loss", "val_loss", "best_val_loss", "after",
           "train_time")


def register(subparsers) -> None:
    p = subparsers.add_parser("runs", help="list the runs under a folder, or plot their loss curves together",
                              description="A table of the run directories under DIR: method, objective, steps, last "
                              "train loss, last and best validation loss, test scores after training, train time. "
                              "Runs without summary.json (running or killed) show what their metrics.jsonl says.")
    p.add_argument("dir", nargs="?", metavar="DIR", help=f"folder holding run directories (default: {DEFAULT_ROOT}, "
                   "where output.dir's default puts them)")
    p.add_argument("--json", action="store_true", help="print the runs as JSON instead of a table")
    p.add_argument("--plot", action="store_true", help="also draw every run's loss curves in one chart (train loss "
                   "solid, validation loss dashed)")
    p.add_argument("--out", metavar="FILE.png", help="where --plot writes the chart (default: DIR/runs.png)")
    p.set_defaults(run=_run_runs)


def _run_runs(args: argparse.Namespace) -> None:
    root = Path(args.dir) if args.dir else DEFAULT_ROOT
    if args.dir and not root.exists():
        raise UserError(f"{args.dir!r} does not exist; name a folder that holds run directories (default "
                        f"{DEFAULT_ROOT}).")
    rows = [describe_run(d, root) for d in find_runs(root)]
    if args.json:
        print(json.dumps(rows, indent=1))
    elif rows:
        print(format_table(rows))
    if not rows:
        import sys

        print(f"No runs under {root}/: a run directory holds metrics.jsonl or summary.json "
              "(tunesmith train writes them to output.dir).", file=sys.stderr)
        return
    if args.plot:
        out = Path(args.out) if args.out else root / "runs.png"
        written = plot_runs(find_runs(root), root, out)
        print(f"plot: {written}" if written else "plot: no run has a train loss yet; nothing drawn")


def find_runs(root: Path) -> list[Path]:
    """Every folder at or under root holding metrics.jsonl or summary.json (checkpoints hold neither), sorted."""
    if not root.is_dir():
        return []
    found = {p.parent for name in ("metrics.jsonl", "summary.json") for p in root.rglob(name) if p.is_file()}
    return sorted(found)


def read_records(run_dir: Path) -> list[dict]:
    from tunesmith.evaluate.report import read_metrics

    try:
        return read_metrics(run_dir / "metrics.jsonl")
    except (OSError, UnicodeDecodeError):
        return []


def read_summary(run_dir: Path) -> tuple[dict | None, str | None]:
    """(summary.json's content, None), (None, None) without one, or (None, why) when it cannot be read."""
    path = run_dir / "summary.json"
    if not path.exists():
        return None, None
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError, RecursionError) as e:
        return None, f"summary.json unreadable ({type(e).__name__})"
    if not isinstance(summary, dict):
        return None, "summary.json unreadable (not an object)"
    return summary, None


def read_config(run_dir: Path) -> dict:
    """config.yaml as a dict; {} when missing or unreadable (the table then shows what else it knows)."""
    try:
        config = yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8"))
    except (OSError, ValueError, yaml.YAMLError):
        return {}
    return config if isinstance(config, dict) else {}


def _number(value) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def describe_run(run_dir: Path, root: Path) -> dict:
    """One row: from summary.json where the run finished, else from metrics.jsonl and config.yaml."""
    records = read_records(run_dir)
    summary, problem = read_summary(run_dir)
    config = read_config(run_dir)
    losses = [(r["step"], r["loss"]) for r in records if _number(r.get("loss")) is not None and "step" in r]
    val = [(r["step"], r["val_loss"]) for r in records if _number(r.get("val_loss")) is not None and "step" in r]
    finite_val = [v for _, v in val if math.isfinite(v)]
    section = lambda name: config.get(name) if isinstance(config.get(name), dict) else {}
    summary = summary or {}
    return {
        "run": run_dir.relative_to(root).as_posix() if run_dir != root else ".",
        "status": problem or ("finished" if summary else "incomplete"),
        "method": summary.get("method") or section("method").get("name"),
        "objective": summary.get("objective") or section("objective").get("name"),
        "steps": summary.get("steps", max((s for s, _ in losses), default=None)),
        "loss": losses[-1][1] if losses else None,
        "val_loss": val[-1][1] if val else None,
        "best_val_loss": min(finite_val) if finite_val else None,
        "after": summary.get("after") if isinstance(summary.get("after"), dict) else None,
        "train_seconds": _number(summary.get("train_seconds")),
    }


def format_duration(seconds: float | None) -> str:
    if seconds is None:
        return ""
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes} min {secs:02d} s" if minutes < 60 else f"{minutes // 60} h {minutes % 60:02d} min"


def cell(row: dict, column: str) -> str:
    from tunesmith.evaluate.report import format_scores

    if column == "train_time":
        return format_duration(row["train_seconds"])
    if column == "after":
        return format_scores(row["after"]) if row["after"] else ""
    value = row[column]
    if isinstance(value, float):
        return f"{value:.4f}"
    return "" if value is None else str(value)


def format_table(rows: list[dict]) -> str:
    """Columns padded to their widest cell, like `ls -l`: readable in a terminal, greppable."""
    cells = [list(COLUMNS)] + [[cell(r, c) for c in COLUMNS] for r in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(COLUMNS))]
    return "\n".join("  ".join(text.ljust(w) for text, w in zip(line, widths)).rstrip() for line in cells)


def plot_runs(run_dirs: list[Path], root: Path, out: Path) -> Path | None:
    """Every run's train loss (solid) and validation loss (dashed, same colour) per step, log scale as loss.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from tunesmith.files import atomic_write

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    drawn = 0
    for run_dir in run_dirs:
        records = read_records(run_dir)
        train = [(r["step"], r["loss"]) for r in records if _number(r.get("loss")) is not None and "step" in r]
        val = [(r["step"], r["val_loss"]) for r in records if _number(r.get("val_loss")) is not None and "step" in r]
        if not train:
            continue
        name = run_dir.relative_to(root).as_posix() if run_dir != root else run_dir.name
        (line,) = ax.plot(*zip(*train), label=f"{name} train", linewidth=1.2)
        if val:
            ax.plot(*zip(*val), "o--", color=line.get_color(), label=f"{name} validation")
        drawn += 1
    if not drawn:
        plt.close(fig)
        return None
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats / target token)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)
    return out
