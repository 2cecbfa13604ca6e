"""Score an encoder on a retrieval set: encode queries and corpus once, one matrix product, the metrics of
metrics.py with bootstrap intervals, and (given a second model) the paired difference. Used by `tunesmith embed
eval`; training's before/after report will call the same functions."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tunesmith.errors import UserError


def load_retrieval_set(path: str | Path, split: str = "test"):
    """(queries, corpus, qrels) from a BEIR folder (beir.py) or a pairs file (data.py: each pair a query, every
    distinct passage a corpus entry)."""
    path = Path(path)
    if path.is_dir():
        from tunesmith.embed.beir import read_beir

        return read_beir(path, split)
    from tunesmith.embed.data import read_pairs, retrieval_set

    return retrieval_set(read_pairs(path))


def score_encoder(encoder, queries: dict[str, str], corpus: dict[str, str], qrels: dict[str, set[str]],
                  batch_size: int = 64) -> dict[str, np.ndarray]:
    """{metric: per-query values} of `encoder` over the judged queries (those with a relevant document)."""
    from tunesmith.embed.metrics import retrieval_metrics

    judged = [qid for qid in queries if qrels.get(qid)]
    if not judged:
        raise UserError("No query has a relevant document in the judgements: nothing to score.")
    if not corpus:
        raise UserError("The corpus is empty: nothing to retrieve.")
    query_emb = encoder.encode([queries[q] for q in judged], batch_size)
    corpus_emb = encoder.encode(list(corpus.values()), batch_size)
    return retrieval_metrics(query_emb, corpus_emb, list(corpus), [qrels[q] for q in judged])


def format_table(columns: dict[str, dict[str, dict]]) -> str:
    """A text table: one row per metric, one column per {label: {metric: {"value", "ci"}}}, each "v [low, high]";
    a column whose label starts with "difference" is signed."""
    labels = list(columns)
    names = list(next(iter(columns.values())))

    def cell(entry: dict) -> str:
        ci = entry.get("ci")
        return f"{entry['value']:.4f}" + (f" [{ci[0]:.4f}, {ci[1]:.4f}]" if ci else "")

    def signed(entry: dict) -> str:
        ci = entry.get("ci")
        return f"{entry['value']:+.4f}" + (f" [{ci[0]:+.4f}, {ci[1]:+.4f}]" if ci else "")

    rows = [["metric", *labels]]
    for name in names:
        rows.append([name] + [signed(columns[label][name]) if label.startswith("difference") else
                              cell(columns[label][name]) for label in labels])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)
