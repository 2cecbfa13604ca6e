"""BEIR-format retrieval sets: read and write queries, corpus and relevance judgements.

A BEIR folder (Thakur et al. 2021, the layout MTEB and sentence-transformers read) holds

    corpus.jsonl        {"_id": "d1", "title": "...", "text": "..."}   one passage per line (title optional)
    queries.jsonl       {"_id": "q1", "text": "..."}                   one query per line
    qrels/<split>.tsv   query-id <tab> corpus-id <tab> score            a header line, then one judgement per line

A passage's text is its title and text joined by a space (stripped), as sentence-transformers'
InformationRetrievalEvaluator joins them. Judgements with score <= 0 are not relevant. Ids are kept as strings.
Errors name the file, the line and the field.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from tunesmith.errors import UserError


def read_beir(folder: str | Path, split: str = "test") -> tuple[dict[str, str], dict[str, str], dict[str, set[str]]]:
    """(queries {id: text}, corpus {id: text}, qrels {query id: relevant corpus ids}) of a BEIR folder."""
    folder = Path(folder)
    qrels_path = folder / "qrels" / f"{split}.tsv"
    for path in (folder / "corpus.jsonl", folder / "queries.jsonl", qrels_path):
        if not path.is_file():
            raise UserError(f"{path} does not exist; a BEIR folder holds corpus.jsonl, queries.jsonl and "
                            f"qrels/{split}.tsv.")
    corpus = {i: (f"{f.get('title') or ''} {f['text']}").strip()
              for i, f in _read_records(folder / "corpus.jsonl", ("_id", "text"), ("title",))}
    queries = {i: f["text"] for i, f in _read_records(folder / "queries.jsonl", ("_id", "text"), ())}
    return queries, corpus, _read_qrels(qrels_path, queries, corpus)


def _read_records(path: Path, required: tuple[str, ...], optional: tuple[str, ...]):
    """(id, fields) of each JSON line, checked: required string fields present, ids unique."""
    from tunesmith.data.readers import read_rows

    seen = set()
    for row in read_rows(path):
        where = f"{path} {row.location}"
        for name in required + optional:
            value = row.fields.get(name)
            if value is None and name in optional:
                continue
            if name == "_id" and isinstance(value, int) and not isinstance(value, bool):
                value = row.fields[name] = str(value)
            if not isinstance(value, str) or (name == "_id" and not value):
                got = "nothing" if value is None else json.dumps(value)[:40]
                raise UserError(f'{where}: field "{name}" must be a{" non-empty" if name == "_id" else ""} string '
                                f"(got {got}).")
        if row.fields["_id"] in seen:
            raise UserError(f'{where}: field "_id" {row.fields["_id"]!r} appears twice.')
        seen.add(row.fields["_id"])
        yield row.fields["_id"], row.fields


def _read_qrels(path: Path, queries: dict, corpus: dict) -> dict[str, set[str]]:
    """{query id: {corpus ids with score > 0}}; unknown query ids are errors, unknown corpus ids are kept (they
    count in recall's denominator, as in BEIR)."""
    qrels: dict[str, set[str]] = {}
    lines = path.read_text(encoding="utf-8-sig").splitlines()
    for number, cells in enumerate(csv.reader(io.StringIO("\n".join(lines)), delimiter="\t"), start=1):
        if number == 1 and cells and cells[0].strip().lower() in ("query-id", "query_id", "qid"):
            continue  # the header
        if not any(c.strip() for c in cells):
            continue
        if len(cells) != 3:
            raise UserError(f"{path} line {number}: expected 3 tab-separated fields (query-id, corpus-id, score), "
                            f"got {len(cells)}.")
        qid, cid, score = (c.strip() for c in cells)
        try:
            value = float(score)
        except ValueError:
            raise UserError(f'{path} line {number}: field "score" must be a number (got {score!r}).') from None
        if qid not in queries:
            raise UserError(f'{path} line {number}: field "query-id" {qid!r} is not in queries.jsonl.')
        if value > 0:
            qrels.setdefault(qid, set()).add(cid)
    return qrels


def write_beir(folder: str | Path, queries: dict[str, str], corpus: dict[str, str], qrels: dict[str, set[str]],
               split: str = "test") -> Path:
    """Write a BEIR folder (no titles; score 1 for every relevant pair); returns the folder."""
    folder = Path(folder)
    (folder / "qrels").mkdir(parents=True, exist_ok=True)
    (folder / "corpus.jsonl").write_text("".join(json.dumps({"_id": i, "title": "", "text": t}, ensure_ascii=False)
                                                 + "\n" for i, t in corpus.items()), encoding="utf-8")
    (folder / "queries.jsonl").write_text("".join(json.dumps({"_id": i, "text": t}, ensure_ascii=False) + "\n"
                                                  for i, t in queries.items()), encoding="utf-8")
    rows = ["query-id\tcorpus-id\tscore"] + [f"{q}\t{c}\t1" for q, cs in qrels.items() for c in sorted(cs)]
    (folder / "qrels" / f"{split}.tsv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    return folder
