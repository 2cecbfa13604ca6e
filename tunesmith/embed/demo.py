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
# The demo's LoRA recipe, as overrides of configs/embed_demo.yaml (docs/embeddings.md has its numbers): r 16 on every
# linear layer and on the word embeddings, whose rows for the jargon's sub-word pieces full fine-tuning also moves.
LORA_OVERRIDES = ("method.name=lora", "method.r=16", "method.target_modules=[query,key,value,dense,word_embeddings]",
                  "train.lr=1e-3")


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


CHART_METRICS = ("accuracy@1", "accuracy@5", "accuracy@10", "mrr@10", "ndcg@10")


def before_after_chart(scores: dict, path: str | Path, title: str) -> Path:
    """Bars of the test metrics before and after training, with their 95% intervals (matplotlib; SVG or PNG by
    the suffix). `scores`: one dimension's {"before", "after": {metric: {"value", "ci"}}}."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    fig, ax = plt.subplots(figsize=(7, 3.6))
    width = 0.38
    for i, label in enumerate(("before", "after")):
        values = [scores[label][m]["value"] for m in CHART_METRICS]
        ci = [scores[label][m].get("ci") or [v, v] for m, v in zip(CHART_METRICS, values)]
        err = [[v - c[0] for v, c in zip(values, ci)], [c[1] - v for v, c in zip(values, ci)]]
        xs = [x + (i - 0.5) * width for x in range(len(CHART_METRICS))]
        bars = ax.bar(xs, values, width, yerr=err, capsize=3, label=label, color=("#b0b0b0", "#2f6db5")[i])
        ax.bar_label(bars, labels=[f"{v:.2f}" for v in values], fontsize=8, padding=2)
    ax.set_xticks(range(len(CHART_METRICS)), [m.replace("accuracy", "hit rate") for m in CHART_METRICS])
    ax.set_ylim(0, 1.12)
    ax.set_title(title, fontsize=10)
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, metadata={"Date": None} if path.suffix == ".svg" else None)
    plt.close(fig)
    return path


def run_demo(out: Path, config: Path, overrides: list[str]) -> dict:
    """`tunesmith embed demo`: the corpus in out/data, embed train with the demo config (test = the held-out
    questions against the whole corpus), the chart in out/before_after.svg. Returns the run's summary."""
    from tunesmith.embed.config import load_embed_config
    from tunesmith.embed.train import MAIN, train_embedder

    paths = write_embed_demo(out / "data")
    cfg = load_embed_config(config, [f"data.train={paths['train']}", f"data.test={paths['beir']}",
                                     f"output.dir={out}", *overrides])
    summary = train_embedder(cfg)
    scores = (summary.get("evaluation") or {}).get(MAIN, {})
    if "before" in scores:
        before_after_chart(scores, out / "before_after.svg",
                           f"{cfg.model.name_or_path}, {summary['method']}, {summary['steps']} steps: "
                           f"{summary['data']['test']['queries']} held-out questions")
    return summary
