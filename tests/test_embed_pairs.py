"""`tunesmith embed pairs` (tunesmith/embed/pairs.py): documents -> chunks -> questions -> filters -> split by
document; the template path end to end, the LLM path's parsing on a fake answer and with a tiny model, and the
hard-negative miner (tunesmith/embed/mine.py): the gold passage and its document are never returned."""

from __future__ import annotations

import json

import pytest

from tunesmith.commands.embed import EmbedPairsConfig, make_pairs_from_folder
from tunesmith.embed.data import Pair, read_pairs
from tunesmith.embed.pairs import (Chunk, Stats, chunk_words, html_to_text, is_copy, llm_messages, make_pairs,
                                   markdown_to_text, parse_questions, read_documents)
from tunesmith.errors import UserError

TOPICS = {
    "lighthouse": "The lighthouse keeper climbs the spiral staircase every evening to light the lantern. Ships "
                  "navigate the rocky coastline by its beam, and fog horns warn sailors during storms.",
    "bakery": "The bakery kneads sourdough before dawn. Ovens bake rye loaves and croissants; customers queue for "
              "cinnamon rolls while flour dusts the counters.",
    "glacier": "Glaciers carve valleys as compacted snow turns into ice. Meltwater feeds rivers, and crevasses "
               "open where the glacier flows over uneven bedrock.",
    "orchestra": "The orchestra tunes to the oboe. Violins carry the melody, timpani mark the rhythm and the "
                 "conductor shapes every crescendo of the symphony.",
}


@pytest.fixture
def documents(tmp_path):
    folder = tmp_path / "docs"
    (folder / "sub").mkdir(parents=True)
    (folder / "lighthouse.txt").write_text(TOPICS["lighthouse"] * 3)
    (folder / "bakery.md").write_text("# Bakery\n\n" + TOPICS["bakery"] + "\n\n```\ncode here\n```\n"
                                      + "[the menu](http://x) " + TOPICS["bakery"])
    (folder / "sub" / "glacier.html").write_text("<html><head><style>p {color: red}</style><script>var x;</script>"
                                                 f"</head><body><p>{TOPICS['glacier']}</p><p>{TOPICS['glacier']}</p>"
                                                 "</body></html>")
    (folder / "orchestra.htm").write_text(f"<div>{TOPICS['orchestra'] * 2}</div>")
    (folder / "ignored.pdf").write_text("not read")
    return folder


def test_markup_is_stripped():
    assert html_to_text("<p>a <b>b</b></p><script>evil()</script><style>x{}</style>c") == "a b\nc"
    assert markdown_to_text("# Title\n- item *one*\n[link](http://u) ![img](i.png)\n```\ncode\n```") == \
        "Title\nitem one\nlink"


def test_chunks_overlap_and_cover_the_text():
    words = [f"w{i}" for i in range(25)]
    chunks = chunk_words(" ".join(words), size=10, overlap=3)
    assert [c.split()[0] for c in chunks] == ["w0", "w7", "w14", "w21"] and chunks[-1].split()[-1] == "w24"
    assert chunks[0].split()[-3:] == chunks[1].split()[:3]  # neighbours share `overlap` words
    assert chunk_words("a b", 10, 3) == ["a b"] and len(chunk_words(" ".join(words[:24]), 10, 3)) == 3
    with pytest.raises(UserError, match="overlap"):
        chunk_words("a b", 5, 5)


def test_template_pairs_end_to_end(documents, tmp_path):
    from test_embed_train import tiny_encoder

    docs = read_documents(documents)
    assert [d for d, _ in docs] == ["bakery.md", "lighthouse.txt", "orchestra.htm", "sub/glacier.html"]
    assert "code here" not in docs[0][1] and "var x" not in docs[3][1] and "color" not in docs[3][1]
    o = EmbedPairsConfig(out=str(tmp_path / "out"), chunk_size=16, chunk_overlap=4, round_trip_k=0,
                         test_fraction=0.25)
    stats = make_pairs_from_folder(str(documents), o)
    assert stats["documents"] == 4 and stats["chunks"] > 4 and stats["generated"] == 2 * stats["chunks"]
    assert 0 < stats["kept_fraction"] <= 1 and stats["kept"] == stats["train_pairs"] + stats["test_pairs"]
    train, test = read_pairs(tmp_path / "out" / "train.jsonl"), read_pairs(tmp_path / "out" / "test.jsonl")
    assert test and not {p.doc_id for p in train} & {p.doc_id for p in test}  # split by document
    for p in train + test:
        assert p.query.endswith("?") and not is_copy(p.query, p.positive)
        terms = [w for w in p.query.rstrip("?").split() if len(w) > 3 and w.islower()]
        assert any(t in p.positive.lower() for t in terms)  # the chunk's own terms
    assert json.loads((tmp_path / "out" / "pairs_stats.json").read_text())["kept"] == stats["kept"]
    # the round trip with an encoder: k = every chunk keeps everything, k = 1 keeps a subset
    encoder_dir = tiny_encoder(tmp_path / "enc")
    from tunesmith.embed.encoder import load_encoder

    encoder = load_encoder(str(encoder_dir))
    everything = make_pairs_from_folder(str(documents), o.model_copy(update={"round_trip_k": 1000}), encoder=encoder)
    strict = make_pairs_from_folder(str(documents), o.model_copy(update={"round_trip_k": 1}), encoder=encoder)
    assert everything["kept"] == stats["kept"] and everything["dropped"]["round_trip"] == 0
    assert strict["kept"] + strict["dropped"]["round_trip"] == stats["kept"]


def test_llm_answer_parsing_and_filters():
    answer = ("Sure! Here are two questions about the passage:\n1. How do I reset my password?\n"
              "2) What does the portal send?  Q3: Is it free?\n- \"Why expire links after one hour?\"\n"
              "To reset a forgotten password, open the account portal?\nreset password?\n"
              "How do I reset my password?\nI hope this helps!")
    parsed = parse_questions(answer)
    assert parsed == ["How do I reset my password?", "What does the portal send?", "Is it free?",
                      "Why expire links after one hour?", "To reset a forgotten password, open the account portal?",
                      "reset password?", "How do I reset my password?"]
    chunk = Chunk("d", "To reset a forgotten password, open the account portal and follow the link.")
    stats = Stats()
    pairs = make_pairs([chunk], [parsed], stats)
    assert [p.query for p in pairs] == ["How do I reset my password?", "What does the portal send?",
                                        "Is it free?", "Why expire links after one hour?"]
    assert stats.dropped == {"not_a_question": 1, "copy": 1, "duplicate": 1, "round_trip": 0}
    assert stats.generated == 7 and stats.kept_fraction == pytest.approx(4 / 7)


def test_llm_generator_runs_a_tiny_model(documents, tmp_path):
    from conftest import build_tiny_model, build_tiny_tokenizer

    messages = llm_messages("PASSAGE TEXT", 3)
    assert messages[0]["role"] == "system" and len(messages) == 6 and "PASSAGE TEXT" in messages[-1]["content"]
    o = EmbedPairsConfig(out=str(tmp_path / "out"), generator="llm", chunk_size=40, chunk_overlap=0, round_trip_k=0,
                         max_new_tokens=8)
    stats = make_pairs_from_folder(str(documents), o, llm=(build_tiny_model().eval(), build_tiny_tokenizer()))
    assert stats["generator"] == "llm" and stats["chunks"] >= 4  # a random tiny model writes no questions:
    assert stats["kept"] == stats["generated"] - sum(stats["dropped"].values())  # the counts still add up


def test_miner_never_returns_the_gold_passage_or_its_document(tmp_path):
    from test_embed_train import tiny_encoder

    from tunesmith.embed.encoder import load_encoder
    from tunesmith.embed.mine import mine_hard_negatives

    words = "river bank money loan water fish boat bridge city north south tree forest mountain snow rain".split()
    pairs = []
    for d in range(8):
        for c in range(2):
            passage = " ".join(words[(d + c + k) % len(words)] for k in range(5))
            pairs.append(Pair(f"what {words[(d + c) % len(words)]} {words[(d + c + 1) % len(words)]}?",
                              passage + f" {d}{c}", doc_id=f"d{d}"))
    pairs.append(Pair(pairs[0].query, "another gold answer to the first question", doc_id="other"))
    encoder = load_encoder(str(tiny_encoder(tmp_path / "enc")))
    extra = ["river bank money loan water", "snow rain tree"]
    mined, stats = mine_hard_negatives(pairs, encoder, num_negatives=3, range_max=50, relative_margin=0.0,
                                       extra_corpus=extra)
    doc_of = {p.positive: p.doc_id for p in pairs}
    gold_of = {}
    for p in pairs:
        gold_of.setdefault(p.query, set()).add(p.positive)
    for p in mined:
        assert not set(p.negatives) & gold_of[p.query]
        assert all(doc_of.get(n) != p.doc_id for n in p.negatives)
    assert sum(len(p.negatives) == 3 for p in mined) >= len(mined) - 2  # margin 0: only scores above the gold
    assert stats.pairs == len(pairs) and stats.negatives == sum(len(p.negatives) for p in mined)
    # the margin and the window bite: a huge margin leaves nothing, range_min skips the closest
    none, stats = mine_hard_negatives(pairs, encoder, relative_margin=0.99)
    assert stats.short == len(pairs) or all(len(p.negatives) < 3 for p in none)
    skipped, _ = mine_hard_negatives(pairs, encoder, num_negatives=1, range_min=1, relative_margin=0.0)
    closest, _ = mine_hard_negatives(pairs, encoder, num_negatives=1, relative_margin=0.0)
    assert any(a.negatives != b.negatives for a, b in zip(skipped, closest))


def test_embed_train_reads_a_documents_folder(documents):
    from tunesmith.embed.config import load_embed_config
    from tunesmith.embed.train import load_data

    cfg = load_embed_config(None, [f"data.train={documents}", "data.chunk_size=16", "data.chunk_overlap=4",
                                   "data.test_split=0.25", "data.val_split=0"])
    data = load_data(cfg)
    assert data.train and data.validation is None and data.test is not None
    held_out = set(data.test[1].values())
    assert all(p.doc_id and p.query.endswith("?") and p.positive not in held_out for p in data.train)
