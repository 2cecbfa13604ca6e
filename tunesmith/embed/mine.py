"""Hard negatives by base-model similarity (`tunesmith embed mine`).

For each pair (query q, positive p, document D) and every candidate passage c of the corpus (the pairs' distinct
positives and negatives, plus an optional extra corpus), with cosine similarities s(q, c) of the base encoder:

    excluded        c = p, c is any positive of the same query text, or c belongs to document D
                    (a chunk of the same document may answer q too: a likely false negative)
    rank window     c's rank among q's remaining candidates is in [range_min, range_max)  (0-based: range_min
                    skips the very closest, which are the likeliest unlabelled positives)
    relative margin s(q, c) <= (1 - relative_margin) * s(q, p)    (sentence-transformers' mine_hard_negatives
                    relative_margin: a negative at most 95% as similar as the positive, for 0.05)

and the `num_negatives` best-scoring survivors become the pair's `negatives` (most similar first). The gold
passage can never be returned: it is excluded by text before ranking (tested). A candidate's document is the
doc_id of the pairs whose positive it is (without doc_id: the passage itself is its document).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch

from tunesmith.embed.data import Pair


@dataclass
class MineStats:
    pairs: int = 0
    candidates: int = 0
    negatives: int = 0
    short: int = 0  # pairs that got fewer than num_negatives
    positive_score: float = 0.0  # mean s(q, p)
    negative_score: float = 0.0  # mean s(q, c) of the chosen negatives

    def to_dict(self) -> dict:
        return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in self.__dict__.items()}


def mine_hard_negatives(pairs: list[Pair], encoder, num_negatives: int = 3, range_min: int = 0, range_max: int = 50,
                        relative_margin: float = 0.05, extra_corpus: list[str] = (), batch_size: int = 64
                        ) -> tuple[list[Pair], MineStats]:
    """The pairs with mined `negatives` (replacing any given) and the statistics (module doc)."""
    corpus = list(dict.fromkeys([t for p in pairs for t in (p.positive, *p.negatives)] + list(extra_corpus)))
    column = {t: j for j, t in enumerate(corpus)}
    documents: dict[str, set] = {}  # passage text -> documents it belongs to
    positives_of: dict[str, set] = {}  # query text -> its positives
    for p in pairs:
        documents.setdefault(p.positive, set()).add(p.document)
        positives_of.setdefault(p.query, set()).add(p.positive)
    members: dict[str, list[int]] = {}  # document -> its passages' columns
    for text, docs in documents.items():
        for d in docs:
            members.setdefault(d, []).append(column[text])
    q = encoder.encode([p.query for p in pairs], batch_size)
    c = encoder.encode(corpus, batch_size)
    stats = MineStats(pairs=len(pairs), candidates=len(corpus))
    out, pos_scores, neg_scores = [], [], []
    for start in range(0, len(pairs), 256):
        scores = q[start:start + 256] @ c.T  # (b, C) cosine similarities
        for row, p in zip(scores, pairs[start:start + 256]):
            chosen = choose(row, p, column, members, positives_of, num_negatives, range_min, range_max,
                            relative_margin)
            pos_scores.append(float(row[column[p.positive]]))
            neg_scores += [float(row[j]) for j in chosen]
            stats.short += len(chosen) < num_negatives
            out.append(replace(p, negatives=tuple(corpus[j] for j in chosen)))
    stats.negatives = len(neg_scores)
    stats.positive_score = float(np.mean(pos_scores)) if pos_scores else 0.0
    stats.negative_score = float(np.mean(neg_scores)) if neg_scores else 0.0
    return out, stats


def choose(row: torch.Tensor, pair: Pair, column: dict[str, int], members: dict[str, list[int]],
           positives_of: dict[str, set], num_negatives: int, range_min: int, range_max: int,
           relative_margin: float) -> list[int]:
    """Columns of one query's negatives: exclusions, rank window, margin, best first."""
    scores = row.clone()
    banned = [column[t] for t in positives_of.get(pair.query, ())] + [column[pair.positive]]
    banned += members.get(pair.document, [])
    scores[banned] = float("-inf")
    order = torch.sort(scores, descending=True, stable=True).indices.tolist()
    allowed = len(scores) - len(set(banned))
    window = order[range_min:min(range_max, allowed)]
    limit = (1 - relative_margin) * float(row[column[pair.positive]])
    return [j for j in window if float(scores[j]) <= limit][:num_negatives]
