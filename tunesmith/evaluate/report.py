"""What a person looks at after a run: loss.png and report.md."""

from __future__ import annotations

import json
from pathlib import Path

from tunesmith.files import atomic_write, atomic_write_text


def read_metrics(path: Path) -> list[dict]:
    """The records of metrics.jsonl; a last line cut short by a kill mid-write is left out, not a crash."""
    if not path.exists():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return [r for r in records if isinstance(r, dict)]


def plot_loss(metrics_path: Path, out_png: Path) -> Path | None:
    """Training loss per step, with validation loss where it was measured."""
    rows = read_metrics(metrics_path)
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in rows if r.get("val_loss") is not None]
    if not train:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    ax.plot(*zip(*train), label="train loss", linewidth=1.2)
    if val:
        ax.plot(*zip(*val), "o-", label="validation loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats / target token)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    atomic_write(out_png, lambda tmp: fig.savefig(tmp, format="png"))  # the temporary name has no .png to go by
    plt.close(fig)
    return out_png


def format_scores(scores: dict | None) -> str:
    if not scores:
        return "n/a"
    return ", ".join(f"{k} {v:.1f}" for k, v in scores.items() if isinstance(v, (int, float)))


def write_report(run_dir: Path, summary: dict) -> Path:
    """report.md: the before/after table, the data and training numbers, links to the artifacts."""
    before, after = summary.get("before") or {}, summary.get("after") or {}
    lines = [f"# tunesmith run: {run_dir.name}", ""]
    lines += [f"- model: `{summary['model']}`", f"- method: {summary['method']}",
              f"- objective: {summary.get('objective', 'sft')}",
              f"- trainable parameters: {summary['trainable']:,} of {summary['total']:,} "
              f"({100 * summary['trainable'] / summary['total']:.2f}%)",
              f"- steps: {summary['steps']}, {summary.get('unit', 'labelled tokens')} trained on: {summary['tokens_seen']:,}, "
              f"time: {summary['train_seconds']:.0f} s",
              f"- data: {summary['data']}", ""]
    if before or after:
        lines += ["## Test set, before and after", "", "| metric | before | after | change |", "|---|---|---|---|"]
        for key in sorted(set(before) | set(after)):
            b, a = before.get(key), after.get(key)
            change = f"{a - b:+.1f}" if isinstance(a, (int, float)) and isinstance(b, (int, float)) else ""
            fmt = lambda v: f"{v:.1f}" if isinstance(v, (int, float)) else "n/a"
            lines.append(f"| {key} | {fmt(b)} | {fmt(a)} | {change} |")
        lines.append("")
    if summary.get("val_loss") is not None:
        lines += [f"Final validation loss: {summary['val_loss']:.4f}", ""]
    if summary.get("examples"):
        lines += ["## Sample predictions (after)", ""]
        for ex in summary["examples"]:
            lines += [f"- expected `{ex['reference']}`", f"  got `{ex['prediction']}`"]
        lines.append("")
    lines += ["![loss](loss.png)", "", "Artifacts: `config.yaml`, `metrics.jsonl`, `checkpoints/`, `adapter/`."]
    path = run_dir / "report.md"
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path
