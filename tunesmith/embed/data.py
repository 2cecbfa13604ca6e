"""Training pairs for an embedding model: (query, positive passage, hard negatives, document id).

A data file (JSON lines, JSON, CSV or Parquet, read by data/readers.py so every row knows its line) holds one
pair per row:

    query       the question, a non-empty string                                     required
    positive    the passage that answers it, a non-empty string                      required
    negative    a passage that does not answer it: a string, or a list of strings    optional
    negatives   a list of such passages (CSV: columns negative_1, negative_2, ...)   optional
    doc_id      the document the positive passage comes from: a string or integer   optional

Other fields are ignored. A malformed row raises one UserError that names the file, the line and the field.

Without doc_id, a pair's document is its positive passage (same passage, same document). The held-out
split is by document, never by question: every pair of one document falls on the same side, so a test
question's passage (and the other passages of its document) is never trained on.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunesmith.errors import UserError

MAX_PROBLEMS = 10


@dataclass(frozen=True)
class Pair:
    """One training example; `where` is its place in the file (`pairs.csv line 7`), for later messages."""

    query: str
    positive: str
    negatives: tuple[str, ...] = ()
    doc_id: str | None = None
    where: str = ""

    @property
    def document(self) -> str:
        """The document key the split and the same-document mask use: doc_id, else the positive passage."""
        return f"id:{self.doc_id}" if self.doc_id is not None else f"text:{self.positive}"


def read_pairs(path: str | Path) -> list[Pair]:
    """Every pair of a data file, validated; one UserError lists the first problems and where they are."""
    from tunesmith.data.readers import read_rows

    rows = read_rows(path)
    pairs, problems = [], []
    for row in rows:
        where = f"{path} {row.location}"
        found = check_pair(row.fields)
        if found:
            problems += [f"{where}: {p}" for p in found]
            continue
        pairs.append(to_pair(row.fields, where))
    if problems:
        more = len(problems) - MAX_PROBLEMS
        head = [] if len(problems) == 1 else [f"{len(problems)} problem(s) in the pairs of {path}:"]
        raise UserError("\n".join(head + problems[:MAX_PROBLEMS] + ([f"... and {more} more"] if more > 0 else [])))
    return pairs


def check_pair(fields: dict[str, Any]) -> list[str]:
    """What is wrong with one row, in the user's terms (empty when nothing is)."""
    problems = []
    for name in ("query", "positive"):
        value = fields.get(name)
        if value is None:
            seen = ", ".join(sorted(fields)) or "none"
            problems.append(f'missing field "{name}" (the row has: {seen})')
        elif not isinstance(value, str) or not value.strip():
            problems.append(f'field "{name}" must be a non-empty string (got {_shown(value)})')
    for name, value in _negative_fields(fields):
        values = value if isinstance(value, list) and name in ("negative", "negatives") else [value]
        if name == "negatives" and not isinstance(value, list):
            problems.append(f'field "negatives" must be a list of strings (got {_shown(value)})')
        elif not all(isinstance(v, str) and v.strip() for v in values):
            problems.append(f'field "{name}" must be a non-empty string or a list of them (got {_shown(value)})')
    doc_id = fields.get("doc_id")
    if doc_id is not None and (isinstance(doc_id, bool) or not isinstance(doc_id, (str, int))):
        problems.append(f'field "doc_id" must be a string or an integer (got {_shown(doc_id)})')
    return problems


def _negative_fields(fields: dict[str, Any]) -> list[tuple[str, Any]]:
    """(name, value) of the negative fields present; empty CSV cells and nulls count as absent."""
    names = [n for n in fields if n in ("negative", "negatives") or (n.startswith("negative_") and n[9:].isdigit())]
    return [(n, fields[n]) for n in sorted(names, key=lambda n: (len(n), n)) if fields[n] not in (None, "")]


def to_pair(fields: dict[str, Any], where: str = "") -> Pair:
    negatives = []
    for _, value in _negative_fields(fields):
        negatives += value if isinstance(value, list) else [value]
    doc_id = fields.get("doc_id")
    return Pair(fields["query"], fields["positive"], tuple(negatives),
                None if doc_id in (None, "") else str(doc_id), where)


def split_by_document(pairs: list[Pair], test_fraction: float, seed: int = 0) -> tuple[list[Pair], list[Pair]]:
    """(train, test): whole documents go to test, in a seeded random order, until it holds about test_fraction of
    the pairs (at least one document when test_fraction > 0 and there are two or more). No document is on both
    sides; the order of pairs within each side is the file's."""
    if not 0 <= test_fraction < 1:
        raise UserError(f"The test fraction must be in [0, 1) (got {test_fraction}).")
    documents = sorted({p.document for p in pairs})
    random.Random(seed).shuffle(documents)
    sizes = {}
    for p in pairs:
        sizes[p.document] = sizes.get(p.document, 0) + 1
    target, held, test_docs = test_fraction * len(pairs), 0, set()
    for doc in documents[:-1]:  # the last document always stays in train
        if held >= target or (held and held + sizes[doc] - target > target - held):
            break  # stop at the count nearest the target
        test_docs.add(doc)
        held += sizes[doc]
    return [p for p in pairs if p.document not in test_docs], [p for p in pairs if p.document in test_docs]


def retrieval_set(pairs: list[Pair]) -> tuple[dict[str, str], dict[str, str], dict[str, set[str]]]:
    """(queries, corpus, qrels) for scoring: each distinct passage (positives and negatives) is one corpus entry
    (id p0, p1, ... in first-seen order), each pair one query (q0, q1, ...) whose relevant passage is its positive.
    The same question asked twice stays two queries."""
    corpus, ids = {}, {}
    for p in pairs:
        for text in (p.positive, *p.negatives):
            if text not in ids:
                ids[text] = f"p{len(ids)}"
                corpus[ids[text]] = text
    queries = {f"q{i}": p.query for i, p in enumerate(pairs)}
    qrels = {f"q{i}": {ids[p.positive]} for i, p in enumerate(pairs)}
    return queries, corpus, qrels


def _shown(value: Any) -> str:
    from tunesmith.data.formats import shown

    return shown(value)
