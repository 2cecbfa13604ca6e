"""The `contrastive` objective for embedding models: multiple-negatives ranking with in-batch and hard negatives,
same-document passages masked out, and a cached (GradCache) form for large batches in bounded memory.

A batch holds B queries q_i and P >= B passages p_j: the B positives first (p_i answers q_i), then the given hard
negatives. With s_ij = scale * cos(q_i, p_j) (scale 20, temperature 0.05, as sentence-transformers'
MultipleNegativesRankingLoss), each query's loss is the cross-entropy of picking its positive among all P passages:

    L = (1/B) sum_i [ -s_ii + log sum_{j not in M_i} exp(s_ij) ]                          (InfoNCE, van den Oord 2018)

    dL/ds_ij = (softmax_j(s_i.) - [j = i]) / B  over the unmasked j

M_i, the masked set, is every passage other than q_i's own positive that comes from q_i's document (or has the same
text as q_i's positive). Without it a batch that holds two questions about one chunk (the recipes that batch a
chunk's questions side by side do exactly this) trains each question *away* from its own chunk through the other
question's copy. Masking sets s_ij = -inf, so those passages leave the softmax: no batch holds a false negative.
With no masked entries L is exactly sentence-transformers' MultipleNegativesRankingLoss (tests/test_embed_loss.py).

GradCache (Gao et al. 2021, "Scaling Deep Contrastive Learning Batch Size under Memory Limited Setup", section 3):
L depends on the parameters theta only through the embeddings e_k = f_theta(x_k), so

    dL/dtheta = sum_k (dL/de_k) . (de_k/dtheta)

  1. embed every chunk of c texts without a graph (remembering each chunk's RNG state, for dropout);
  2. compute L on those detached embeddings and backpropagate to them: the cache g_k = dL/de_k (B x P scores only);
  3. when L.backward() runs, re-embed each chunk with a graph, replaying its RNG state, and backpropagate the
     surrogate sum_k <e_k, g_k * dout>, whose parameter gradient is exactly the term above.
Peak activation memory is one chunk's, whatever B is; the cost is a second forward. Loss and gradients equal the
plain loss on the same embeddings within float rounding (1e-5 tested) and sentence-transformers'
CachedMultipleNegativesRankingLoss.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

DEFAULT_SCALE = 20.0


@dataclass
class ContrastiveBatch:
    """Texts and targets of one batch: passages are the B positives then the hard negatives (column by column:
    every pair's first negative, then every second one, ... as sentence-transformers lays them out);
    positive[i] = i; exclude[i, j] masks passage j out of query i's softmax."""

    queries: list[str]
    passages: list[str]
    positive: torch.Tensor  # (B,) long
    exclude: torch.Tensor  # (B, P) bool


def make_batch(pairs: Sequence, document_of: dict[str, str] | None = None) -> ContrastiveBatch:
    """A ContrastiveBatch from embed.data.Pair-like rows (query, positive, negatives, doc_id, document).

    A passage's documents are those of the pairs in the batch whose positive it is, and document_of[text] (the
    corpus's doc_id of a chunk) when given; query i masks every passage sharing its document or its positive's
    text, except its own positive and its own given negatives (what the data says to push away, it pushes away)."""
    docs_of_text: dict[str, set] = {}
    for p in pairs:
        docs_of_text.setdefault(p.positive, set()).add(p.document)

    def keys(text: str) -> set:
        found = {f"text:{text}", *docs_of_text.get(text, ())}
        if document_of and text in document_of:
            found.add(f"id:{document_of[text]}")
        return found

    passages, passage_keys, owner = [], [], []
    for i, p in enumerate(pairs):
        passages.append(p.positive)
        passage_keys.append(keys(p.positive))
        owner.append(i)
    for k in range(max((len(p.negatives) for p in pairs), default=0)):
        for i, p in enumerate(pairs):
            if k < len(p.negatives):
                passages.append(p.negatives[k])
                passage_keys.append(keys(p.negatives[k]))
                owner.append(i)
    query_keys = [{p.document, f"text:{p.positive}"} for p in pairs]
    positive = torch.arange(len(pairs))
    exclude = false_negative_mask(query_keys, passage_keys, positive)
    exclude[torch.tensor(owner[len(pairs):], dtype=torch.long), torch.arange(len(pairs), len(passages))] = False
    return ContrastiveBatch([p.query for p in pairs], passages, positive, exclude)


def false_negative_mask(query_keys: Sequence[set], passage_keys: Sequence[set], positive: torch.Tensor) -> torch.Tensor:
    """(B, P) bool: True where passage j shares a key (document or text) with query i and is not i's positive."""
    ids: dict = {}
    width = max((len(k) for k in (*query_keys, *passage_keys)), default=1)

    def table(key_sets, missing):  # (n, width) key ids; absent slots get ids no other slot has
        rows = [[ids.setdefault(k, len(ids)) for k in keys] for keys in key_sets]
        return torch.tensor([r + [missing - i * width - j for j in range(width - len(r))] for i, r in enumerate(rows)],
                            dtype=torch.long).reshape(len(rows), width)

    q = table(query_keys, -1)
    p = table(passage_keys, -1 - len(query_keys) * width)
    mask = (q[:, None, :, None] == p[None, :, None, :]).any(dim=-1).any(dim=-1)  # (B, P)
    mask[torch.arange(len(query_keys)), positive] = False
    return mask


def contrastive_logits(queries: torch.Tensor, passages: torch.Tensor, exclude: torch.Tensor | None = None,
                       scale: float = DEFAULT_SCALE) -> torch.Tensor:
    """(B, P) scaled cosine similarities s_ij, -inf where excluded."""
    logits = scale * F.normalize(queries, p=2, dim=-1) @ F.normalize(passages, p=2, dim=-1).T
    return logits if exclude is None else logits.masked_fill(exclude.to(logits.device), float("-inf"))


def contrastive_loss(queries: torch.Tensor, passages: torch.Tensor, positive: torch.Tensor,
                     exclude: torch.Tensor | None = None, scale: float = DEFAULT_SCALE) -> torch.Tensor:
    """L (module doc): the mean over queries of the cross-entropy of each query's positive among the passages."""
    return F.cross_entropy(contrastive_logits(queries, passages, exclude, scale), positive.to(queries.device))


def nested_contrastive_loss(queries: torch.Tensor, passages: torch.Tensor, positive: torch.Tensor,
                            exclude: torch.Tensor | None = None, scale: float = DEFAULT_SCALE,
                            dims: Sequence[int] = ()) -> torch.Tensor:
    """Matryoshka (Kusupati et al. 2022, "Matryoshka Representation Learning", eq. 1, equal weights): L summed over
    the embeddings cut to their first d dimensions, each renormalised (contrastive_logits normalises),

        L_M = sum_{d in dims} L(q[:, :d], p[:, :d])

    so every prefix of the vector is an embedding of its own. No dims: the plain L."""
    if not dims:
        return contrastive_loss(queries, passages, positive, exclude, scale)
    return sum(contrastive_loss(queries[:, :d], passages[:, :d], positive, exclude, scale) for d in dims)


class _RngState:
    """The CPU (and CUDA, once initialised) RNG state at creation; `replay()` runs a block from it and leaves
    the outer state untouched, so a second forward draws the first one's dropout masks."""

    def __init__(self):
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None

    @contextlib.contextmanager
    def replay(self):
        devices = list(range(len(self.cuda))) if self.cuda is not None else []
        with torch.random.fork_rng(devices=devices):
            torch.set_rng_state(self.cpu)
            if self.cuda is not None:
                torch.cuda.set_rng_state_all(self.cuda)
            yield


def cached_contrastive_loss(embed: Callable[[list[str]], torch.Tensor], batch: ContrastiveBatch,
                            scale: float = DEFAULT_SCALE, chunk_size: int = 32,
                            use_exclude: bool = True, dims: Sequence[int] = ()) -> torch.Tensor:
    """L of `batch` by GradCache (module doc). `embed(texts)` -> (n, d) embeddings with a graph. Returns a scalar
    whose backward() accumulates dL/dtheta * dout into the parameters' .grad, one chunk of texts at a time.
    `dims`: the Matryoshka sum over nested dimensions (nested_contrastive_loss) instead of L."""
    columns = [batch.queries, batch.passages]
    chunks = [[texts[s:s + chunk_size] for s in range(0, len(texts), chunk_size)] for texts in columns]
    # 1. embeddings without a graph, each chunk's RNG state remembered
    states, reps = [], []
    with torch.no_grad():
        for column in chunks:
            states.append([]), reps.append([])
            for texts in column:
                states[-1].append(_RngState())
                reps[-1].append(embed(texts).detach())
    exclude = batch.exclude if use_exclude else None
    if not torch.is_grad_enabled():  # evaluation: no cache, no hook
        return nested_contrastive_loss(torch.cat(reps[0]), torch.cat(reps[1]), batch.positive, exclude, scale, dims)
    # 2. L on the detached embeddings; the cache g = dL/de
    q = torch.cat(reps[0]).requires_grad_()
    p = torch.cat(reps[1]).requires_grad_()
    loss = nested_contrastive_loss(q, p, batch.positive, exclude, scale, dims)
    loss.backward()
    cache = [g.split([len(r) for r in column_reps]) for g, column_reps in zip((q.grad, p.grad), reps)]

    # 3. on backward: re-embed chunk by chunk with a graph, and backpropagate <e, g * dout>
    def backward_hook(dout: torch.Tensor) -> None:
        with torch.enable_grad():
            for column, column_states, column_cache in zip(chunks, states, cache):
                for texts, state, grad in zip(column, column_states, column_cache):
                    with state.replay():
                        surrogate = (embed(texts) * (grad * dout)).sum()
                    surrogate.backward()

    result = loss.detach().requires_grad_()
    result.register_hook(backward_hook)
    return result
