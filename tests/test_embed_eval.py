"""BEIR import/export (tunesmith/embed/beir.py), the demo corpus (embed/demo.py) and `tunesmith embed eval` on a tiny
encoder; the default model on the demo only in an integration test."""

from __future__ import annotations

import json
import re

import pytest

from conftest import build_tiny_encoder
from tunesmith.cli import main
from tunesmith.embed.beir import read_beir, write_beir
from tunesmith.embed.demo import ACTIONS, SITUATIONS, THINGS, demo_corpus, vocabulary, write_embed_demo
from tunesmith.errors import UserError


def test_beir_round_trip_and_titles(tmp_path):
    queries = {"q1": "what is a loan?", "q2": "where is the river?", "q3": "no judgement"}
    corpus = {"d1": "money loan interest", "d2": "the river bank", "d3": "snow"}
    qrels = {"q1": {"d1"}, "q2": {"d2", "d3"}}
    folder = write_beir(tmp_path / "beir", queries, corpus, qrels)
    assert read_beir(folder) == (queries, corpus, qrels)
    (folder / "corpus.jsonl").write_text('{"_id": 7, "title": "Loans", "text": "money loan"}\n')
    (folder / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq1\t7\t1\nq2\td2\t0\n")
    assert read_beir(folder) == (queries, {"7": "Loans money loan"}, {"q1": {"7"}})


@pytest.mark.parametrize("file,text,message", [
    ("corpus.jsonl", '{"_id": "d1"}\n', 'corpus.jsonl line 1: field "text" must be a string (got nothing)'),
    ("corpus.jsonl", '{"_id": "d1", "text": "a"}\n{"_id": "d1", "text": "b"}\n', 'line 2: field "_id" \'d1\' appears'),
    ("queries.jsonl", '{"_id": "", "text": "a"}\n', 'queries.jsonl line 1: field "_id" must be a non-empty string'),
    ("qrels/test.tsv", "query-id\tcorpus-id\tscore\nq1\td1\n", "test.tsv line 2: expected 3 tab-separated fields"),
    ("qrels/test.tsv", "q1\td1\thigh\n", 'test.tsv line 1: field "score" must be a number'),
    ("qrels/test.tsv", "q9\td1\t1\n", 'test.tsv line 1: field "query-id" \'q9\' is not in queries.jsonl'),
])
def test_beir_errors_name_file_line_and_field(tmp_path, file, text, message):
    folder = write_beir(tmp_path / "beir", {"q1": "a?"}, {"d1": "a"}, {"q1": {"d1"}})
    (folder / file).write_text(text)
    with pytest.raises(UserError, match=re.escape(message)):
        read_beir(folder)
    (folder / file).unlink()
    with pytest.raises(UserError, match="does not exist"):
        read_beir(folder)


def test_demo_has_a_vocabulary_gap_and_splits_by_document(tmp_path):
    pairs, corpus, document_of = demo_corpus(seed=3)
    assert demo_corpus(seed=3)[0] == pairs and demo_corpus(seed=4)[0] != pairs
    assert len(corpus) == len(THINGS) * len(SITUATIONS) * 4 and len(pairs) == 2 * len(corpus)
    jargon = set(vocabulary(3).values())
    plain = {w for group in ACTIONS + THINGS + SITUATIONS for phrase in group for w in phrase.split()
             if len(w) > 3 and w not in ("when", "with", "external", "team", "office", "first", "whole")}
    for p in pairs:
        words = set(re.findall(r"[a-z]+", p.query.lower()))
        assert not words & jargon, p.query  # questions in plain words only
        assert not set(re.findall(r"[a-z]+", p.positive.lower())) & plain, p.positive  # chunks in jargon only
    paths = write_embed_demo(tmp_path / "demo", seed=3)
    train = [json.loads(line) for line in paths["train"].read_text().splitlines()]
    test = [json.loads(line) for line in paths["test"].read_text().splitlines()]
    assert not {r["doc_id"] for r in train} & {r["doc_id"] for r in test}
    assert 0.15 < len(test) / len(pairs) < 0.25
    queries, beir_corpus, qrels = read_beir(paths["beir"])
    assert beir_corpus == corpus and len(queries) == len(test) == len(qrels)
    assert all(document_of[next(iter(qrels[q]))] == test[int(q[1:])]["doc_id"] for q in queries)


def test_embed_eval_prints_the_table_and_writes_json(tmp_path, capsys):
    model = build_tiny_encoder(tmp_path / "enc", seed=0)
    baseline = build_tiny_encoder(tmp_path / "base", seed=1)
    folder = write_beir(tmp_path / "beir", {f"q{i}": f"the river {w}?" for i, w in enumerate(["bank", "fish", "boat"])},
                        {f"d{i}": f"a {w} in the north" for i, w in enumerate(["bank", "fish", "boat", "tree"])},
                        {f"q{i}": {f"d{i}"} for i in range(3)})
    out = tmp_path / "metrics.json"
    main(["embed", "eval", str(folder), "--model", str(model), "--baseline", str(baseline), "--resamples", "50",
          "--out", str(out), "--device", "cpu"])
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[0] == "metric" and "difference (model - baseline)" in table[0]
    assert [row.split()[0] for row in table[1:]] == ["accuracy@1", "accuracy@3", "accuracy@5", "accuracy@10",
                                                     "precision@1", "precision@3", "precision@5", "precision@10",
                                                     "recall@1", "recall@3", "recall@5", "recall@10", "mrr@10",
                                                     "ndcg@10", "map@100"]
    columns = json.loads(out.read_text())
    model_col, base_col, diff_col = (columns[k] for k in (f"model ({model})", f"baseline ({baseline})",
                                                          "difference (model - baseline)"))
    assert model_col["accuracy@10"]["value"] == 1.0  # 4 passages: every query's passage is in the top 10
    assert diff_col["mrr@10"]["value"] == pytest.approx(model_col["mrr@10"]["value"] - base_col["mrr@10"]["value"])
    assert model_col["mrr@10"]["ci"][0] <= model_col["mrr@10"]["value"] <= model_col["mrr@10"]["ci"][1]


def test_embed_eval_reads_a_pairs_file(tmp_path, capsys):
    model = build_tiny_encoder(tmp_path / "enc")
    data = tmp_path / "pairs.jsonl"
    data.write_text('{"query": "the river?", "positive": "a river bank", "negative": "snow"}\n'
                    '{"query": "fish?", "positive": "fish in the water"}\n')
    main(["embed", "eval", str(data), "--model", str(model), "--resamples", "0"])
    rows = {r.split()[0]: r.split()[1:] for r in capsys.readouterr().out.splitlines()[1:]}
    assert rows["accuracy@3"] == ["1.0000"]  # 3 passages (the negative is a corpus entry too), no interval
    assert float(rows["precision@3"][0]) == pytest.approx(1 / 3, abs=1e-4)


@pytest.mark.integration
@pytest.mark.slow  # ~20 s on 2 cores: 512 passages and 208 questions through the default model
def test_default_encoder_on_the_demo(tmp_path, capsys):
    """The base model on the held-out demo questions: scored, and far from perfect (the vocabulary gap is real)."""
    paths = write_embed_demo(tmp_path / "demo")
    main(["embed", "eval", str(paths["beir"]), "--resamples", "100", "--out", str(tmp_path / "m.json")])
    column = next(iter(json.loads((tmp_path / "m.json").read_text()).values()))
    assert 0 < column["mrr@10"]["value"] < 0.6
