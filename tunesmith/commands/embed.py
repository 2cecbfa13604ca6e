"""`tunesmith embed eval`: retrieval metrics of an embedding model (docs/embeddings.md).

DATA is a BEIR folder (corpus.jsonl, queries.jsonl, qrels/<split>.tsv) or a pairs file (query, positive, ...:
every distinct passage is a corpus entry). The model is the built-in all-MiniLM-L6-v2 or any sentence-transformers
or transformers encoder folder; with --baseline, both are scored on the same queries and the paired difference
(model - baseline) gets its own bootstrap interval.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Literal

from pydantic import Field

from tunesmith.commands.options import add_section_options, resolve_options
from tunesmith.config import Section

DEFAULT_ENCODER = "all-minilm-l6-v2"  # = embed.encoder.DEFAULT_ENCODER, here without importing torch
DEFAULT_MODEL = "smollm2-135m-instruct"  # = config.DEFAULT_MODEL
DEMO_CONFIG = Path(__file__).parent.parent / "configs" / "embed_demo.yaml"


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


class EmbedPairsConfig(Section):
    """`tunesmith embed pairs` (file section `embed_pairs:`)."""

    out: str = Field(..., description="Folder for train.jsonl, test.jsonl and pairs_stats.json.")
    generator: Literal["template", "llm"] = Field("template", description="template: questions over each chunk's key "
                                                  "terms, no model; llm: a local causal LM writes them (--llm).")
    llm: str = Field(DEFAULT_MODEL, description="llm generator: the built-in model name or a local causal LM folder.")
    questions_per_chunk: int = Field(2, ge=1, description="Questions asked per chunk.")
    chunk_size: int = Field(120, ge=8, description="Words per chunk.")
    chunk_overlap: int = Field(20, ge=0, description="Words shared by neighbouring chunks.")
    round_trip_k: int = Field(5, ge=0, description="Keep a question only if the base encoder ranks its chunk in its "
                              "top k of all chunks; 0: no round trip check.")
    encoder: str = Field(DEFAULT_ENCODER, description="Base encoder of the round trip check.")
    test_fraction: float = Field(0.2, ge=0, lt=1, description="Share of the pairs in test.jsonl, whole documents.")
    max_new_tokens: int = Field(96, ge=8, description="llm generator: tokens per answer.")
    seed: int = Field(0, description="Seed of the templates' choice and of the split.")
    device: str = Field("auto", description="cpu, cuda or auto.")


class EmbedMineConfig(Section):
    """`tunesmith embed mine` (file section `embed_mine:`)."""

    out: str = Field(..., description="Pairs file (.jsonl) to write, with a negatives list per pair.")
    model: str = Field(DEFAULT_ENCODER, description="Encoder whose similarities rank the candidates.")
    num_negatives: int = Field(3, ge=1, description="Negatives per pair.")
    range_min: int = Field(0, ge=0, description="Skip this many of the most similar candidates (likely unlabelled "
                           "positives).")
    range_max: int = Field(50, ge=1, description="Consider candidates up to this rank.")
    relative_margin: float = Field(0.05, ge=0, lt=1, description="A negative's similarity must be at most (1 - margin) "
                                   "times the positive's.")
    corpus: str | None = Field(None, description="More candidate passages: a BEIR folder (its corpus.jsonl) or a "
                               "pairs file (its passages).")
    batch_size: int = Field(64, ge=1, description="Texts per forward pass when encoding.")
    device: str = Field("auto", description="cpu, cuda or auto.")


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
    register_train(sub)
    for name, section, run, data_help, helps in (
            ("embed_pairs", EmbedPairsConfig, _run_pairs, "folder of .txt, .md or .html documents",
             ("training pairs from a folder of documents (chunks, generated questions, filters, split by document)",
              "Chunk the documents, generate questions per chunk (templates, or a local LLM with --generator llm), "
              "drop non-questions, copies, duplicates and (round trip) questions whose chunk the base encoder does "
              "not rank in its top k; write train.jsonl and test.jsonl split by document, and the kept fraction.")),
            ("embed_mine", EmbedMineConfig, _run_mine, "pairs file (.jsonl, .json, .csv, .parquet)",
             ("hard negatives for a pairs file by base-encoder similarity",
              "For each query, the most similar passages that are not its positive and not from its document, "
              "within a rank window and a relative margin below the positive's score; statistics printed.")),
    ):
        c = sub.add_parser(name.split("_")[1], help=helps[0], description=helps[1])
        c.add_argument("data", help=data_help)
        add_section_options(c, name, section)
        c.set_defaults(run=run)
    d = sub.add_parser("demo", help="the embedding demo: a generated handbook corpus, trained and scored",
                       description="Writes the demo corpus (documents in invented jargon, questions in plain words), "
                       "scores the base encoder on its held-out questions, fine-tunes, scores again, draws a "
                       "before/after chart. Overrides as for embed train.")
    d.add_argument("overrides", nargs="*", help="section.key=value overrides of the demo config, e.g. method.name=full")
    d.add_argument("--out", default="runs/embed-demo", help="run directory (default runs/embed-demo)")
    d.set_defaults(run=_run_demo)


def register_train(sub) -> None:
    """embed train CONFIG [overrides]: the config keys in --help come from embed/config.py's schema."""
    from tunesmith.commands.options import describe_options
    from tunesmith.embed.config import EmbedConfig

    t = sub.add_parser("train", help="fine-tune an encoder for retrieval from a YAML config",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="config keys (YAML sections or dotted overrides):\n" + describe_options(EmbedConfig),
                       description="Fine-tune an embedding model with the contrastive objective on the shared engine "
                       "(methods, loop, checkpoints, resume): test set scored before and after, the best checkpoint "
                       "by validation NDCG@10, a sentence-transformers folder in <output.dir>/model.")
    t.add_argument("config", nargs="?", help="YAML config (sections model, method, data, objective, train, eval, "
                   "output); optional when the overrides say everything")
    t.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. data.train=pairs.jsonl "
                   "method.name=lora train.max_steps=100")
    t.set_defaults(run=_run_train)


def _run_train(args: argparse.Namespace) -> None:
    from tunesmith.embed.config import load_embed_config
    from tunesmith.embed.train import train_embedder

    config, overrides = args.config, list(args.overrides)
    if config is not None and "=" in config and not config.endswith((".yaml", ".yml")):
        config, overrides = None, [config, *overrides]  # no file: the first word is an override
    summary = train_embedder(load_embed_config(config, overrides))
    print_summary(summary)


def print_summary(summary: dict) -> None:
    """The test table of each dimension, and where the model went."""
    from tunesmith.embed.evaluate import format_table

    for dim, parts in (summary.get("evaluation") or {}).items():
        print(f"\ntest set ({'whole embedding' if dim == 'full' else f'first {dim} dimensions'}):")
        print(format_table({k: parts[k] for k in ("before", "after", "difference") if k in parts}))
    if summary.get("worse_than_base"):
        print("\nWARNING: the tuned model scores below its base (NDCG@10); see the log above.")
    print(f"\nmodel: {summary.get('exported')}" + (f"\nadapter: {summary['adapter']}" if summary.get("adapter") else ""))


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


def _run_pairs(args: argparse.Namespace) -> None:
    o: EmbedPairsConfig = resolve_options(args)
    stats = make_pairs_from_folder(args.data, o)
    print(json.dumps(stats, indent=2))
    print(f"kept {stats['kept']} of {stats['generated']} questions ({100 * stats['kept_fraction']:.1f}%); "
          f"train.jsonl {stats['train_pairs']} pairs, test.jsonl {stats['test_pairs']} pairs in {o.out}")


def make_pairs_from_folder(folder: str, o: EmbedPairsConfig, llm=None, encoder=None) -> dict:
    """Chunks -> questions -> filters -> split by document -> files; returns the statistics. `llm` (model,
    tokenizer) and `encoder` may be given already loaded (tests); else they are loaded as the options say."""
    from tunesmith.embed.data import split_by_document
    from tunesmith.embed.pairs import (Stats, chunk_documents, llm_questions, make_pairs, read_documents,
                                       template_questions, write_pairs)
    from tunesmith.files import atomic_write_json

    docs = read_documents(folder)
    chunks = chunk_documents(docs, o.chunk_size, o.chunk_overlap)
    if o.generator == "template":
        questions = template_questions(chunks, o.questions_per_chunk, o.seed)
    else:
        if llm is None:
            from tunesmith.config import ModelConfig
            from tunesmith.models.loading import load_model_and_tokenizer

            llm = load_model_and_tokenizer(ModelConfig(name_or_path=o.llm, device=o.device))
        questions = llm_questions(chunks, *llm, o.questions_per_chunk, o.max_new_tokens)
    if encoder is None and o.round_trip_k:
        from tunesmith.embed.encoder import load_encoder

        encoder = load_encoder(o.encoder, o.device)
    stats = Stats(len(docs), len(chunks))
    pairs = make_pairs(chunks, questions, stats, encoder, o.round_trip_k)
    train, test = split_by_document(pairs, o.test_fraction, o.seed)
    out = Path(o.out)
    out.mkdir(parents=True, exist_ok=True)
    write_pairs(out / "train.jsonl", train)
    write_pairs(out / "test.jsonl", test)
    result = {**stats.to_dict(), "generator": o.generator, "train_pairs": len(train), "test_pairs": len(test)}
    atomic_write_json(out / "pairs_stats.json", result)
    return result


def _run_mine(args: argparse.Namespace) -> None:
    from tunesmith.embed.data import read_pairs
    from tunesmith.embed.encoder import load_encoder
    from tunesmith.embed.mine import mine_hard_negatives
    from tunesmith.files import atomic_write_text

    o: EmbedMineConfig = resolve_options(args)
    extra = []
    if o.corpus:
        from tunesmith.embed.evaluate import load_retrieval_set

        extra = list(load_retrieval_set(o.corpus)[1].values())
    pairs, stats = mine_hard_negatives(read_pairs(args.data), load_encoder(o.model, o.device), o.num_negatives,
                                       o.range_min, o.range_max, o.relative_margin, extra, o.batch_size)
    atomic_write_text(Path(o.out), "".join(json.dumps({"query": p.query, "positive": p.positive,
                                                       "negatives": list(p.negatives), "doc_id": p.doc_id}) + "\n"
                                           for p in pairs))
    print(json.dumps(stats.to_dict(), indent=2))
    print(f"{stats.negatives} negatives for {stats.pairs} pairs ({stats.short} with fewer than {o.num_negatives}); "
          f"mean similarity: positives {stats.positive_score:.3f}, negatives {stats.negative_score:.3f}; "
          f"written to {o.out}")


def _run_demo(args: argparse.Namespace) -> None:
    from tunesmith.embed.demo import run_demo

    summary = run_demo(Path(args.out), DEMO_CONFIG, args.overrides)
    print_summary(summary)
    print(f"chart: {Path(args.out) / 'before_after.svg'}")
