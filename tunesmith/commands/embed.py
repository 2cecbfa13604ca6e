"""`tunesmith embed eval`: retrieval metrics of an embedding model (docs/embeddings.md).

DATA is a BEIR folder (corpus.jsonl, queries.jsonl, qrels/<split>.tsv) or a pairs file (query, positive, ...:
every distinct passage is a corpus entry). The model is the built-in all-MiniLM-L6-v2 or any sentence-transformers
or transformers encoder folder; with --baseline, both are scored on the same queries and the paired difference
(model - baseline) gets its own bootstrap interval.
"""

from __future__ import annotations

import argparse
import json

from pydantic import Field

from tunesmith.commands.options import add_section_options, resolve_options
from tunesmith.config import Section

DEFAULT_ENCODER = "all-minilm-l6-v2"  # = embed.encoder.DEFAULT_ENCODER, here without importing torch


class EmbedEvalConfig(Section):
    """`tunesmith embed eval` (file section `embed_eval:`)."""

    model: str = Field(DEFAULT_ENCODER, description="Encoder: the built-in name or a sentence-transformers or "
                       "transformers folder.")
    baseline: str | None = Field(None, description="A second encoder scored on the same queries; the table adds "
                                 "the paired difference model - baseline.")
    split: str = Field("test", description="Which qrels/<split>.tsv of a BEIR folder.")
    batch_size: int = Field(64, ge=1, description="Texts per forward pass when encoding.")
    resamples: int = Field(1000, ge=0, description="Bootstrap resamples of the queries for the 95% intervals "
                           "(0: none).")
    seed: int = Field(0, description="Seed of the bootstrap resamples.")
    device: str = Field("auto", description="cpu, cuda or auto.")
    out: str | None = Field(None, description="Also write the values and intervals here as JSON.")


def register(subparsers) -> None:
    p = subparsers.add_parser("embed", help="embedding models for retrieval",
                              description="Embedding models for retrieval (docs/embeddings.md).")
    sub = p.add_subparsers(dest="embed_command", required=True, metavar="EMBED_COMMAND")
    e = sub.add_parser("eval", help="retrieval metrics of an encoder on a BEIR folder or a pairs file",
                       description="Hit rate (accuracy), precision and recall @1/3/5/10, MRR@10, NDCG@10 and MAP@100 "
                       "of an encoder, each with a bootstrap 95% interval over the queries; with --baseline, the "
                       "paired difference too. Equal to sentence-transformers' InformationRetrievalEvaluator.")
    e.add_argument("data", help="BEIR folder (corpus.jsonl, queries.jsonl, qrels/SPLIT.tsv) or pairs file "
                   "(.jsonl, .json, .csv, .parquet with query, positive, ...)")
    add_section_options(e, "embed_eval", EmbedEvalConfig)
    e.set_defaults(run=_run_eval)


def _run_eval(args: argparse.Namespace) -> None:
    o: EmbedEvalConfig = resolve_options(args)
    columns = evaluate(args.data, o)
    from tunesmith.embed.evaluate import format_table

    print(format_table(columns))
    if o.out:
        from pathlib import Path

        from tunesmith.files import atomic_write_text

        atomic_write_text(Path(o.out), json.dumps(columns, indent=2) + "\n")


def evaluate(data: str, o: EmbedEvalConfig) -> dict[str, dict]:
    """{label: {metric: {"value", "ci"}}}: the model, and with a baseline the baseline and the difference."""
    from tunesmith.embed.encoder import load_encoder
    from tunesmith.embed.evaluate import load_retrieval_set, score_encoder
    from tunesmith.embed.metrics import paired_difference, summarize

    queries, corpus, qrels = load_retrieval_set(data, o.split)
    scored = {}
    for label, name in (("baseline", o.baseline), ("model", o.model)):
        if name is not None:
            scored[label] = score_encoder(load_encoder(name, o.device), queries, corpus, qrels, o.batch_size)
    columns = {f"{label} ({name})": summarize(scored[label], o.resamples, o.seed)
               for label, name in (("baseline", o.baseline), ("model", o.model)) if label in scored}
    if "baseline" in scored:
        columns["difference (model - baseline)"] = paired_difference(scored["baseline"], scored["model"],
                                                                     o.resamples, o.seed)
    return columns
