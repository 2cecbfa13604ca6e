"""train.report_to (tunesmith/train/trackers.py): TensorBoard's event files, read back with TensorBoard's own reader
after a real short run on a tiny model, hold what metrics.jsonl holds, the config and the test scores; a resumed
run shows no step twice. MLflow and W&B are checked only where they are installed."""

from __future__ import annotations

import json
import shutil
import textwrap
from pathlib import Path

import pytest
import yaml

from conftest import tiny_run_files
from tunesmith.config import load_config
from tunesmith.errors import UserError
from tunesmith.train import trackers as trackers_module
from tunesmith.train.trackers import Trackers


def overrides(model_dir, paths, out) -> list[str]:
    return [f"model.name_or_path={model_dir}", "method.r=4", "method.alpha=8", "method.dropout=0",
            f"data.train={paths['train']}", f"data.validation={paths['validation']}", f"data.test={paths['test']}",
            "data.max_seq_len=256", "train.max_steps=4", "train.batch_size=4", "train.eval_every=2",
            "train.save_every=2", "train.lr=1e-2", "eval.max_new_tokens=4", "eval.bootstrap=0", f"output.dir={out}"]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A finished 4-step LoRA run (checkpoints at steps 2 and 4, validation at 2 and 4), trained in this process."""
    from tunesmith.commands.train import train

    root = tmp_path_factory.mktemp("trackers")
    model_dir, paths = tiny_run_files(root, n_train=16, n_validation=4, n_test=3)
    cfg = load_config(None, overrides(model_dir, paths, root / "run"))
    assert cfg.train.report_to == ["tensorboard"]  # the default: every run can be looked at
    summary = train(cfg)
    return root, model_dir, paths, summary


def accumulator(log_dir: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    return acc


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def expected_scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """tag -> [(step, value)] of every numeric key of metrics.jsonl."""
    tags: dict[str, list] = {}
    for record in metrics(run_dir):
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)):
                tags.setdefault(key, []).append((record["step"], float(value)))
    return tags


def assert_events_match_metrics(run_dir: Path, acc) -> None:
    expected = expected_scalars(run_dir)
    assert {"loss", "lr", "grad_norm", "tokens_per_s", "step_time", "epoch", "val_loss"} <= expected.keys()
    for tag, points in expected.items():
        got = [(e.step, e.value) for e in acc.Scalars(tag)]
        assert [s for s, _ in got] == [s for s, _ in points], tag  # the same steps, each once
        assert [v for _, v in got] == pytest.approx([v for _, v in points], rel=1e-6), tag  # float32 in the events


def test_tensorboard_holds_every_metric_the_config_and_the_scores(workspace):
    root, _, _, summary = workspace
    run_dir = root / "run"
    acc = accumulator(run_dir / "tensorboard")
    assert_events_match_metrics(run_dir, acc)
    assert [e.step for e in acc.Scalars("val_loss")] == [2, 4]

    text = acc.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert yaml.safe_load(textwrap.dedent(text)) == yaml.safe_load((run_dir / "config.yaml").read_text())

    for when in ("before", "after"):
        assert summary[when]  # the test split was scored before and after
        for key, value in summary[when].items():
            (event,) = acc.Scalars(f"eval/{when}/{key}")
            assert event.step == summary["steps"] == 4 and event.value == pytest.approx(value)


def raw_steps(log_dir: Path, tag: str) -> list[int]:
    """Every step written for `tag`, across all event files, purged ones included."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    return sorted(e.step for path in sorted(log_dir.glob("events.out.tfevents.*"))
                  for e in EventFileLoader(str(path)).Load() for v in e.summary.value if v.tag == tag)


def test_a_resumed_run_shows_no_step_twice(workspace):
    """A run killed after step 4 whose newest checkpoint is step 2: steps 3 and 4 are trained and logged again;
    TensorBoard's writer purges the first ones (purge_step), as MetricsLog drops their metrics.jsonl lines."""
    from tunesmith.commands.train import train

    root, model_dir, paths, _ = workspace
    run_dir = root / "resumed"
    shutil.copytree(root / "run", run_dir)
    shutil.rmtree(run_dir / "checkpoints" / "step-4")
    (run_dir / "summary.json").unlink()
    summary = train(load_config(None, [*overrides(model_dir, paths, run_dir), "train.resume=true"]))

    assert raw_steps(run_dir / "tensorboard", "loss") == [1, 2, 3, 3, 4, 4]  # written twice: the purge is needed
    acc = accumulator(run_dir / "tensorboard")
    assert [e.step for e in acc.Scalars("loss")] == [1, 2, 3, 4]
    assert_events_match_metrics(run_dir, acc)
    assert [e.step for e in acc.Scalars("eval/after/exact_match")] == [summary["steps"]]
    assert len(acc.Tensors("config/text_summary")) == 1  # logged by the fresh run alone


def tiny_config(tmp_path, *extra):
    return load_config(None, [f"output.dir={tmp_path / 'run'}", *extra])


def test_report_to_is_checked_and_can_be_empty(tmp_path):
    assert tiny_config(tmp_path, "train.report_to=[]").train.report_to == []
    assert tiny_config(tmp_path, "train.report_to=mlflow").train.report_to == ["mlflow"]
    with pytest.raises(UserError, match="train.report_to"):
        tiny_config(tmp_path, "train.report_to=[tensorboard,tensorboard]")
    with pytest.raises(UserError, match="train.report_to"):
        tiny_config(tmp_path, "train.report_to=[comet]")
    trackers = Trackers(tiny_config(tmp_path, "train.report_to=[]"), tmp_path / "run")
    trackers.start(None)
    trackers.log(1, {"step": 1, "loss": 1.0})
    trackers.close()
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("name", ["mlflow", "wandb"])
def test_a_listed_logger_that_is_not_installed_names_the_pip_command(tmp_path, monkeypatch, name):
    real = trackers_module.importlib.util.find_spec
    monkeypatch.setattr(trackers_module.importlib.util, "find_spec", lambda n: None if n == name else real(n))
    with pytest.raises(UserError, match=f"train.report_to lists {name}.*pip install 'tunesmith\\[{name}\\]'"):
        Trackers(tiny_config(tmp_path, f"train.report_to=[tensorboard,{name}]"), tmp_path / "run")


def test_only_rank_0_writes(tmp_path, monkeypatch):
    monkeypatch.setattr(trackers_module.distributed, "is_main", lambda: False)
    trackers = Trackers(tiny_config(tmp_path), tmp_path / "run")
    trackers.start(None)
    trackers.log(1, {"step": 1, "loss": 1.0})
    trackers.log_evaluation({"steps": 1, "after": {"exact_match": 50.0}})
    trackers.close()
    assert not (tmp_path / "run").exists()


def test_numbers_are_logged_and_nothing_else():
    assert trackers_module.numeric({"step": 3, "loss": 2, "ok": True, "name": "x", "lr": 1e-3}) == {
        "loss": 2.0, "lr": 1e-3}


def fed(trackers: Trackers, resume_step=None) -> None:
    """What a 2-step run gives its trackers."""
    trackers.start(resume_step)
    trackers.log(1, {"step": 1, "loss": 2.5, "lr": 1e-3})
    trackers.log(2, {"step": 2, "loss": 2.0, "lr": 5e-4})
    trackers.log(2, {"step": 2, "val_loss": 2.25})
    trackers.log_evaluation({"steps": 2, "before": {"exact_match": 10.0}, "after": {"exact_match": 40.0}})
    trackers.close()


def test_mlflow_writes_a_local_store_in_the_run_dir(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    run_dir = tmp_path / "run"
    fed(Trackers(tiny_config(tmp_path, "train.report_to=[mlflow]"), run_dir))
    run_id = json.loads((run_dir / "trackers.json").read_text())["mlflow"]
    client = MlflowClient(tracking_uri=f"sqlite:///{(run_dir / 'mlflow.db').resolve()}")
    history = lambda key: [(m.step, m.value) for m in client.get_metric_history(run_id, key)]
    assert history("loss") == [(1, 2.5), (2, 2.0)] and history("val_loss") == [(2, 2.25)]
    assert history("eval/after/exact_match") == [(2, 40.0)]
    assert client.get_run(run_id).data.params["train.report_to"] == '["mlflow"]'
    assert list((run_dir / "mlruns").rglob("config.yaml"))  # the config, as an artifact in the run dir


def test_wandb_runs_offline_in_the_run_dir(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    run_dir = tmp_path / "run"
    fed(Trackers(tiny_config(tmp_path, "train.report_to=[wandb]"), run_dir))
    assert json.loads((run_dir / "trackers.json").read_text())["wandb"]
    assert list((run_dir / "wandb").glob("offline-run-*"))


def test_mlflow_and_wandb_follow_a_real_resumed_run(workspace, tmp_path, monkeypatch):
    """The same kill and resume as above with MLflow and W&B listed: MLflow's run holds each step once, with the
    values of metrics.jsonl (the replayed steps are not logged again), and W&B continues its offline run."""
    pytest.importorskip("mlflow")
    pytest.importorskip("wandb")
    from mlflow.tracking import MlflowClient

    from tunesmith.commands.train import train

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    root, model_dir, paths, _ = workspace
    run_dir = tmp_path / "run"
    report_to = "train.report_to=[tensorboard,mlflow,wandb]"
    train(load_config(None, [*overrides(model_dir, paths, run_dir), report_to]))
    ids = json.loads((run_dir / "trackers.json").read_text())
    shutil.rmtree(run_dir / "checkpoints" / "step-4")
    (run_dir / "summary.json").unlink()
    summary = train(load_config(None, [*overrides(model_dir, paths, run_dir), report_to, "train.resume=true"]))

    assert json.loads((run_dir / "trackers.json").read_text()) == ids  # the same runs continued
    client = MlflowClient(tracking_uri=f"sqlite:///{(run_dir / 'mlflow.db').resolve()}")
    for tag, points in expected_scalars(run_dir).items():
        got = sorted((m.step, m.value) for m in client.get_metric_history(ids["mlflow"], tag))
        assert [s for s, _ in got] == [s for s, _ in points], tag  # each step once
        if tag not in ("tokens_per_s", "step_time"):  # timings: the store keeps the first attempt's
            assert [v for _, v in got] == pytest.approx([v for _, v in points], rel=1e-12), tag
    (after,) = client.get_metric_history(ids["mlflow"], "eval/after/exact_match")
    assert after.step == summary["steps"]
    assert len(list((run_dir / "wandb").glob(f"offline-run-*-{ids['wandb']}"))) == 2  # the first run and the resume
