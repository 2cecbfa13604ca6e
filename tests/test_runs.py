"""`tunesmith runs`: two real tiny runs (LoRA and full fine-tuning) side by side, a killed one, a broken one, the
chart of their loss curves, and the folders with nothing to show."""

from __future__ import annotations

import json
import shutil

import pytest

from conftest import tiny_run_files
from tunesmith.cli import main
from tunesmith.config import load_config


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """runs/lora and runs/full: 3 steps each of the tiny model, validation at steps 2 and 3, test scores after."""
    from tunesmith.commands.train import train

    base = tmp_path_factory.mktemp("runs")
    model_dir, paths = tiny_run_files(base, n_train=12, n_validation=4, n_test=2)
    for method in ("lora", "full"):
        train(load_config(None, [
            f"model.name_or_path={model_dir}", f"method.name={method}", "method.r=4", "method.dropout=0",
            f"data.train={paths['train']}", f"data.validation={paths['validation']}", f"data.test={paths['test']}",
            "data.max_seq_len=256", "train.max_steps=3", "train.batch_size=4", "train.eval_every=2", "train.lr=1e-3",
            "train.report_to=[]", "eval.before_after=false", "eval.max_new_tokens=4", "eval.bootstrap=0",
            f"output.dir={base / 'runs' / method}"]))
    return base / "runs"


def records(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def runs_json(capsys, *args) -> list[dict]:
    assert main(["runs", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_lists_both_runs_with_their_steps_losses_and_scores(root, capsys):
    rows = {row["run"]: row for row in runs_json(capsys, str(root))}
    assert sorted(rows) == ["full", "lora"]
    for name, row in rows.items():
        summary = json.loads((root / name / "summary.json").read_text())
        metrics = records(root / name)
        val = [r["val_loss"] for r in metrics if "val_loss" in r]
        assert row["status"] == "finished" and row["method"] == summary["method"] and row["method"].startswith(name)
        assert row["objective"] == "sft" and row["steps"] == 3
        assert row["loss"] == [r["loss"] for r in metrics if "loss" in r][-1]
        assert len(val) == 2 and row["val_loss"] == val[-1] == summary["val_loss"] and row["best_val_loss"] == min(val)
        assert row["after"] == summary["after"] and row["train_seconds"] == summary["train_seconds"]
    assert rows["lora"]["loss"] != rows["full"]["loss"]  # each row is its own run's

    assert main(["runs", str(root)]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["run", "status", "method", "objective", "steps", "loss", "val_loss", "best_val_loss",
                                "after", "train_time"]
    lora = next(line for line in table if line.startswith("lora "))
    assert f"{rows['lora']['val_loss']:.4f}" in lora and "exact_match" in lora and " s" in lora


def test_a_killed_run_shows_what_its_metrics_say_and_a_broken_summary_is_named(root, tmp_path, capsys):
    shutil.copytree(root / "lora", tmp_path / "killed")
    (tmp_path / "killed" / "summary.json").unlink()
    kept = records(root / "lora")[:2]  # steps 1 and 2: killed during step 3's validation
    (tmp_path / "killed" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept) + '{"step": 3, "lo')
    shutil.copytree(root / "full", tmp_path / "broken")
    (tmp_path / "broken" / "summary.json").write_text("{oops")

    rows = {row["run"]: row for row in runs_json(capsys, str(tmp_path))}
    killed, broken = rows["killed"], rows["broken"]
    assert killed["status"] == "incomplete" and killed["steps"] == 2 and killed["method"] == "lora"
    assert killed["loss"] == kept[1]["loss"] and killed["val_loss"] is None and killed["train_seconds"] is None
    assert broken["status"].startswith("summary.json unreadable") and broken["steps"] == 3
    assert broken["method"] == "full" and broken["val_loss"] == records(root / "full")[-1]["val_loss"]

    assert main(["runs", str(tmp_path)]) == 0
    out = capsys.readouterr()
    assert "summary.json unreadable" in out.out and "Traceback" not in out.err


def test_plot_writes_one_png_of_every_run(root, tmp_path, capsys):
    out = tmp_path / "curves.png"
    assert main(["runs", str(root), "--plot", "--out", str(out)]) == 0
    assert f"plot: {out}" in capsys.readouterr().out
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 5000


def test_default_folder_is_the_output_root(root, tmp_path, monkeypatch, capsys):
    shutil.copytree(root / "lora", tmp_path / "runs" / "latest")
    monkeypatch.chdir(tmp_path)
    assert [row["run"] for row in runs_json(capsys)] == ["latest"]
    assert main(["runs", "--plot"]) == 0
    assert (tmp_path / "runs" / "runs.png").is_file()


def test_a_folder_without_runs_says_so_and_exits_0(tmp_path, capsys):
    assert main(["runs", str(tmp_path)]) == 0
    out = capsys.readouterr()
    assert out.out == "" and "No runs under" in out.err
    assert runs_json(capsys, str(tmp_path)) == []
    assert main(["runs", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
