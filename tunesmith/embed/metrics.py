"""Retrieval metrics from query and corpus embeddings and relevance judgements, with bootstrap intervals.

The scores are one matrix product S = Q C^T (unit rows: cosine similarities), taken in blocks of queries so
memory stays bounded. Each query's ranking is its top max_k corpus entries by torch.topk, ties broken by
ascending corpus id, as sentence-transformers' InformationRetrievalEvaluator breaks them, so the values
equal its own (tests/test_embed_metrics.py). For one query with relevant set R (|R| >= 1) and ranked
list d_1, d_2, ..., with rel_i = 1 if d_i is in R else 0:

    accuracy@k (hit rate)  1 if any rel_i = 1 for i <= k, else 0
    precision@k            sum_{i<=k} rel_i / k
    recall@k               sum_{i<=k} rel_i / |R|
    MRR@k                  1 / i* for the first i* <= k with rel_i* = 1, else 0
    NDCG@k                 DCG@k / IDCG@k, DCG@k = sum_{i<=k} rel_i / log2(i + 1),
                           IDCG@k = sum_{i<=min(k,|R|)} 1 / log2(i + 1)   (binary relevance)
    AP@k                   sum_{i<=k} rel_i * precision@i / min(k, |R|);  MAP@k = mean of AP@k

Every reported value is the mean of its per-query values over the queries that have at least one relevant
document (queries without any are left out, as the evaluator leaves them out). Relevant ids missing from
the corpus still count in |R|.

Because each metric is a mean over queries, the bootstrap (evaluate/metrics/bootstrap.py) resamples queries:
the 95% interval is the 2.5 and 97.5 percentiles of the mean over n queries drawn with replacement, and a
paired before/after difference uses the same drawn queries for both models in every resample.
"""

from __future__ import annotations

import math

import numpy as np
import torch

ACCURACY_AT = (1, 3, 5, 10)
PRECISION_RECALL_AT = (1, 3, 5, 10)
MRR_AT = (10,)
NDCG_AT = (10,)
MAP_AT = (100,)


def metric_names(accuracy_at=ACCURACY_AT, precision_recall_at=PRECISION_RECALL_AT, mrr_at=MRR_AT, ndcg_at=NDCG_AT,
                 map_at=MAP_AT) -> list[str]:
    """The reported names in table order: accuracy@k, precision@k, recall@k, mrr@k, ndcg@k, map@k."""
    return ([f"accuracy@{k}" for k in accuracy_at] + [f"precision@{k}" for k in precision_recall_at]
            + [f"recall@{k}" for k in precision_recall_at] + [f"mrr@{k}" for k in mrr_at]
            + [f"ndcg@{k}" for k in ndcg_at] + [f"map@{k}" for k in map_at])


def top_k(query_emb: torch.Tensor, corpus_emb: torch.Tensor, k: int, block: int = 1024) -> torch.Tensor:
    """(Q, min(k, C)) corpus column indices of each query's best scores, best first; equal scores in ascending
    column order (give the corpus sorted by id for ties by id). S = Q C^T is computed `block` queries at a time."""
    k = min(k, corpus_emb.shape[0])
    out = []
    for start in range(0, query_emb.shape[0], block):
        scores = query_emb[start:start + block] @ corpus_emb.T  # (b, C)
        values, idx = torch.topk(scores, k, dim=1)
        # topk orders ties arbitrarily: sort the chosen columns by index, then stably by score (descending)
        idx, _ = idx.sort(dim=1)
        values = scores.gather(1, idx)
        order = torch.sort(values, dim=1, descending=True, stable=True).indices
        idx = idx.gather(1, order)
        # a tie at the k-th score may leave out a lower column than one kept: redo those rows with a full sort
        kth = scores.gather(1, idx[:, -1:])
        tied = ((scores >= kth).sum(dim=1) > k).nonzero().flatten()
        if tied.numel():
            idx[tied] = torch.sort(scores[tied], dim=1, descending=True, stable=True).indices[:, :k]
        out.append(idx)
    return torch.cat(out) if out else torch.empty(0, k, dtype=torch.long)


def per_query_metrics(ranked: list[list[str]], relevant: list[set[str]], accuracy_at=ACCURACY_AT,
                      precision_recall_at=PRECISION_RECALL_AT, mrr_at=MRR_AT, ndcg_at=NDCG_AT,
                      map_at=MAP_AT) -> dict[str, np.ndarray]:
    """{metric: (Q,) float64 values}, from each query's ranked corpus ids and its relevant ids (formulas in the
    module doc). Every query must have at least one relevant id."""
    names = metric_names(accuracy_at, precision_recall_at, mrr_at, ndcg_at, map_at)
    values = {name: np.zeros(len(ranked)) for name in names}
    for q, (hits, rel) in enumerate(zip(ranked, relevant)):
        flags = [1 if doc in rel else 0 for doc in hits]
        for k in accuracy_at:
            values[f"accuracy@{k}"][q] = float(any(flags[:k]))
        for k in precision_recall_at:
            values[f"precision@{k}"][q] = sum(flags[:k]) / k
            values[f"recall@{k}"][q] = sum(flags[:k]) / len(rel)
        for k in mrr_at:
            first = next((i for i, f in enumerate(flags[:k]) if f), None)
            values[f"mrr@{k}"][q] = 0.0 if first is None else 1.0 / (first + 1)
        for k in ndcg_at:
            dcg = sum(f / math.log2(i + 2) for i, f in enumerate(flags[:k]))
            ideal = sum(1 / math.log2(i + 2) for i in range(min(k, len(rel))))
            values[f"ndcg@{k}"][q] = dcg / ideal
        for k in map_at:
            found, total = 0, 0.0
            for i, f in enumerate(flags[:k]):
                if f:
                    found += 1
                    total += found / (i + 1)
            values[f"map@{k}"][q] = total / min(k, len(rel))
    return values


def retrieval_metrics(query_emb: torch.Tensor, corpus_emb: torch.Tensor, corpus_ids: list[str],
                      relevant: list[set[str]], **ks) -> dict[str, np.ndarray]:
    """{metric: (Q,) per-query values} for queries (rows of query_emb) against the corpus, relevant[q] the ids
    relevant to query q. Queries with no relevant id must be left out by the caller (see `judged`)."""
    if any(not rel for rel in relevant):
        raise ValueError("every query needs at least one relevant document; leave the others out (judged())")
    max_k = max(max(v) for v in (ks.get("accuracy_at", ACCURACY_AT), ks.get("precision_recall_at",
                PRECISION_RECALL_AT), ks.get("mrr_at", MRR_AT), ks.get("ndcg_at", NDCG_AT), ks.get("map_at", MAP_AT)))
    order = sorted(range(len(corpus_ids)), key=corpus_ids.__getitem__)  # columns by id: ties go to the lower id
    sorted_ids = [corpus_ids[i] for i in order]
    idx = top_k(query_emb.float(), corpus_emb.float()[order], max_k)
    ranked = [[sorted_ids[j] for j in row] for row in idx.tolist()]
    return per_query_metrics(ranked, relevant, **ks)


def judged(query_ids: list[str], qrels: dict[str, set[str]]) -> list[int]:
    """Positions of the queries that have at least one relevant document: the ones scored."""
    return [i for i, qid in enumerate(query_ids) if qrels.get(qid)]


def summarize(values: dict[str, np.ndarray], resamples: int = 1000, seed: int = 0,
              level: float = 0.95) -> dict[str, dict]:
    """{metric: {"value": mean, "ci": [low, high]}}: the mean over queries and its bootstrap interval."""
    from tunesmith.evaluate.metrics.bootstrap import percentile_interval, resample_indices

    names = list(values)
    table = np.stack([values[name] for name in names]) if names else np.zeros((0, 0))  # (metrics, queries)
    n = table.shape[1]
    draws = np.array([table[:, idx].mean(axis=1) for idx in resample_indices(n, resamples, seed)])  # (R, metrics)
    return {name: {"value": float(table[i].mean()) if n else float("nan"),
                   "ci": percentile_interval(draws[:, i], level) if len(draws) else None}
            for i, name in enumerate(names)}


def paired_difference(before: dict[str, np.ndarray], after: dict[str, np.ndarray], resamples: int = 1000,
                      seed: int = 0, level: float = 0.95) -> dict[str, dict]:
    """{metric: {"value": mean(after) - mean(before), "ci": [low, high]}}, the same queries drawn for both models
    in each resample (so the difference's interval is narrower than either model's own)."""
    diff = {name: after[name] - before[name] for name in before if name in after}
    return summarize(diff, resamples, seed, level)
