"""The loggers of `train.report_to`, fed what metrics.jsonl gets: TensorBoard, MLflow, Weights & Biases.

metrics.jsonl stays the record; these are views of it for people who already look at runs there.
Every numeric key of every metrics.jsonl record (loss, the objective's metrics, lr, grad_norm,
tokens_per_s, step_time, epoch; val_loss and val_<metric>) goes out under its own name at the record's
step, the resolved config as text once, and the test scores at the last step as `eval/before/<metric>`
and `eval/after/<metric>` (summary.json's `before` and `after`).

    metrics.jsonl record {"step": s, k: v, ...} -> tracker.log(s, {k: v for numeric v})

Resume: a killed run resumed from checkpoint step c keeps metrics.jsonl's lines of steps <= c
(train/metrics_log.py, MetricsLog). TensorBoard's writer is opened with purge_step = c + 1, which makes the
reader drop every event of step > c written before, so no step is shown twice. MLflow and W&B continue
the same run (its id is kept in <run_dir>/trackers.json). W&B ignores steps below its last; MLflow would keep
both values of a step logged twice, so the MLflow tracker skips the steps it already holds (the resumed run
recomputes them bit for bit, so nothing is lost).

Rank 0 alone writes (distributed.is_main()). No tracker reaches the network unless the user says so:
MLflow writes a local store in the run dir (<run_dir>/mlflow.db, artifacts in <run_dir>/mlruns) unless
MLFLOW_TRACKING_URI is set; W&B runs offline (files in <run_dir>/wandb) unless WANDB_MODE is set.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
import time
from pathlib import Path

import yaml

from tunesmith.errors import UserError
from tunesmith.files import atomic_write_text
from tunesmith.train import distributed

TRACKERS = ("tensorboard", "mlflow", "wandb")
PIP = {"tensorboard": "pip install tensorboard", "mlflow": "pip install 'tunesmith[mlflow]'  (or: pip install mlflow)",
       "wandb": "pip install 'tunesmith[wandb]'  (or: pip install wandb)"}
IDS_FILE = "trackers.json"  # the MLflow and W&B run ids, so a resumed run continues the same run


def numeric(record: dict) -> dict[str, float]:
    """The numbers of a metrics record, without its step (booleans are not numbers here)."""
    return {k: float(v) for k, v in record.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}


class TensorBoardTracker:
    """Event files in <run_dir>/tensorboard, written by torch.utils.tensorboard (needs the tensorboard package).
    Flushed after every write: a run killed with SIGKILL has in its events what it has in metrics.jsonl."""

    def __init__(self, run_dir: Path, cfg, resume_step: int | None, ids: dict):
        from torch.utils.tensorboard import SummaryWriter

        log_dir = run_dir / "tensorboard"
        if resume_step is None:  # a fresh run in an old folder: metrics.jsonl starts empty, so do these
            shutil.rmtree(log_dir, ignore_errors=True)
        self.writer = SummaryWriter(str(log_dir), purge_step=None if resume_step is None else resume_step + 1)

    def log(self, step: int, values: dict[str, float]) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def log_text(self, tag: str, text: str) -> None:
        # TensorBoard renders text as markdown: indented four spaces, it is shown verbatim as code.
        self.writer.add_text(tag, "".join("    " + line + "\n" for line in text.splitlines()), 0)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class MlflowTracker:
    """An MLflow run (experiment MLFLOW_EXPERIMENT_NAME, else "tunesmith", run name = the run folder's name) through
    MlflowClient, so no global active run is left behind. Tracking URI: MLFLOW_TRACKING_URI, else a local store in
    the run dir: the database <run_dir>/mlflow.db (SQLite; MLflow 3.7+ made it the default local backend and 3.14
    refuses the old ./mlruns file store) and the artifacts in <run_dir>/mlruns. See it with
    `mlflow ui --backend-store-uri sqlite:///<run_dir>/mlflow.db`."""

    def __init__(self, run_dir: Path, cfg, resume_step: int | None, ids: dict):
        from mlflow.tracking import MlflowClient

        local = "MLFLOW_TRACKING_URI" not in os.environ
        uri = f"sqlite:///{(run_dir / 'mlflow.db').resolve()}" if local else os.environ["MLFLOW_TRACKING_URI"]
        self.client = MlflowClient(tracking_uri=uri)
        self.logged: dict[str, int] = {}  # metric -> its last step in the store (a resumed run replays steps)
        if resume_step is not None and ids.get("mlflow"):
            self.run_id = ids["mlflow"]
            self.logged = self._last_logged_steps()
        else:
            name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or "tunesmith"
            experiment = self.client.get_experiment_by_name(name)
            artifacts = (run_dir / "mlruns").resolve().as_uri() if local else None  # else the server's choice
            experiment_id = (experiment.experiment_id if experiment else
                             self.client.create_experiment(name, artifact_location=artifacts))
            self.run_id = self.client.create_run(experiment_id, run_name=run_dir.name).info.run_id
            self._log_params(flatten(cfg.to_dict()))
        ids["mlflow"] = self.run_id

    def _log_params(self, params: dict[str, str]) -> None:
        from mlflow.entities import Param

        items = [Param(k, v[:6000]) for k, v in params.items()]  # MLflow's limits: 6000 characters, 100 a batch
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i : i + 100])

    def _last_logged_steps(self) -> dict[str, int]:
        keys = self.client.get_run(self.run_id).data.metrics
        return {key: max(m.step for m in self.client.get_metric_history(self.run_id, key)) for key in keys}

    def log(self, step: int, values: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        fresh = [Metric(k, v, now, step) for k, v in values.items() if step > self.logged.get(k, 0)]
        if fresh:
            self.client.log_batch(self.run_id, metrics=fresh)

    def log_text(self, tag: str, text: str) -> None:
        self.client.log_text(self.run_id, text, f"{tag}.yaml")

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


class WandbTracker:
    """A Weights & Biases run (project WANDB_PROJECT, else "tunesmith"; name = the run folder's name; the config as
    its config), offline unless WANDB_MODE says otherwise (`wandb sync <run_dir>/wandb/offline-run-*` uploads it)."""

    def __init__(self, run_dir: Path, cfg, resume_step: int | None, ids: dict):
        import wandb

        resume_id = ids.get("wandb") if resume_step is not None else None
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT") or "tunesmith", name=run_dir.name,
                              dir=str(run_dir), mode=os.environ.get("WANDB_MODE") or "offline",
                              config=cfg.to_dict(), id=resume_id, resume="allow" if resume_id else None)
        ids["wandb"] = self.run.id

    def log(self, step: int, values: dict[str, float]) -> None:
        self.run.log(values, step=step)

    def log_text(self, tag: str, text: str) -> None:
        self.run.summary[tag] = text

    def close(self) -> None:
        self.run.finish()


OPENERS = {"tensorboard": TensorBoardTracker, "mlflow": MlflowTracker, "wandb": WandbTracker}


def flatten(tree: dict, prefix: str = "") -> dict[str, str]:
    """{"train": {"lr": 0.001}} -> {"train.lr": "0.001"}: the config as MLflow parameters."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = json.dumps(value) if isinstance(value, (list, type(None))) else str(value)
    return flat


def check_installed(names: list[str]) -> None:
    """A UserError naming the pip command for each listed tracker whose package is missing: before the model loads."""
    missing = [n for n in names if importlib.util.find_spec(n) is None]
    if missing:
        raise UserError("train.report_to lists " + ", ".join(missing) + ", which " +
                        ("is" if len(missing) == 1 else "are") + " not installed. Install it ("
                        + "; ".join(PIP[n] for n in missing) + "), or leave it out of train.report_to "
                        "(e.g. train.report_to=[tensorboard], or [] for metrics.jsonl alone).")


class Trackers:
    """The fan-out: one object MetricsLog (train/metrics_log.py) writes to, whatever train.report_to lists.

    Built before the model loads (a missing package fails at once), opened by the loop once it knows the
    resume step (`start`), closed by whoever built it. On processes other than rank 0 it does nothing."""

    def __init__(self, cfg, run_dir: str | Path):
        self.cfg, self.run_dir = cfg, Path(run_dir)
        self.names = list(cfg.train.report_to)
        check_installed(self.names)
        self.active: list = []

    def start(self, resume_step: int | None) -> None:
        """Open every tracker; a fresh run (resume_step None) also gets the resolved config as text."""
        if not distributed.is_main() or not self.names:
            return
        ids_path = self.run_dir / IDS_FILE
        ids = json.loads(ids_path.read_text(encoding="utf-8")) if resume_step is not None and ids_path.exists() else {}
        self.active = [OPENERS[name](self.run_dir, self.cfg, resume_step, ids) for name in self.names]
        if ids:
            atomic_write_text(ids_path, json.dumps(ids, indent=1) + "\n")
        if resume_step is None:
            self.log_text("config", yaml.safe_dump(self.cfg.to_dict(), sort_keys=False))

    def log(self, step: int, record: dict) -> None:
        values = numeric(record)
        for tracker in self.active:
            tracker.log(step, values)

    def log_text(self, tag: str, text: str) -> None:
        for tracker in self.active:
            tracker.log_text(tag, text)

    def log_evaluation(self, summary: dict) -> None:
        """summary.json's test scores before and after training, at the run's last step."""
        values = {f"eval/{when}/{k}": float(v) for when in ("before", "after")
                  for k, v in (summary.get(when) or {}).items()
                  if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}
        if values:
            for tracker in self.active:
                tracker.log(summary["steps"], values)

    def close(self) -> None:
        for tracker in self.active:
            tracker.close()
        self.active = []
