"""A seeded retrieval corpus with a vocabulary gap: documents in an in-house jargon, questions in plain words.

A fictional company's handbook. Each document covers one thing (a badge, a laptop, an invoice) in one situation
(abroad, after hours, for a contractor), and each of its chunks one action (renew, cancel, report). The handbook
names all of these in the company's own invented words ("to vorkel a tazimo, submit a ..."), while people ask
in plain words ("how do I renew my badge when I am abroad?"). Every plain word has one jargon word, the same in
every document, so the mapping can be learned from the training documents and used on held-out ones: a general
encoder has nothing to match a question to its chunk but sentence shape, which every chunk shares, and a model
fine-tuned on the training documents learns the words. The generator draws the jargon, the combinations and the
question phrasings from one seed; nothing is downloaded.
"""

from __future__ import annotations

import random
from pathlib import Path

from tunesmith.embed.data import Pair

# plain word(s) -> synonyms used in questions (the first is the canonical name)
ACTIONS = [["renew", "extend"], ["cancel", "stop"], ["report", "flag"], ["order", "request"], ["return", "hand back"],
           ["replace", "swap"], ["transfer", "move"], ["approve", "sign off"], ["update", "change"],
           ["lose", "misplace"]]
THINGS = [["badge", "id card"], ["laptop", "work computer"], ["parking permit", "parking pass"],
          ["travel expense", "trip cost"], ["meeting room", "conference room"], ["vacation day", "day off"],
          ["printer", "copier"], ["invoice", "bill"], ["phone", "mobile"], ["desk", "workspace"],
          ["visitor pass", "guest pass"], ["salary slip", "payslip"], ["training course", "workshop"],
          ["server", "machine in the data center"], ["contract", "agreement"], ["password", "login"]]
SITUATIONS = [["abroad", "when I am abroad"], ["after hours", "outside office hours"],
              ["for a contractor", "for an external contractor"], ["in an emergency", "urgently"],
              ["for the whole team", "for my team"], ["on my first day", "as a new hire"],
              ["at the north office", "in the north building"], ["before the deadline", "before the cutoff"]]
QUESTIONS = ["how do I {action} my {thing} {situation}?", "what is the way to {action} a {thing} {situation}?",
             "{situation}, how can I {action} the {thing}?", "I need to {action} my {thing} {situation}. what do I do?",
             "steps to {action} a {thing} {situation}", "who helps me {action} my {thing} {situation}?"]
PASSAGES = ["To {action} a {thing} {situation}, file a {form} at the {desk} and quote the {code} code; the {team} "
            "confirms within {days} days.",
            "{Action} of the {thing} {situation}: the {team} handles it once a {form} reaches the {desk} "
            "(code {code}, {days} days).",
            "If you must {action} your {thing} {situation}, send the {form} to the {desk}; expect the {team} to "
            "answer in {days} days, code {code}."]
FILLER = ("form", "desk", "team")  # jargon shared by every chunk: words to match that say nothing


def jargon_words(count: int, rng: random.Random) -> list[str]:
    """`count` distinct invented words of 2-3 consonant-vowel syllables (plus a final consonant)."""
    words: set[str] = set()
    out = []
    while len(out) < count:
        word = "".join(rng.choice("bdfgklmnprstvz") + rng.choice("aeiou") for _ in range(rng.randint(2, 3)))
        word += rng.choice("klmnrs")
        if word not in words:
            words.add(word)
            out.append(word)
    return out


def vocabulary(seed: int = 0) -> dict[str, str]:
    """Plain name -> jargon word, for every action, thing and situation and the filler words."""
    names = [a[0] for a in ACTIONS] + [t[0] for t in THINGS] + [s[0] for s in SITUATIONS] + list(FILLER)
    return dict(zip(names, jargon_words(len(names), random.Random(f"jargon-{seed}"))))


def demo_corpus(seed: int = 0, actions_per_document: int = 4, questions_per_chunk: int = 2
                ) -> tuple[list[Pair], dict[str, str], dict[str, str]]:
    """(pairs, corpus {chunk id: text}, {chunk id: doc id}). One document per (thing, situation): 128 documents of
    `actions_per_document` chunks, each chunk asked about in `questions_per_chunk` plain-word questions."""
    rng = random.Random(seed)
    words = vocabulary(seed)
    pairs, corpus, document_of = [], {}, {}
    for t, thing in enumerate(THINGS):
        for s, situation in enumerate(SITUATIONS):
            doc_id = f"doc-{t:02d}-{s}"
            for a in rng.sample(range(len(ACTIONS)), actions_per_document):
                action = ACTIONS[a]
                chunk = rng.choice(PASSAGES).format(
                    action=words[action[0]], Action=words[action[0]].capitalize(), thing=words[thing[0]],
                    situation=words[situation[0]], form=words["form"], desk=words["desk"], team=words["team"],
                    code=f"{rng.choice('KMRTZ')}{rng.randint(10, 99)}", days=rng.randint(2, 9))
                chunk_id = f"{doc_id}-{a}"
                corpus[chunk_id] = chunk
                document_of[chunk_id] = doc_id
                for template in rng.sample(QUESTIONS, questions_per_chunk):
                    question = template.format(action=rng.choice(action), thing=rng.choice(thing),
                                               situation=rng.choice(situation))
                    pairs.append(Pair(question[0].upper() + question[1:], chunk, doc_id=doc_id))
    return pairs, corpus, document_of


def write_embed_demo(out: str | Path, seed: int = 0, test_fraction: float = 0.2) -> dict[str, Path]:
    """train.jsonl and test.jsonl (pairs with doc_id, split by document) and beir/ (the whole corpus, the test
    questions and their judgements) under `out`; returns their paths."""
    import json

    from tunesmith.embed.beir import write_beir
    from tunesmith.embed.data import split_by_document

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    pairs, corpus, _ = demo_corpus(seed)
    train, test = split_by_document(pairs, test_fraction, seed)
    paths = {}
    for name, rows in (("train", train), ("test", test)):
        paths[name] = out / f"{name}.jsonl"
        paths[name].write_text("".join(json.dumps({"query": p.query, "positive": p.positive, "doc_id": p.doc_id})
                                       + "\n" for p in rows), encoding="utf-8")
    chunk_of = {text: cid for cid, text in corpus.items()}
    queries = {f"q{i}": p.query for i, p in enumerate(test)}
    qrels = {f"q{i}": {chunk_of[p.positive]} for i, p in enumerate(test)}
    paths["beir"] = write_beir(out / "beir", queries, corpus, qrels)
    return paths
