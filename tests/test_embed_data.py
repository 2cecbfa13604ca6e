"""Query/passage pairs (tunesmith/embed/data.py): the three file formats, errors naming file, line and field,
the split by document and the retrieval set built from pairs."""

from __future__ import annotations

import json

import pytest

from tunesmith.embed.data import Pair, read_pairs, retrieval_set, split_by_document
from tunesmith.errors import UserError


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_jsonl_csv_parquet_read_the_same(tmp_path):
    rows = [{"query": "q one", "positive": "p one", "negative": ["n1", "n2"], "doc_id": 7},
            {"query": "q two", "positive": "p two", "extra": "ignored"}]
    from_jsonl = read_pairs(write_jsonl(tmp_path / "pairs.jsonl", rows))
    (tmp_path / "pairs.csv").write_text("query,positive,negative_1,negative_2,doc_id\n"
                                        "q one,p one,n1,n2,7\nq two,p two,,,\n", encoding="utf-8")
    from_csv = read_pairs(tmp_path / "pairs.csv")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist([{**rows[0], "doc_id": "7"}, {**rows[1], "negative": None}]),
                   tmp_path / "pairs.parquet")
    from_parquet = read_pairs(tmp_path / "pairs.parquet")
    expected = [("q one", "p one", ("n1", "n2"), "7"), ("q two", "p two", (), None)]
    for pairs in (from_jsonl, from_csv, from_parquet):
        assert [(p.query, p.positive, p.negatives, p.doc_id) for p in pairs] == expected
    assert from_csv[0].where.endswith("pairs.csv line 2")


@pytest.mark.parametrize("row,line,message", [
    ({"query": "q", "positve": "p"}, 2, 'line 2: missing field "positive" (the row has: positve, query)'),
    ({"query": "", "positive": "p"}, 2, 'line 2: field "query" must be a non-empty string (got "")'),
    ({"query": "q", "positive": "p", "negatives": "n"}, 2, 'field "negatives" must be a list of strings'),
    ({"query": "q", "positive": "p", "negative": [1]}, 2, 'field "negative" must be a non-empty string or a list'),
    ({"query": "q", "positive": "p", "doc_id": [1]}, 2, 'field "doc_id" must be a string or an integer'),
])
def test_errors_name_file_line_and_field(tmp_path, row, line, message):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"query": "fine", "positive": "fine"}, row])
    with pytest.raises(UserError) as e:
        read_pairs(path)
    assert str(path) in str(e.value) and message in str(e.value)


def test_many_problems_are_listed_together(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"query": "q"}] * 12)
    with pytest.raises(UserError) as e:
        read_pairs(path)
    text = str(e.value)
    assert text.startswith(f"12 problem(s) in the pairs of {path}") and "line 10:" in text and "... and 2 more" in text


def demo_pairs(n_docs=30, seed=0):
    import random

    rng = random.Random(seed)
    pairs = []
    for d in range(n_docs):
        for j in range(rng.randint(1, 5)):
            pairs.append(Pair(f"question {d}.{j}", f"passage {d}.{rng.randint(0, 2)}", doc_id=f"doc{d}"))
    return pairs


@pytest.mark.parametrize("fraction,seed", [(0.2, 0), (0.1, 1), (0.5, 2)])
def test_split_by_document_never_by_question(fraction, seed):
    pairs = demo_pairs(seed=seed)
    train, test = split_by_document(pairs, fraction, seed)
    assert sorted(train + test, key=pairs.index) == pairs
    assert not {p.document for p in train} & {p.document for p in test}
    assert abs(len(test) - fraction * len(pairs)) <= 5  # whole documents: near the target, not exact
    assert split_by_document(pairs, fraction, seed) == (train, test)  # seeded
    assert split_by_document(pairs, fraction, seed + 10) != (train, test)


def test_split_without_doc_id_keeps_a_passage_on_one_side():
    pairs = [Pair(f"q{i}", f"passage {i % 4}") for i in range(20)]
    train, test = split_by_document(pairs, 0.3, 0)
    assert test and not {p.positive for p in train} & {p.positive for p in test}
    assert split_by_document(pairs, 0.0, 0) == (pairs, [])
    with pytest.raises(UserError, match=r"\[0, 1\)"):
        split_by_document(pairs, 1.0)


def test_retrieval_set():
    pairs = [Pair("a?", "A", ("B",)), Pair("b?", "B"), Pair("a again?", "A")]
    queries, corpus, qrels = retrieval_set(pairs)
    assert corpus == {"p0": "A", "p1": "B"}
    assert queries == {"q0": "a?", "q1": "b?", "q2": "a again?"}
    assert qrels == {"q0": {"p0"}, "q1": {"p1"}, "q2": {"p0"}}
