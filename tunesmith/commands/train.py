"""`tunesmith train` and `tunesmith demo`: the whole workflow, and the helpers that score a run.

`train` is the whole workflow: validate, load, prepare data, score before, fine-tune, save,
score after, report. Each step is a call into one package; nothing here knows a method's math.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from tunesmith.commands.data import write_demo_data
from tunesmith.commands.options import describe_options
from tunesmith.config import Config, load_config, save_config
from tunesmith.errors import UserError
from tunesmith.files import atomic_write_json, read_json, read_safetensors

log = logging.getLogger(__name__)

DEMO_CONFIG = Path(__file__).parent.parent / "configs" / "demo.yaml"
OVERRIDES_HELP = "section.key=value overrides applied after the YAML, e.g. train.max_steps=40 method.r=8"


def config_keys_epilog() -> str:
    """The `--help` epilog of the commands that read a run config: every key, its default and its doc."""
    return "config keys (YAML sections or dotted overrides):\n" + describe_options()


def register(subparsers) -> None:
    p = subparsers.add_parser("train", help="fine-tune a model from a YAML config", epilog=config_keys_epilog(),
                              formatter_class=argparse.RawDescriptionHelpFormatter,
                              description="Fine-tune, evaluate before/after, save the adapter, metrics, plots and "
                              "report.")
    p.add_argument("config", help="YAML config file (sections model, method, data, objective, train, eval, output)")
    p.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)
    p.set_defaults(run=_run_train)

    p = subparsers.add_parser("demo", help="the whole workflow on the built-in task: score, fine-tune, score again",
                              description="Writes the demo data, scores the base model on the test split, fine-tunes "
                              "with LoRA, scores again and prints both.")
    p.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)
    p.add_argument("--out", default="runs/demo", help="run directory (default runs/demo)")
    p.set_defaults(run=_run_demo)


def _run_train(args: argparse.Namespace) -> None:
    train(load_config(args.config, args.overrides))


def _run_demo(args: argparse.Namespace) -> None:
    demo(Path(args.out), args.overrides)


def prepare_run_dir(cfg: Config) -> Path:
    run_dir = Path(cfg.output.dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"output.dir={str(run_dir)!r} exists and is not a folder.")
    if not cfg.train.resume and (run_dir / "checkpoints").exists() and any((run_dir / "checkpoints").iterdir()):
        log.warning("%s already holds checkpoints; they will be replaced (set train.resume=true to continue)", run_dir)
        import shutil

        shutil.rmtree(run_dir / "checkpoints")
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / "config.yaml")
    return run_dir


def train(cfg: Config) -> dict:
    """Fine-tune as configured; returns the summary written to summary.json and report.md.

        load model and data -> score the test set (before) -> apply the method -> the loop
        -> save the artifact -> score the test set (after) -> summary.json, report.md

    The loggers of train.report_to (train/trackers.py) get the loop's metrics and the scores, and are
    closed however the run ends. Under torchrun (docs/distributed.md) every process runs this; rank 0
    alone writes files."""
    from tunesmith.train.trackers import Trackers

    if not cfg.data.train:
        raise UserError("data.train is not set: name a training file (e.g. data.train=data/train.jsonl).")
    trackers = Trackers(cfg, cfg.output.dir)  # a listed logger that is not installed fails here, before loading
    try:
        return train_and_score(cfg, trackers)
    finally:
        trackers.close()


def train_and_score(cfg: Config, trackers) -> dict:
    """train() with its loggers open."""
    from tunesmith.evaluate.task import evaluation_summary
    from tunesmith.methods.registry import describe_method
    from tunesmith.models.loading import peak_rss_mib
    from tunesmith.train import distributed

    run_dir, model, tokenizer, data, objective = load_run(cfg)
    before = score_before(objective, model, tokenizer, cfg, run_dir) if objective.add_head is None else None
    if objective.prepare is not None:  # on the base model, before the method changes it
        from tunesmith.methods.registry import get_method

        objective.prepare(model, data, cfg, run_dir, tokenizer.pad_token_id, get_method(cfg.method.name))
    method, trainable, total = apply_method(model, cfg, objective)
    if objective.add_head is not None:  # the method computes the base model until trained; the head is fresh
        before = score_before(objective, model, tokenizer, cfg, run_dir)
    objective = objective.configured(cfg.objective, method)  # e.g. DPO's reference: the method switched off
    if objective.bind_run is not None:  # online RL: the tokenizer, the rows and output.dir for its rollouts
        objective = objective.bind_run(cfg, tokenizer, run_dir, data)
    started = time.time()
    model, state = fine_tune(model, method, data, objective, cfg, run_dir, tokenizer.pad_token_id, trackers)
    train_seconds = time.time() - started
    score_test = test_scorer(objective, model, tokenizer, cfg)  # fine_tune may hand back another copy (FSDP2)
    after = score_test("after") if cfg.data.test else None
    if after is not None:
        log.info("after fine-tuning:  %s", _fmt(after))
    if objective.export is not None and distributed.is_main():
        objective.export(model, method, cfg, run_dir, tokenizer)
    summary = {
        "model": cfg.model.name_or_path,
        "method": describe_method(cfg.method),
        "objective": objective.name,
        "unit": objective.unit,
        "trainable": trainable,
        "total": total,
        "steps": state.step,
        "skipped_steps": state.skipped_steps,
        "tokens_seen": state.tokens_seen,
        "train_seconds": train_seconds,
        "data": data.describe(),
        "val_loss": last_validation_loss(run_dir / "metrics.jsonl"),
        "before": before.scores if before is not None else None,
        "after": after.scores if after is not None else None,
        "examples": after.examples(cfg.eval.examples) if after is not None else [],
        "evaluation": evaluation_summary(cfg, before, after) if cfg.data.test else None,
        "peak_rss_mib": round(peak_rss_mib()),  # this process's own (rank 0's), loading and scoring included
    }
    if distributed.is_main():
        from tunesmith.evaluate.report import write_report

        atomic_write_json(run_dir / "summary.json", summary)
        trackers.log_evaluation(summary)
        log.info("report: %s\nadapter: %s", write_report(run_dir, summary), run_dir / "adapter")
    distributed.shutdown()
    return summary


def load_run(cfg: Config):
    """(run_dir, model, tokenizer, encoded data, objective): everything the run starts from."""
    from tunesmith.data.dataset import prepare_datasets
    from tunesmith.models.loading import load_model_and_tokenizer, resolve_device
    from tunesmith.objectives.registry import get_objective
    from tunesmith.train import distributed
    from tunesmith.train.threads import set_cpu_threads

    if resolve_device(cfg.model.device).type == "cpu":
        set_cpu_threads(cfg.train.threads)  # torch would size its pool by the host's cores (train/threads.py)
    distributed.init(cfg.model.device)  # under torchrun: join the other processes (alone: nothing)
    with distributed.main_first():  # rank 0 sets up output.dir and converts a built-in model once; then the others
        run_dir = prepare_run_dir(cfg) if distributed.is_main() else Path(cfg.output.dir)
        model, tokenizer = load_model_and_tokenizer(cfg.model)
    data = prepare_datasets(cfg.data, tokenizer, cfg.train.seed, cfg.objective.name)
    log.info("data: %s", data.describe())
    return run_dir, model, tokenizer, data, get_objective(data.objective)  # auto is resolved by the format now


def score_before(objective, model, tokenizer, cfg: Config, run_dir: Path):
    """The test split's Evaluation before fine-tuning (once per run directory), if there is a test split to score."""
    if not (cfg.data.test and cfg.eval.before_after):
        return None
    before = cached_score(run_dir / "before.json", test_scorer(objective, model, tokenizer, cfg), cfg)
    log.info("before fine-tuning: %s", _fmt(before))
    return before


def test_scorer(objective, model, tokenizer, cfg: Config):
    """label -> the test split's Evaluation: the objective's own scores (a reward model's pair accuracy), or
    answers generated and scored against the references by eval.metrics."""
    from tunesmith.evaluate.metrics.scoring import Evaluation

    if objective.test_score is not None:
        return lambda label: Evaluation(objective.test_score(model, tokenizer, cfg))
    return lambda label: score_test_set(model, tokenizer, cfg, label)


def apply_method(model, cfg: Config, objective=None):
    """(method, trainable, total parameters) after applying method.name, initialised from train.seed, and the
    objective's own head if it has one (a reward model's score)."""
    import torch

    from tunesmith.methods.inject import count_parameters
    from tunesmith.methods.registry import get_method

    method = get_method(cfg.method.name)
    torch.manual_seed(cfg.train.seed)  # adapter initialisation is part of the run's seed
    adapted = method.apply(model, cfg.method)
    if objective is not None and objective.add_head is not None:
        objective.add_head(model, cfg)
    trainable, total = count_parameters(model)
    log.info("%s on %d modules: %s trainable of %s parameters (%.2f%%)", cfg.method.name,
             len(adapted), f"{trainable:,}", f"{total:,}", 100 * trainable / total)
    return method, trainable, total


def fine_tune(model, method, data, objective, cfg: Config, run_dir: Path, pad_id: int, trackers=None):
    """Run the loop (its metrics also to `trackers`); save the artifact and the loss plot. Returns (a whole trained
    model, the final state)."""
    from tunesmith.evaluate.report import plot_loss, plot_reward
    from tunesmith.train import distributed
    from tunesmith.train.loop import train as train_loop

    # The groups are built inside the loop: FSDP2 (full under torchrun) replaces the parameters first.
    state = train_loop(model, data.train, data.validation, cfg, run_dir, pad_id,
                       param_groups=lambda m: method.param_groups(m, cfg.method), after_step=method.after_step,
                       objective=objective, trackers=trackers)
    if distributed.is_sharded(model):
        del model  # FSDP2 left each process a shard of every weight; the artifact and scoring need whole ones
        model = trained_model_from_checkpoint(cfg, method, run_dir, objective)
    if distributed.is_main():
        method.save(model, run_dir / "adapter", cfg.method, cfg.model.name_or_path)
        if (run_dir / "adapter" / "config.json").is_file():  # a whole model (full): reloaded and checked
            from tunesmith.export.check import check_saved_model
            from tunesmith.methods.full import source_tokenizer

            check_saved_model(run_dir / "adapter", model, source_tokenizer(model))
        plot_loss(run_dir / "metrics.jsonl", run_dir / "loss.png")
        if objective.rollout is not None:  # online RL: the reward curve too
            plot_reward(run_dir / "metrics.jsonl", run_dir / "reward.png")
    return model, state


def trained_model_from_checkpoint(cfg: Config, method, run_dir: Path, objective=None):
    """A whole copy of the trained model: the base, the method applied (and the objective's head), and the
    trainable weights of the newest checkpoint (the loop always saves one at the last step, whole)."""
    import torch

    from tunesmith.models.loading import load_model_and_tokenizer
    from tunesmith.train.checkpoint import complete_checkpoints, copy_trainable

    model, _ = load_model_and_tokenizer(cfg.model)
    torch.manual_seed(cfg.train.seed)
    method.apply(model, cfg.method)
    if objective is not None and objective.add_head is not None:
        objective.add_head(model, cfg)
    weights = complete_checkpoints(run_dir)[-1] / "trainable.safetensors"
    copy_trainable(model, read_safetensors(weights, "the checkpoint's trainable weights"), weights)
    model.eval()
    return model


def last_validation_loss(metrics_path: Path) -> float | None:
    from tunesmith.evaluate.report import read_metrics

    losses = [r["val_loss"] for r in read_metrics(metrics_path) if r.get("val_loss") is not None]
    return losses[-1] if losses else None


def cached_score(path: Path, compute, cfg: Config):
    """The base model's score does not change on resume: compute it once per run directory (compute(label) ->
    Evaluation). The file keeps the answers too, so a resumed run scores them again with the current eval.metrics
    and pairs them with the answers after training."""
    from tunesmith.evaluate.task import restore
    from tunesmith.train import distributed

    if path.exists():
        restored = restore(read_json(path, "the base model's test scores (delete it to score again)"), cfg)
        if restored is not None:
            return restored
    evaluation = compute("before")
    if distributed.is_main():
        atomic_write_json(path, evaluation.to_json())
    return evaluation


def score_test_set(model, tokenizer, cfg: Config, label: str):
    """The test split scored by eval.metrics (evaluate/task.py): answers generated for every row and/or the
    reference answers' likelihoods. Returns an Evaluation; its .scores is the flat {metric: number}."""
    from tunesmith.evaluate.task import evaluate_model

    return evaluate_model(model, tokenizer, cfg, label)


def demo(out: Path, overrides: list[str]) -> dict:
    """The first-run experience: demo data, score, fine-tune, score, print both."""
    from tunesmith.train import distributed

    data_dir = out / "data"
    cfg = load_config(DEMO_CONFIG, [
        f"data.train={data_dir / 'train.jsonl'}",
        f"data.validation={data_dir / 'validation.jsonl'}",
        f"data.test={data_dir / 'test.jsonl'}",
        f"output.dir={out}",
        *overrides,
    ])
    distributed.init(cfg.model.device)
    with distributed.main_first():  # under torchrun rank 0 writes the data before any process reads it
        if distributed.is_main():
            write_demo_data(data_dir)
    summary = train(cfg)
    if not distributed.is_main():
        return summary
    before, after = summary["before"] or {}, summary["after"] or {}
    print()
    print("=" * 64)
    print(f"exact match on {out / 'data' / 'test.jsonl'}:")
    print(f"  before fine-tuning: {before.get('exact_match', float('nan')):5.1f}%")
    print(f"  after fine-tuning:  {after.get('exact_match', float('nan')):5.1f}%")
    print(f"report:  {out / 'report.md'}")
    print(f"adapter: {out / 'adapter'}")
    print("=" * 64)
    return summary


def _fmt(evaluation) -> str:
    from tunesmith.evaluate.report import format_value

    if not evaluation.scores:
        return "n/a"
    shown = (format_value(v, True) + "%" if evaluation.percent(k) else format_value(v, False) for k, v in
             evaluation.scores.items())
    return ", ".join(f"{k} {value}" for k, value in zip(evaluation.scores, shown))
