"""What a person looks at after a run: loss.png and report.md."""

from __future__ import annotations

import json
import re
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
    # log scale, unless a loss is 0 or below (online RL's surrogate losses): a log axis would drop those points
    ax.set_yscale("log" if all(v > 0 for _, v in train + val) else "linear")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    atomic_write(out_png, lambda tmp: fig.savefig(tmp, format="png"))  # the temporary name has no .png to go by
    plt.close(fig)
    return out_png


REWARD_SMOOTHING = 5  # steps in the moving mean drawn over the per-step reward


def plot_reward(metrics_path: Path, out_png: Path) -> Path | None:
    """Online RL (reward.png): the mean reward of each step's samples (GRPO's `reward`, PPO's `score`), its moving
    mean over REWARD_SMOOTHING steps, and the validation reward (greedy completions, `val_reward`) where measured.
    None when the run logged no reward (an offline objective)."""
    rows = read_metrics(metrics_path)
    key = "reward" if any("reward" in r for r in rows) else "score"
    train = [(r["step"], r[key]) for r in rows if "loss" in r and r.get(key) is not None]
    val = [(r["step"], r["val_reward"]) for r in rows if r.get("val_reward") is not None]
    if not train and not val:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    if train:
        steps, values = zip(*train)
        ax.plot(steps, values, linewidth=0.8, alpha=0.45, label=f"train: mean {key} of the step's samples")
        window = [sum(values[max(0, i - REWARD_SMOOTHING + 1) : i + 1]) / (i + 1 - max(0, i - REWARD_SMOOTHING + 1))
                  for i in range(len(values))]
        ax.plot(steps, window, linewidth=1.6, label=f"train: moving mean over {REWARD_SMOOTHING} steps")
    if val:
        ax.plot(*zip(*val), "o-", label="validation: mean reward, greedy")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("reward")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    atomic_write(out_png, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)
    return out_png


def format_value(value, percent: bool = True) -> str:
    """A score as the reports show it: a share of 0-100 with one decimal, any other number with three."""
    if not isinstance(value, (int, float)):
        return "n/a"
    return f"{value:.1f}" if percent else f"{value:.3f}"


def with_interval(value, interval, percent: bool = True, sign: bool = False) -> str:
    """`12.5 [10.0, 15.0]`: a score and its 95% interval (or the score alone)."""
    if not isinstance(value, (int, float)):
        return "n/a"
    text = format_value(value, percent)
    text = f"+{text}" if sign and value >= 0 else text
    if interval:
        text += f" [{format_value(interval[0], percent)}, {format_value(interval[1], percent)}]"
    return text


def is_percent(key: str) -> bool:
    """Whether a score name in summary.json is a share of 0-100 (every metric but the likelihood ones and a user
    function's, which have no interval record of their kind)."""
    from tunesmith.evaluate.metrics import METRICS, canonical_name, get_metric

    name = canonical_name(key)
    return get_metric(name).percent if name in METRICS else key == "pair_accuracy"


def label(key: str) -> str:
    """A score's name in a table, marked where lower is better (perplexity)."""
    from tunesmith.evaluate.metrics import METRICS, canonical_name, get_metric

    name = canonical_name(key)
    return f"{key} (lower is better)" if name in METRICS and not get_metric(name).higher_is_better else key


def format_scores(scores: dict | None) -> str:
    if not scores:
        return "n/a"
    return ", ".join(f"{k} {format_value(v, is_percent(k))}" for k, v in scores.items()
                     if isinstance(v, (int, float)))


def before_after_table(summary: dict) -> list[str]:
    """The markdown table of the test scores before and after, with their intervals and the paired change."""
    before, after = summary.get("before") or {}, summary.get("after") or {}
    evaluation = summary.get("evaluation") or {}
    intervals, difference = evaluation.get("intervals") or {}, evaluation.get("difference") or {}
    lines = ["| metric | before | after | change |", "|---|---|---|---|"]
    for key in sorted(set(before) | set(after)):
        b, a, pct = before.get(key), after.get(key), is_percent(key)
        change = difference.get(key)
        if change is not None:
            change = with_interval(change["value"], change["interval"], pct, sign=True)
        elif isinstance(a, (int, float)) and isinstance(b, (int, float)):
            change = with_interval(a - b, None, pct, sign=True)
        lines.append(f"| {label(key)} | {with_interval(b, intervals.get('before', {}).get(key), pct)} | "
                     f"{with_interval(a, intervals.get('after', {}).get(key), pct)} | {change or ''} |")
    lines.append("")
    if intervals:
        boot = evaluation["bootstrap"]
        lines += [f"{evaluation['rows']} test rows. In brackets: {100 * boot['level']:.0f}% percentile bootstrap "
                  f"intervals ({boot['resamples']} resamples of the rows, seed {boot['seed']}); the change is the "
                  "paired difference after - before, both scored on the same resampled rows.", ""]
    generation = evaluation.get("generation")
    if generation:
        lines += ["Answers: " + ", ".join(f"{k} {v}" for k, v in generation.items()) + ".", ""]
    return lines


def inline(text: str, limit: int = 300) -> str:
    """`text` as inline code on one line: newlines shown as ⏎, cut at `limit` characters, fenced with more
    backticks than it holds in a row."""
    text = text.replace("\r\n", "\n").replace("\n", " ⏎ ")
    text = text if len(text) <= limit else text[: limit - 1] + "…"
    if not text:
        return "(empty)"
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * (longest + 1)
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def examples_section(examples: list[dict]) -> list[str]:
    """The best and worst rows after training, each answer next to its reference."""
    if not examples:
        return []
    if "rank" not in examples[0]:  # a summary.json from before rows were ranked
        lines = ["## Sample predictions (after)", ""]
        for ex in examples:
            lines += [f"- expected {inline(ex['reference'])}", f"  got {inline(ex['prediction'])}"]
        return lines + [""]
    metric = examples[0]["metric"]
    if examples[0]["rank"] == "sample":
        lines = [f"## Test rows (after): every row scores {format_value(examples[0]['value'], is_percent(metric))} "
                 f"by {metric}", ""]
    else:
        lines = [f"## Best and worst test rows (after), by {metric}", ""]
    for rank in ("best", "worst", "sample"):
        rows = [ex for ex in examples if ex["rank"] == rank]
        if not rows:
            continue
        lines += [f"{rank.capitalize()}:", ""] if rank != "sample" else []
        for ex in rows:
            lines += [f"- {metric} {format_value(ex['value'], is_percent(metric))}"
                      + (f": {inline(ex['prompt'], 160)}" if ex.get("prompt") else ""),
                      f"  - expected: {inline(ex['reference'])}", f"  - got: {inline(ex['prediction'])}"]
        lines.append("")
    return lines


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
        lines += ["## Test set, before and after", "", *before_after_table(summary)]
    if summary.get("val_loss") is not None:
        lines += [f"Final validation loss: {summary['val_loss']:.4f}", ""]
    lines += examples_section(summary.get("examples") or [])
    lines += ["![loss](loss.png)", ""]
    lines += ["![reward](reward.png)", ""] if (run_dir / "reward.png").exists() else []  # online RL
    lines += ["Artifacts: `config.yaml`, `metrics.jsonl`, `checkpoints/`, `adapter/`."]
    path = run_dir / "report.md"
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path


def comparison_table(report: dict, is_pct=is_percent) -> str:
    """`tunesmith eval` on several artifacts: the scores of each (with intervals), then each one's paired difference
    from the first. `is_pct`: score name -> whether it is a share of 0-100."""
    artifacts = report["artifacts"]
    keys = list(dict.fromkeys(k for a in artifacts for k in a["scores"]))
    header = lambda cells: "| " + " | ".join(cells) + " |"
    lines = [header(["metric", *(a["name"] for a in artifacts)]), header(["---"] * (len(artifacts) + 1))]
    for key in keys:
        cells = [with_interval(a["scores"].get(key), a.get("intervals", {}).get(key), is_pct(key)) for a in artifacts]
        lines.append(header([label(key), *cells]))
    others = [a for a in artifacts[1:] if a.get("difference")]
    if others:
        lines += ["", header([f"difference from {artifacts[0]['name']}", *(a["name"] for a in others)]),
                  header(["---"] * (len(others) + 1))]
        for key in keys:
            cells = []
            for a in others:
                d = a["difference"].get(key)
                cells.append(with_interval(d["value"], d["interval"], is_pct(key), sign=True) if d else "n/a")
            lines.append(header([label(key), *cells]))
    boot = report.get("bootstrap") or {}
    if boot.get("resamples"):
        lines += ["", f"{report['rows']} test rows; in brackets {100 * boot['level']:.0f}% bootstrap intervals "
                  f"({boot['resamples']} resamples, seed {boot['seed']}), differences paired on the same rows."]
    return "\n".join(lines)
