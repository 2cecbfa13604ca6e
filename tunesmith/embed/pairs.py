"""Training pairs from a folder of documents: chunks, questions about each chunk, filters, a held-out split.

    documents (.txt, .md, .markdown, .html, .htm; markup stripped) -> chunks of `size` words, neighbours sharing
    `overlap` -> questions per chunk from a generator -> filters -> (question, chunk, document) pairs

Generators:
  template  (default, no model) questions over the chunk's own key terms: the words ranked by tf-idf
            (count in the chunk x log(chunks / chunks containing the word)), put into question templates
            ("What is said about {a} and {b}?").
  llm       any local causal LM (default: the project's default model): a few-shot chat prompt asks for questions
            a reader would search with; the answer is parsed line by line, dropping preambles ("Sure, here
            are ..."), numbering and bullets, keeping the lines that end with "?".
Filters, counted in the report: not a question (no final "?" or under 3 words); a copy of the chunk (more than
half of its word 4-grams, or all of it for shorter questions, appear in the chunk); a duplicate of a kept
question (after lower-casing and dropping punctuation); the round trip: with the base encoder, the question's own
chunk must be in its top k among all chunks (k = round_trip_k; 0 skips it). The kept fraction is kept / generated.
The held-out split is by document (embed.data.split_by_document): no test document's chunks are trained on.
"""

from __future__ import annotations

import json
import math
import random
import re
from collections import Counter
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path

from tunesmith.embed.data import Pair
from tunesmith.errors import UserError

SUFFIXES = {".txt": "text", ".md": "markdown", ".markdown": "markdown", ".html": "html", ".htm": "html"}
STOPWORDS = set("""a about above after again against all also am an and any are as at be because been before being
below between both but by can could did do does doing down during each few for from further had has have having he
her here hers him his how i if in into is it its itself just me more most my no nor not now of off on once only or
other our out over own same she should so some such than that the their them then there these they this those
through to too under until up very was we were what when where which while who whom why will with would you your
yours one two may must shall might each every many much use used using get gets also""".split())
TEMPLATES = ["What is said about {a}?", "How does {a} relate to {b}?", "What should I know about {a} and {b}?",
             "Where does the text mention {a} together with {b}?", "What happens with {a} when {b} is involved?",
             "Why does {a} matter for {b}?"]
FEW_SHOT = [
    ("The cafeteria opens at 7:30 on weekdays. Breakfast is served until 10:00 and lunch from 11:30 to 14:00; "
     "badges are needed to pay.", ["When can I get breakfast in the cafeteria?", "How do I pay for lunch at work?"]),
    ("To reset a forgotten password, open the account portal, choose 'forgot password' and follow the link sent "
     "to your registered e-mail address. Links expire after one hour.",
     ["How do I reset my password if I forgot it?", "How long is a password reset link valid?"]),
]
SYSTEM = ("You write the questions people would type into a search box to find a passage. Write short, natural "
          "questions in your own words, one per line, each ending with a question mark. Do not copy sentences.")


@dataclass
class Chunk:
    doc_id: str
    text: str


@dataclass
class Stats:
    """How many questions each stage saw and dropped; kept / generated is the kept fraction."""

    documents: int = 0
    chunks: int = 0
    generated: int = 0
    dropped: dict[str, int] = field(default_factory=lambda: {"not_a_question": 0, "copy": 0, "duplicate": 0,
                                                             "round_trip": 0})
    kept: int = 0

    @property
    def kept_fraction(self) -> float:
        return self.kept / self.generated if self.generated else 0.0

    def to_dict(self) -> dict:
        return {"documents": self.documents, "chunks": self.chunks, "generated": self.generated,
                "dropped": dict(self.dropped), "kept": self.kept, "kept_fraction": round(self.kept_fraction, 4)}


class _TextOfHtml(HTMLParser):
    """The visible text of an HTML page: script and style dropped, block elements on their own lines."""

    BLOCKS = {"p", "div", "br", "li", "h1", "h2", "h3", "h4", "h5", "h6", "tr", "section", "article", "pre", "title"}

    def __init__(self):
        super().__init__()
        self.parts, self.skip = [], 0

    def handle_starttag(self, tag, attrs):
        self.skip += tag in ("script", "style")
        if tag in self.BLOCKS:
            self.parts.append("\n")

    def handle_endtag(self, tag):
        self.skip -= tag in ("script", "style") and self.skip > 0
        if tag in self.BLOCKS:
            self.parts.append("\n")

    def handle_data(self, data):
        if not self.skip:
            self.parts.append(data)


def html_to_text(html: str) -> str:
    parser = _TextOfHtml()
    parser.feed(html)
    parser.close()
    return re.sub(r"[ \t]+", " ", "".join(parser.parts)).strip()


def markdown_to_text(md: str) -> str:
    """Markdown with its markup removed: code fences, images, link targets, headings' #, emphasis, list marks."""
    md = re.sub(r"```.*?```", " ", md, flags=re.S)
    md = re.sub(r"!\[[^\]]*\]\([^)]*\)", " ", md)
    md = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", md)
    md = re.sub(r"^\s{0,3}(#{1,6}|[-*+]|\d+\.|>)\s+", "", md, flags=re.M)
    return re.sub(r"[*_`]+", "", md).strip()


def read_documents(folder: str | Path) -> list[tuple[str, str]]:
    """(document id = path relative to the folder, plain text) of every .txt, .md, .html file, sorted by path."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{folder}: not a folder of documents.")
    docs = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in SUFFIXES):
        try:
            raw = path.read_text(encoding="utf-8", errors="replace")
        except OSError as e:
            raise UserError(f"{path}: cannot be read ({e.strerror or e}).") from None
        kind = SUFFIXES[path.suffix.lower()]
        text = html_to_text(raw) if kind == "html" else markdown_to_text(raw) if kind == "markdown" else raw
        if text.strip():
            docs.append((path.relative_to(folder).as_posix(), text))
    if not docs:
        raise UserError(f"{folder} holds no non-empty document ({', '.join(SUFFIXES)}).")
    return docs


def chunk_words(text: str, size: int, overlap: int) -> list[str]:
    """Windows of `size` words starting every size - overlap words; the last window ends at the last word."""
    if not 0 <= overlap < size:
        raise UserError(f"The chunk overlap ({overlap}) must be at least 0 and less than the chunk size ({size}).")
    words = text.split()
    step = size - overlap
    starts = range(0, max(1, len(words) - overlap), step)
    return [" ".join(words[s:s + size]) for s in starts if words[s:s + size]]


def chunk_documents(docs: list[tuple[str, str]], size: int, overlap: int) -> list[Chunk]:
    return [Chunk(doc_id, text) for doc_id, body in docs for text in chunk_words(body, size, overlap)]


def _terms(text: str) -> list[str]:
    return [w for w in re.findall(r"[A-Za-z][A-Za-z'-]{2,}", text.lower()) if w not in STOPWORDS]


def template_questions(chunks: list[Chunk], per_chunk: int = 2, seed: int = 0) -> list[list[str]]:
    """Questions per chunk over its key terms (tf-idf ranked; module doc). No model."""
    rng = random.Random(seed)
    counts = [Counter(_terms(c.text)) for c in chunks]
    df = Counter(w for c in counts for w in c)
    out = []
    for count in counts:
        ranked = sorted(count, key=lambda w: (-count[w] * math.log((1 + len(chunks)) / df[w]), w))
        questions = []
        for t, template in enumerate(rng.sample(TEMPLATES, min(per_chunk, len(TEMPLATES)))):
            if len(ranked) < 2:
                break
            a, b = ranked[(2 * t) % len(ranked)], ranked[(2 * t + 1) % len(ranked)]
            questions.append(template.format(a=a, b=b))
        out.append(questions)
    return out


def llm_messages(chunk: str, per_chunk: int) -> list[dict]:
    """System prompt, the few-shot examples as earlier turns, then the chunk."""
    def ask(text, n):
        return {"role": "user", "content": f"Passage:\n{text}\n\nWrite {n} questions this passage answers."}
    messages = [{"role": "system", "content": SYSTEM}]
    for text, questions in FEW_SHOT:
        messages += [ask(text, len(questions)), {"role": "assistant", "content": "\n".join(questions)}]
    return messages + [ask(chunk, per_chunk)]


def parse_questions(answer: str) -> list[str]:
    """The question lines of a model's answer: preamble and sign-off lines (no final "?") dropped, numbering,
    bullets, "Q1:" marks and quotes stripped; a line holding several questions is split after each "?"."""
    mark = re.compile(r"^\s*(?:[-*\u2022]|\(?\d+[.):]|Q\d*[.:)]|Question\s*\d*[.:])\s*", flags=re.I)
    out = []
    for line in answer.splitlines():
        for part in re.findall(r"[^?]*\?", line):
            part = mark.sub("", part.strip()).strip().strip("\"'\u201c\u201d").strip()
            if part:
                out.append(part)
    return out


def llm_questions(chunks: list[Chunk], model, tokenizer, per_chunk: int = 2, max_new_tokens: int = 96,
                  batch_size: int = 8) -> list[list[str]]:
    """The model's raw question lines per chunk (parse_questions of its greedy answer), at most per_chunk + 2."""
    from tunesmith.evaluate.generate import generate, render_prompt

    prompts = [render_prompt(tokenizer, llm_messages(c.text, per_chunk)) for c in chunks]
    answers = generate(model, tokenizer, prompts, max_new_tokens, batch_size, progress=True, desc="questions")
    return [parse_questions(a)[:per_chunk + 2] for a in answers]


def _normal(text: str) -> str:
    return " ".join(re.findall(r"[a-z0-9]+", text.lower()))


def is_copy(question: str, chunk: str, n: int = 4) -> bool:
    """More than half of the question's word n-grams occur in the chunk (all of it, for shorter questions)."""
    q, c = _normal(question).split(), _normal(chunk).split()
    if len(q) < n:
        return f" {' '.join(q)} " in f" {' '.join(c)} "
    grams = {tuple(c[i:i + n]) for i in range(len(c) - n + 1)}
    mine = [tuple(q[i:i + n]) for i in range(len(q) - n + 1)]
    return sum(g in grams for g in mine) / len(mine) > 0.5


def filter_questions(chunks: list[Chunk], questions: list[list[str]], stats: Stats) -> list[tuple[int, str]]:
    """(chunk index, question) that pass the text filters (not a question, copy, duplicate), counted in stats."""
    kept, seen = [], set()
    for i, (chunk, found) in enumerate(zip(chunks, questions)):
        for q in found:
            stats.generated += 1
            if not q.endswith("?") or len(q.split()) < 3:
                stats.dropped["not_a_question"] += 1
            elif is_copy(q, chunk.text):
                stats.dropped["copy"] += 1
            elif _normal(q) in seen:
                stats.dropped["duplicate"] += 1
            else:
                seen.add(_normal(q))
                kept.append((i, q))
    return kept


def round_trip(encoder, chunks: list[Chunk], kept: list[tuple[int, str]], k: int, stats: Stats,
               batch_size: int = 64) -> list[tuple[int, str]]:
    """Those whose own chunk is among the encoder's top k chunks for the question (distinct chunk texts)."""
    from tunesmith.embed.metrics import top_k

    if k <= 0 or not kept:
        return kept
    texts = list(dict.fromkeys(c.text for c in chunks))
    column = {t: j for j, t in enumerate(texts)}
    c = encoder.encode(texts, batch_size)
    q = encoder.encode([question for _, question in kept], batch_size)
    best = top_k(q, c, k).tolist()
    passed = [item for item, row in zip(kept, best) if column[chunks[item[0]].text] in row]
    stats.dropped["round_trip"] += len(kept) - len(passed)
    return passed


def make_pairs(chunks: list[Chunk], questions: list[list[str]], stats: Stats, encoder=None,
               round_trip_k: int = 0) -> list[Pair]:
    kept = filter_questions(chunks, questions, stats)
    if encoder is not None:
        kept = round_trip(encoder, chunks, kept, round_trip_k, stats)
    stats.kept = len(kept)
    return [Pair(q, chunks[i].text, doc_id=chunks[i].doc_id) for i, q in kept]


def pairs_from_folder(folder: str | Path, size: int = 120, overlap: int = 20, per_chunk: int = 2,
                      seed: int = 0) -> list[Pair]:
    """Template pairs of a documents folder, without the round trip (embed train's data.train as a folder)."""
    docs = read_documents(folder)
    chunks = chunk_documents(docs, size, overlap)
    return make_pairs(chunks, template_questions(chunks, per_chunk, seed), Stats(len(docs), len(chunks)))


def write_pairs(path: Path, pairs: list[Pair]) -> None:
    from tunesmith.files import atomic_write_text

    atomic_write_text(path, "".join(json.dumps({"query": p.query, "positive": p.positive, "doc_id": p.doc_id})
                                    + "\n" for p in pairs))
