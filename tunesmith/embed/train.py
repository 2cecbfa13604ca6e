"""`tunesmith embed train`: fine-tune an encoder for retrieval on the shared engine, scored before and after.

    load the encoder and the pairs -> hold out validation and test documents (never questions)
    -> score the test queries with the base encoder (before)
    -> apply the method to the transformer (full, lora, ...) -> train/loop.py with the contrastive objective
       (shuffled batches, same-document masking, checkpoints, exact resume, metrics.jsonl); every
       train.eval_every steps the validation queries are scored and the best NDCG@10 so far is kept in best/
    -> the best weights back in -> score the test queries again (after), the paired difference and its interval
    -> export: <output.dir>/model, a sentence-transformers folder checked against the model in memory, and
       <output.dir>/adapter for adapter methods (PEFT format); a model that scores below its base is reported
       loudly and not exported unless eval.export_if_worse
    -> summary.json, report.md, a final metrics.jsonl record of the test scores
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from tunesmith.embed.config import EmbedConfig
from tunesmith.errors import UserError
from tunesmith.files import atomic_save_safetensors, atomic_write_json, atomic_write_text, read_json, read_safetensors

log = logging.getLogger(__name__)

Retrieval = tuple[dict[str, str], dict[str, str], dict[str, set[str]]]  # (queries, corpus, qrels)
MAIN = "full"  # the per-dimension label of the whole embedding


@dataclass
class EmbedData:
    train: list  # embed.data.Pair
    validation: Retrieval | None
    test: Retrieval | None

    def describe(self) -> dict:
        def size(r):
            return None if r is None else {"queries": len(r[0]), "corpus": len(r[1])}
        return {"train_pairs": len(self.train), "validation": size(self.validation), "test": size(self.test)}


def load_data(cfg: EmbedConfig) -> EmbedData:
    """Training pairs, and the validation and test retrieval sets: the given files, else whole documents held out
    of the training pairs (test first, then validation from what is left)."""
    from tunesmith.embed.data import read_pairs, retrieval_set, split_by_document
    from tunesmith.embed.evaluate import load_retrieval_set

    d = cfg.data
    if not d.train:
        raise UserError("data.train is not set: name a pairs file or a folder of documents "
                        "(e.g. data.train=pairs.jsonl).")
    if Path(d.train).is_dir():
        from tunesmith.embed.pairs import pairs_from_folder

        pairs = pairs_from_folder(d.train, d.chunk_size, d.chunk_overlap, seed=cfg.train.seed)
    else:
        pairs = read_pairs(d.train)
    test = load_retrieval_set(d.test) if d.test else None
    if test is None and d.test_split > 0:
        pairs, held = split_by_document(pairs, d.test_split, cfg.train.seed)
        test = retrieval_set(held) if held else None
    validation = load_retrieval_set(d.validation) if d.validation else None
    if validation is None and d.val_split > 0:
        pairs, held = split_by_document(pairs, d.val_split, cfg.train.seed + 1)
        validation = retrieval_set(held) if held else None
    if not pairs:
        raise UserError(f"No training pairs are left in {d.train} after holding out the validation and test "
                        "documents; lower data.val_split / data.test_split or add documents.")
    return EmbedData(pairs, validation, test)


def score_dimensions(encoder, retrieval: Retrieval, batch_size: int, dims: list[int]) -> dict[str, dict]:
    """{dimension label: {metric: per-query values}}: "full", and each Matryoshka dimension d (the first d
    dimensions of every embedding, renormalised). Encoded once."""
    from tunesmith.embed.metrics import retrieval_metrics

    queries, corpus, qrels = retrieval
    judged = [q for q in queries if qrels.get(q)]
    if not judged or not corpus:
        raise UserError("A held-out set has no judged query or an empty corpus: nothing to score.")
    q = encoder.encode([queries[i] for i in judged], batch_size)
    c = encoder.encode(list(corpus.values()), batch_size)
    relevant = [qrels[i] for i in judged]
    out = {MAIN: retrieval_metrics(q, c, list(corpus), relevant)}
    for d in dims:
        if d < q.shape[1]:
            cut = lambda e: torch.nn.functional.normalize(e[:, :d], dim=-1)  # noqa: E731
            out[str(d)] = retrieval_metrics(cut(q), cut(c), list(corpus), relevant)
    return out


class BestKeeper:
    """The validation scorer the loop calls (objective.score), which also keeps the best weights so far.

    It counts the loop's steps through objective.check_step (called once per step, skipped ones too), so it knows
    the step of each validation; when NDCG@10 beats the best so far, the trainable tensors go to
    best/trainable.safetensors and the step and scores to best/best.json. A resumed run starts from the best
    recorded at or before the checkpoint it resumes from."""

    def __init__(self, run_dir: Path, encoder, validation: Retrieval, batch_size: int, start_step: int,
                 metric: str = "ndcg@10"):
        self.dir, self.encoder, self.validation, self.batch_size = run_dir / "best", encoder, validation, batch_size
        self.step, self.metric, self.best = start_step, metric, None
        found = self.dir / "best.json"
        if start_step and found.is_file():
            record = read_json(found, "the best checkpoint's scores")
            self.best = record if record["step"] <= start_step else None
        elif not start_step:
            import shutil

            shutil.rmtree(self.dir, ignore_errors=True)

    def count_step(self, _metrics: dict) -> None:
        self.step += 1
        return None

    def score(self, model, _examples) -> dict[str, float]:
        from tunesmith.train.checkpoint import checkpoint_tensors

        values = score_dimensions(self.encoder, self.validation, self.batch_size, [])[MAIN]
        scores = {f"val_{k}": float(np.mean(values[k])) for k in ("ndcg@10", "mrr@10", "accuracy@5")}
        if self.best is None or scores[f"val_{self.metric}"] > self.best[f"val_{self.metric}"]:
            self.dir.mkdir(parents=True, exist_ok=True)
            atomic_save_safetensors(checkpoint_tensors(model), self.dir / "trainable.safetensors")
            self.best = {"step": self.step, **scores}
            atomic_write_json(self.dir / "best.json", self.best)
        return scores

    def restore(self, model) -> int | None:
        """Put the best weights into `model`; returns their step (None: there is no best)."""
        from tunesmith.train.checkpoint import copy_trainable

        if self.best is None:
            return None
        path = self.dir / "trainable.safetensors"
        copy_trainable(model, read_safetensors(path, "the best checkpoint's weights"), path)
        return self.best["step"]


def resume_step(cfg: EmbedConfig, run_dir: Path) -> int:
    from tunesmith.train.checkpoint import complete_checkpoints

    found = complete_checkpoints(run_dir) if cfg.train.resume else []
    return int(found[-1].name.split("-")[1]) if found else 0


def evaluation(before: dict | None, after: dict, resamples: int, seed: int) -> dict:
    """{dimension: {"before", "after", "difference"}: {metric: {"value", "ci"}}} from per-query values."""
    from tunesmith.embed.metrics import paired_difference, summarize

    out = {}
    for dim, values in after.items():
        has_before = before is not None and dim in before
        out[dim] = {"before": summarize(before[dim], resamples, seed)} if has_before else {}
        out[dim]["after"] = summarize(values, resamples, seed)
        if has_before:
            out[dim]["difference"] = paired_difference(before[dim], values, resamples, seed)
    return out


def train_embedder(cfg: EmbedConfig) -> dict:
    """The whole run (module doc); returns the summary written to summary.json."""
    from tunesmith.commands.train import prepare_run_dir
    from tunesmith.embed.encoder import resolve_encoder_folder
    from tunesmith.embed.objective import make_objective
    from tunesmith.methods.inject import count_parameters
    from tunesmith.methods.registry import describe_method, get_method
    from tunesmith.models.loading import resolve_device
    from tunesmith.train.loop import train as train_loop
    from tunesmith.train.threads import set_cpu_threads
    from tunesmith.train.trackers import Trackers

    if resolve_device(cfg.model.device).type == "cpu":
        set_cpu_threads(cfg.train.threads)
    data = load_data(cfg)
    trackers = Trackers(cfg, cfg.output.dir)
    run_dir = prepare_run_dir(cfg)
    encoder = _encoder(cfg)
    e = cfg.eval
    dims = cfg.objective.matryoshka_dims
    log.info("data: %s", data.describe())
    before = None
    if data.test is not None and e.before_after:
        before = score_dimensions(encoder, data.test, e.batch_size, dims)
    method = get_method(cfg.method.name)
    torch.manual_seed(cfg.train.seed)
    method.apply(encoder.model, cfg.method)
    trainable, total = count_parameters(encoder.model)
    log.info("%s: %s trainable of %s parameters", describe_method(cfg.method), f"{trainable:,}", f"{total:,}")
    start = resume_step(cfg, run_dir)
    keeper = BestKeeper(run_dir, encoder, data.validation, e.batch_size, start) if data.validation else None
    document_of = {p.positive: p.doc_id for p in data.train if p.doc_id is not None}
    objective = make_objective(encoder, cfg.objective, document_of, keeper.score if keeper else None)
    if keeper is not None:
        from dataclasses import replace

        objective = replace(objective, check_step=keeper.count_step)
    started = time.time()
    try:
        state = train_loop(encoder, data.train, [data.validation] if keeper else [], cfg, run_dir, pad_id=0,
                           param_groups=lambda m: method.param_groups(m, cfg.method), after_step=method.after_step,
                           objective=objective, trackers=trackers)
        train_seconds = time.time() - started
        best_step = keeper.restore(encoder) if keeper is not None and e.select_best else None
        after = score_dimensions(encoder, data.test, e.batch_size, dims) if data.test is not None else None
        scores = evaluation(before, after, e.bootstrap, e.seed) if after is not None else None
        worse = _worse_than_base(scores)
        summary = {
            "model": cfg.model.name_or_path, "method": describe_method(cfg.method), "objective": "contrastive",
            "trainable": trainable, "total": total, "steps": state.step, "skipped_steps": state.skipped_steps,
            "train_seconds": train_seconds, "data": data.describe(), "best_step": best_step,
            "best_validation": keeper.best if keeper else None, "evaluation": scores, "worse_than_base": worse,
        }
        if scores is not None:
            _record_evaluation(run_dir, state.step, scores, trackers)
    finally:
        trackers.close()
    summary.update(export(encoder, method, cfg, run_dir, data, worse, resolve_encoder_folder(cfg.model.name_or_path)))
    atomic_write_json(run_dir / "summary.json", summary)
    atomic_write_text(run_dir / "report.md", report(summary))
    return summary


def _encoder(cfg: EmbedConfig):
    """The encoder to fine-tune, its sequence length cut to data.max_seq_len when that is set."""
    from tunesmith.embed.encoder import load_encoder

    encoder = load_encoder(cfg.model.name_or_path, cfg.model.device)
    if cfg.data.max_seq_len:
        encoder.max_seq_length = cfg.data.max_seq_len
    return encoder


def _record_evaluation(run_dir, step: int, scores: dict, trackers) -> None:
    """The scores as a line of metrics.jsonl and, before and after, to the trackers."""
    from tunesmith.train.metrics_log import MetricsLog

    MetricsLog(run_dir / "metrics.jsonl", step).write({"step": step, **_flat(scores)})
    trackers.log_evaluation({"steps": step, "before": _main(scores, "before"), "after": _main(scores, "after")})


def _worse_than_base(scores: dict | None) -> bool:
    full = (scores or {}).get(MAIN, {})
    return "before" in full and full["after"]["ndcg@10"]["value"] < full["before"]["ndcg@10"]["value"]


def _main(scores: dict, label: str) -> dict[str, float] | None:
    part = scores.get(MAIN, {}).get(label)
    return {k: v["value"] for k, v in part.items()} if part else None


def _flat(scores: dict) -> dict[str, float]:
    """test_<before|after|difference>_<metric>[_d<dim>] -> value, for metrics.jsonl and the loggers."""
    out = {}
    for dim, parts in scores.items():
        for label, metrics in parts.items():
            for name, entry in metrics.items():
                out[f"test_{label}_{name}" + ("" if dim == MAIN else f"_d{dim}")] = entry["value"]
    return out


def export(encoder, method, cfg: EmbedConfig, run_dir: Path, data: EmbedData, worse: bool, base_folder: Path) -> dict:
    """The adapter (adapter methods) and the sentence-transformers folder, unless the model got worse; returns the
    summary's export fields."""
    from tunesmith.embed.export import export_encoder, save_adapter_artifact

    out = {"adapter": None, "exported": None, "export_max_abs_diff": None}
    if worse:
        log.warning("\n%s\n!!! The tuned encoder scores BELOW its base on the test set (NDCG@10). It is %s.\n%s",
                    "!" * 72, "exported anyway (eval.export_if_worse)" if cfg.eval.export_if_worse else
                    "NOT exported as the final model; its weights stay in checkpoints/ and best/ "
                    "(eval.export_if_worse=true exports it)", "!" * 72)
        if not cfg.eval.export_if_worse:
            return out
    if cfg.method.name not in ("full", "freeze"):
        save_adapter_artifact(method, encoder.model, run_dir / "adapter", cfg.method, str(base_folder))
        out["adapter"] = str(run_dir / "adapter")
        if method.merge is None:
            log.warning("method %s cannot be merged into plain weights: only its adapter is saved", cfg.method.name)
            return out
        encoder.model = method.merge(encoder.model)
    texts = list((data.test or data.validation or ({}, {}, {}))[0].values())[:64] or [p.query for p in data.train[:64]]
    out["export_max_abs_diff"] = export_encoder(encoder, base_folder, run_dir / "model", texts)
    out["exported"] = str(run_dir / "model")
    log.info("model: %s (loads with sentence_transformers.SentenceTransformer; max abs difference %.1e)",
             run_dir / "model", out["export_max_abs_diff"])
    return out


def report(summary: dict) -> str:
    """report.md: the run, the test table (before, after, difference with 95% intervals) per dimension."""
    from tunesmith.embed.evaluate import format_table

    lines = [f"# embed train: {summary['model']}, {summary['method']}", "",
             f"- steps {summary['steps']} ({summary['train_seconds']:.0f} s), trainable {summary['trainable']:,} of "
             f"{summary['total']:,} parameters", f"- data: {json.dumps(summary['data'])}",
             f"- best validation step: {summary['best_step']} {json.dumps(summary['best_validation'])}",
             f"- exported: {summary.get('exported')}; adapter: {summary.get('adapter')}"]
    if summary["worse_than_base"]:
        lines.append("- **WARNING: the tuned model scores below its base on the test set (NDCG@10).**")
    for dim, parts in (summary["evaluation"] or {}).items():
        lines += ["", f"## test set, {'whole embedding' if dim == MAIN else f'first {dim} dimensions'}", "", "```",
                  format_table({label: parts[label] for label in ("before", "after", "difference") if label in parts}),
                  "```"]
    return "\n".join(lines) + "\n"
