"""IR metrics (tunesmith/embed/metrics.py) equal sentence-transformers' InformationRetrievalEvaluator on the same
embeddings, ties included; hand-checked values; bootstrap intervals and paired differences."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tunesmith.embed.metrics import (judged, metric_names, paired_difference, per_query_metrics, retrieval_metrics,
                                     summarize, top_k)


def random_case(seed: int, n_queries=40, n_corpus=150, dim=16, levels=None):
    """Unit query and corpus embeddings, string ids whose text order differs from their number order, 0-4 relevant
    ids per query (some not in the corpus). `levels`: round the embeddings so many scores tie exactly."""
    g = torch.Generator().manual_seed(seed)
    q = torch.nn.functional.normalize(torch.randn(n_queries, dim, generator=g), dim=-1)
    c = torch.nn.functional.normalize(torch.randn(n_corpus, dim, generator=g), dim=-1)
    if levels:
        q, c = (torch.round(x * levels) / levels for x in (q, c))
    corpus_ids = [f"d{i}" for i in torch.randperm(n_corpus, generator=g).tolist()]
    rng = np.random.default_rng(seed)
    qrels = {}
    for i in range(n_queries):
        ids = {f"d{j}" for j in rng.integers(0, n_corpus + 5, size=rng.integers(0, 5))}  # d150.. are not in the corpus
        # make some relevant documents rank high, so the metrics are not all near zero
        if ids and rng.random() < 0.6:
            best = int((q[i] @ c.T).argmax())
            ids.add(corpus_ids[best])
        qrels[f"q{i}"] = ids
    return q, c, corpus_ids, [f"q{i}" for i in range(n_queries)], qrels


def reference(q, c, corpus_ids, query_ids, qrels):
    """sentence-transformers' evaluator on the given embeddings, scored by the same matrix product."""
    st_eval = pytest.importorskip("sentence_transformers.evaluation")

    class GivenEmbeddings(st_eval.InformationRetrievalEvaluator):
        def embed_inputs(self, model, sentences, **kwargs):
            return q[[query_ids.index(qid) for qid in self.queries_ids]]

    evaluator = GivenEmbeddings(
        queries={qid: qid for qid in query_ids}, corpus={cid: cid for cid in corpus_ids}, relevant_docs=qrels,
        score_functions={"dot": lambda a, b: a @ b.T}, write_csv=False, corpus_chunk_size=64)
    scores = evaluator.compute_all_metrics(model=None, corpus_embeddings=c)["dot"]
    return {f"{family.split('@')[0]}@{k}": float(v) for family, by_k in scores.items() for k, v in by_k.items()}


@pytest.mark.parametrize("seed,levels", [(0, None), (1, None), (2, 2), (3, 1)])
def test_equal_to_sentence_transformers(seed, levels):
    q, c, corpus_ids, query_ids, qrels = random_case(seed, levels=levels)
    keep = judged(query_ids, qrels)
    assert 0 < len(keep) < len(query_ids)  # some queries have no judgement and are left out by both
    values = retrieval_metrics(q[keep], c, corpus_ids, [qrels[query_ids[i]] for i in keep])
    ours = {name: float(v.mean()) for name, v in values.items()}
    theirs = reference(q, c, corpus_ids, query_ids, qrels)
    assert set(ours) == set(theirs) == set(metric_names())
    for name in ours:
        assert abs(ours[name] - theirs[name]) <= 1e-6, (name, ours[name], theirs[name])
    assert ours["accuracy@10"] > 0.3  # the case is not degenerate


def test_hand_computed_values():
    ranked = [["a", "x", "b", "y"], ["x", "y", "z", "w"]]
    relevant = [{"a", "b", "c"}, {"w"}]
    v = per_query_metrics(ranked, relevant, accuracy_at=(1, 3), precision_recall_at=(3,), mrr_at=(10,),
                          ndcg_at=(3,), map_at=(4,))
    assert v["accuracy@1"].tolist() == [1.0, 0.0]
    assert v["accuracy@3"].tolist() == [1.0, 0.0]
    assert v["precision@3"].tolist() == pytest.approx([2 / 3, 0.0])
    assert v["recall@3"].tolist() == pytest.approx([2 / 3, 0.0])
    assert v["mrr@10"].tolist() == pytest.approx([1.0, 1 / 4])
    ideal = 1 + 1 / math.log2(3) + 1 / 2
    assert v["ndcg@3"][0] == pytest.approx((1 + 1 / 2) / ideal)
    assert v["map@4"].tolist() == pytest.approx([(1 + 2 / 3) / 3, (1 / 4) / 1])


def test_top_k_breaks_ties_by_column_and_keeps_best_first():
    q = torch.tensor([[1.0, 0.0]])
    c = torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.5, 0.5], [1.0, 0.0], [1.0, 0.0]])
    assert top_k(q, c, 2).tolist() == [[1, 3]]  # three tied at the top: the two lowest columns
    assert top_k(q, c, 4).tolist() == [[1, 3, 4, 2]]
    assert top_k(q, c, 10).shape == (1, 5)
    blocks = top_k(q.repeat(5, 1), c, 3, block=2)
    assert blocks.tolist() == [[1, 3, 4]] * 5


def test_bootstrap_interval_and_paired_difference():
    rng = np.random.default_rng(0)
    before = {"mrr@10": rng.random(200)}
    after = {"mrr@10": np.clip(before["mrr@10"] + 0.1 + 0.05 * rng.standard_normal(200), 0, 1)}
    s = summarize(before, resamples=300, seed=1)["mrr@10"]
    assert s["ci"][0] < s["value"] < s["ci"][1]
    d = paired_difference(before, after, resamples=300, seed=1)["mrr@10"]
    assert d["value"] == pytest.approx(after["mrr@10"].mean() - before["mrr@10"].mean())
    assert 0 < d["ci"][0] < d["value"] < d["ci"][1]
    # paired: far narrower than the spread of either model alone
    assert d["ci"][1] - d["ci"][0] < 0.5 * (s["ci"][1] - s["ci"][0])
    same = paired_difference(before, before, resamples=50)["mrr@10"]
    assert same["value"] == 0 and same["ci"] == [0.0, 0.0]


def test_a_query_without_judgements_is_refused():
    with pytest.raises(ValueError, match="relevant"):
        retrieval_metrics(torch.eye(2), torch.eye(2), ["a", "b"], [{"a"}, set()])
