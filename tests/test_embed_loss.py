"""The contrastive loss (tunesmith/objectives/contrastive.py): equal to sentence-transformers'
MultipleNegativesRankingLoss and CachedMultipleNegativesRankingLoss (loss and every parameter gradient within 1e-5)
when nothing is masked; GradCache equal to the plain loss, dropout included; same-document masking on batches
built to hold same-document passages."""

from __future__ import annotations

import math
import random

import pytest
import torch

from conftest import ENCODER_WORDS, build_tiny_encoder
from tunesmith.embed.data import Pair
from tunesmith.embed.encoder import load_encoder
from tunesmith.objectives.contrastive import (cached_contrastive_loss, contrastive_logits, contrastive_loss,
                                              make_batch)


def sentence(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(ENCODER_WORDS) for _ in range(n))


def distinct_pairs(n: int, negatives: int, seed: int = 0) -> list[Pair]:
    """Pairs whose texts and documents all differ: nothing to mask."""
    rng = random.Random(seed)
    return [Pair(sentence(rng, rng.randint(3, 8)) + "?", f"passage {i} " + sentence(rng, rng.randint(4, 14)),
                 tuple(f"negative {i}.{k} " + sentence(rng, rng.randint(4, 14)) for k in range(negatives)),
                 doc_id=f"d{i}") for i in range(n)]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return build_tiny_encoder(tmp_path_factory.mktemp("enc") / "tiny")


def grads(module, prefix: str = "") -> dict[str, torch.Tensor]:
    """{parameter name without `prefix`: its gradient}, then the gradients are cleared."""
    out = {n[len(prefix):]: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}
    module.zero_grad(set_to_none=True)
    return out


def assert_same_grads(a: dict, b: dict, tol: float = 1e-5):
    assert a.keys() == b.keys() and len(a) > 10
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst <= tol, worst
    assert max(v.abs().max().item() for v in a.values()) > 1e-3  # the gradients are not all ~0


def plain(encoder, batch, scale=20.0, use_exclude=True):
    q = encoder(encoder.tokenize(batch.queries))
    p = encoder(encoder.tokenize(batch.passages))
    return contrastive_loss(q, p, batch.positive, batch.exclude if use_exclude else None, scale)


def st_loss(folder, pairs, cached: bool, scale: float, mini_batch_size: int = 2):
    """sentence-transformers' loss on the same pairs (columns anchor, positive, negative_1, ...) and its gradients."""
    st = pytest.importorskip("sentence_transformers")
    from sentence_transformers.sentence_transformer import losses

    model = st.SentenceTransformer(str(folder), device="cpu")
    model.train()
    columns = [[p.query for p in pairs], [p.positive for p in pairs]]
    columns += [[p.negatives[k] for p in pairs] for k in range(len(pairs[0].negatives))]
    features = [model.preprocess(texts) for texts in columns]
    loss_fn = (losses.CachedMultipleNegativesRankingLoss(model, scale=scale, mini_batch_size=mini_batch_size)
               if cached else losses.MultipleNegativesRankingLoss(model, scale=scale))
    loss = loss_fn(features, None)
    loss.backward()
    return loss.item(), grads(model, "0.")


@pytest.mark.parametrize("negatives,scale", [(0, 20.0), (2, 20.0), (1, 7.5)])
def test_equal_to_multiple_negatives_ranking_loss(folder, negatives, scale):
    pairs = distinct_pairs(6, negatives)
    batch = make_batch(pairs)
    assert not batch.exclude.any() and len(batch.passages) == 6 * (1 + negatives)
    encoder = load_encoder(str(folder))
    encoder.train()
    loss = plain(encoder, batch, scale)
    loss.backward()
    ours = grads(encoder)
    theirs_loss, theirs = st_loss(folder, pairs, cached=False, scale=scale)
    assert abs(loss.item() - theirs_loss) <= 1e-5 and loss.item() > 0.1
    assert_same_grads(ours, theirs)


def test_cached_equals_plain_and_cached_multiple_negatives_ranking_loss(folder):
    pairs = distinct_pairs(7, 1, seed=3)
    batch = make_batch(pairs)
    encoder = load_encoder(str(folder))
    encoder.train()
    reference = plain(encoder, batch)
    reference.backward()
    expected = grads(encoder)
    embed = lambda texts: encoder(encoder.tokenize(texts))  # noqa: E731
    loss = cached_contrastive_loss(embed, batch, chunk_size=2)
    assert abs(loss.item() - reference.item()) <= 1e-5
    (0.5 * loss).backward()  # dout reaches every chunk (accumulation divides the loss)
    assert_same_grads({k: 2 * v for k, v in grads(encoder).items()}, expected)
    theirs_loss, theirs = st_loss(folder, pairs, cached=True, scale=20.0, mini_batch_size=2)
    assert abs(loss.item() - theirs_loss) <= 1e-5
    assert_same_grads(expected, theirs)
    with torch.no_grad():  # evaluation: the value, no hook
        assert abs(cached_contrastive_loss(embed, batch, chunk_size=3).item() - reference.item()) <= 1e-5


def test_cached_replays_dropout(folder):
    """With dropout on, GradCache's second forward must draw the first one's masks: its gradients equal those of
    the plain loss on embeddings computed chunk by chunk in the same order from the same seed."""
    pairs = distinct_pairs(5, 1, seed=4)
    batch = make_batch(pairs)
    encoder = load_encoder(str(folder))
    for m in encoder.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.2
    encoder.train()
    embed = lambda texts: encoder(encoder.tokenize(texts))  # noqa: E731

    def chunked(texts):
        return torch.cat([embed(texts[s:s + 2]) for s in range(0, len(texts), 2)])

    torch.manual_seed(11)
    reference = contrastive_loss(chunked(batch.queries), chunked(batch.passages), batch.positive, batch.exclude)
    reference.backward()
    expected = grads(encoder)
    torch.manual_seed(11)
    loss = cached_contrastive_loss(embed, batch, chunk_size=2)
    loss.backward()
    assert abs(loss.item() - reference.item()) <= 1e-5
    assert_same_grads(grads(encoder), expected)
    torch.manual_seed(12)
    assert abs(plain(encoder, batch).item() - reference.item()) > 1e-4  # dropout really is on


def same_document_pairs() -> list[Pair]:
    """Two questions about doc A's one chunk, two about doc B's two chunks, one pair without doc_id whose positive is
    another pair's hard negative, and an unrelated pair."""
    a1, b1, b2 = "money loan interest in the bank", "the old bridge over the river", "the red river in the north"
    z, c1 = "fish swim in the blue water", "rain and snow on the green mountain"
    return [Pair("what is a loan?", a1, (z,), doc_id="A"),
            Pair("how does interest work?", a1, doc_id="A"),
            Pair("where is the bridge?", b1, doc_id="B"),
            Pair("which river?", b2, doc_id="B"),
            Pair("what is the water?", z),
            Pair("why rain?", c1, doc_id="C")]


def test_same_document_passages_are_masked():
    batch = make_batch(same_document_pairs())
    pairs = same_document_pairs()
    assert batch.passages == [p.positive for p in pairs] + [pairs[0].negatives[0]]
    masked = {(i, j) for i, j in batch.exclude.nonzero().tolist()}
    assert masked == {(0, 1), (1, 0), (2, 3), (3, 2), (4, 6)}  # never a query's own positive (j == i)


def test_masked_loss_is_the_softmax_over_the_other_passages():
    batch = make_batch(same_document_pairs())
    g = torch.Generator().manual_seed(0)
    q = torch.randn(len(batch.queries), 8, generator=g, requires_grad=True)
    p = torch.randn(len(batch.passages), 8, generator=g, requires_grad=True)
    loss = contrastive_loss(q, p, batch.positive, batch.exclude, scale=5.0)
    logits = contrastive_logits(q, p, scale=5.0).detach()
    by_hand = 0.0
    for i in range(len(batch.queries)):
        kept = [j for j in range(len(batch.passages)) if not batch.exclude[i, j]]
        by_hand += -logits[i, i].item() + math.log(sum(math.exp(logits[i, j].item()) for j in kept))
    assert loss.item() == pytest.approx(by_hand / len(batch.queries), abs=1e-5)
    assert abs(loss.item() - contrastive_loss(q, p, batch.positive, None, 5.0).item()) > 1e-3
    loss.backward()
    # query 4 (no doc_id) must not be pushed away from "chunk Z" through column 6, its own text
    probe = torch.zeros_like(p, requires_grad=True)
    contrastive_loss(q[4:5].detach(), p.detach() + probe, batch.positive[4:5], batch.exclude[4:5], 5.0).backward()
    assert probe.grad[6].abs().max() == 0 and probe.grad[4].abs().max() > 0


@pytest.mark.parametrize("seed", range(5))
def test_no_batch_holds_a_false_negative(seed):
    """Random batches of pairs from few documents, chunks shared by several questions, hard negatives drawn from
    the other chunks: every unmasked passage other than the positive comes from another document and text."""
    rng = random.Random(seed)
    chunks = {f"doc{d}": [f"doc{d} chunk{c}" for c in range(rng.randint(1, 3))] for d in range(6)}
    pairs = []
    for i in range(16):
        doc = rng.choice(sorted(chunks))
        other = rng.choice([c for d, cs in chunks.items() if d != doc for c in cs])
        pairs.append(Pair(f"q{i}", rng.choice(chunks[doc]), (other,) if rng.random() < 0.5 else (), doc_id=doc))
    doc_of = {c: d for d, cs in chunks.items() for c in cs}
    batch = make_batch(pairs, document_of=doc_of)
    for i, pair in enumerate(pairs):
        for j, text in enumerate(batch.passages):
            false_negative = j != i and (doc_of[text] == pair.doc_id or text == pair.positive)
            assert bool(batch.exclude[i, j]) == false_negative, (i, j)
    assert batch.exclude.any()
    g = torch.Generator().manual_seed(seed)
    q, p = torch.randn(16, 4, generator=g), torch.randn(len(batch.passages), 4, generator=g)
    assert torch.isfinite(contrastive_loss(q, p, batch.positive, batch.exclude))


def test_cached_with_masking_equals_plain(folder):
    batch = make_batch(same_document_pairs())
    encoder = load_encoder(str(folder))
    reference = plain(encoder, batch)
    reference.backward()
    expected = grads(encoder)
    loss = cached_contrastive_loss(lambda t: encoder(encoder.tokenize(t)), batch, chunk_size=3)
    loss.backward()
    assert abs(loss.item() - reference.item()) <= 1e-5
    assert_same_grads(grads(encoder), expected)
