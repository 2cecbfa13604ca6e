"""How long `tunesmith embed eval` takes on a retrieval set of the size issue 15 names: 1,000 queries against
10,000 passages, the built-in all-MiniLM-L6-v2 on the CPU.

    .venv/bin/python bench/embed_eval.py [--queries 1000] [--passages 10000] [--resamples 1000] [--json out.json]

The set is generated (seeded, nothing downloaded): passages are sentences of the embed demo's vocabulary and
jargon with a random code and number each, so no two are equal; each query paraphrases one passage's action and
thing in plain words and that passage is its only relevant document. It is written as a BEIR folder and scored by
the same function as `tunesmith embed eval` (tunesmith/commands/embed.py: evaluate), timed in phases: loading the
encoder, encoding the corpus, encoding the queries, and the metrics (one matrix product in blocks, top 100, then
hit rate, precision, recall, MRR, NDCG, MAP) with their bootstrap intervals. Run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path


def retrieval_set(n_queries: int, n_passages: int, seed: int = 0):
    """(queries, corpus, qrels): n_passages distinct passages, n_queries questions each about one of them."""
    from tunesmith.embed.demo import ACTIONS, PASSAGES, QUESTIONS, SITUATIONS, THINGS, vocabulary

    rng, words = random.Random(seed), vocabulary(seed)
    corpus, about = {}, {}
    for i in range(n_passages):
        action, thing, situation = rng.choice(ACTIONS), rng.choice(THINGS), rng.choice(SITUATIONS)
        corpus[f"p{i}"] = rng.choice(PASSAGES).format(
            action=words[action[0]], Action=words[action[0]].capitalize(), thing=words[thing[0]],
            situation=words[situation[0]], form=words["form"], desk=words["desk"], team=words["team"],
            code=f"{rng.choice('KMRTZ')}{rng.randint(100, 999)}", days=rng.randint(2, 99))
        about[f"p{i}"] = (action, thing, situation)
    queries, qrels = {}, {}
    for q, pid in enumerate(rng.sample(sorted(corpus), n_queries)):
        action, thing, situation = about[pid]
        queries[f"q{q}"] = rng.choice(QUESTIONS).format(action=rng.choice(action), thing=rng.choice(thing),
                                                        situation=rng.choice(situation))
        qrels[f"q{q}"] = {pid}
    return queries, corpus, qrels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--passages", type=int, default=10000)
    parser.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples (embed eval's default)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--json", type=Path, help="also write the timings here")
    args = parser.parse_args()

    import torch

    from tunesmith.commands.embed import EmbedEvalConfig, evaluate
    from tunesmith.embed.beir import write_beir
    from tunesmith.embed.encoder import load_encoder
    from tunesmith.embed.evaluate import load_retrieval_set
    from tunesmith.embed.metrics import retrieval_metrics, summarize

    queries, corpus, qrels = retrieval_set(args.queries, args.passages)
    with tempfile.TemporaryDirectory() as tmp:
        folder = write_beir(Path(tmp) / "beir", queries, corpus, qrels)
        options = EmbedEvalConfig(batch_size=args.batch_size, resamples=args.resamples)
        start = time.perf_counter()
        columns = evaluate(str(folder), options)  # what `tunesmith embed eval FOLDER` runs, end to end
        whole = time.perf_counter() - start

        # The same work again, phase by phase (the encoder loaded from its cache as above).
        times, t = {}, time.perf_counter()
        queries, corpus, qrels = load_retrieval_set(folder)
        encoder = load_encoder(options.model, options.device)
        times["load set and encoder"] = time.perf_counter() - t
        judged = [q for q in queries if qrels.get(q)]
        t = time.perf_counter()
        corpus_emb = encoder.encode(list(corpus.values()), args.batch_size)
        times[f"encode {len(corpus):,} passages"] = time.perf_counter() - t
        t = time.perf_counter()
        query_emb = encoder.encode([queries[q] for q in judged], args.batch_size)
        times[f"encode {len(judged):,} queries"] = time.perf_counter() - t
        t = time.perf_counter()
        values = retrieval_metrics(query_emb, corpus_emb, list(corpus), [qrels[q] for q in judged])
        times["metrics (one matrix product, top 100)"] = time.perf_counter() - t
        t = time.perf_counter()
        summarize(values, args.resamples, 0)
        times[f"bootstrap intervals ({args.resamples} resamples)"] = time.perf_counter() - t

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"embed eval, {len(judged):,} queries x {len(corpus):,} passages, end to end: {whole:.1f} s "
          "(target: at most 60 s)")
    for name, seconds in times.items():
        print(f"  {name:<45} {seconds:7.2f} s")
    column = next(iter(columns.values()))
    print(f"  (MRR@10 of the base model on this set: {column['mrr@10']['value']:.3f})")
    if args.json:
        args.json.write_text(json.dumps({"end_to_end_s": whole, "phases_s": times,
                                         "queries": len(judged), "passages": len(corpus)}, indent=2) + "\n")


if __name__ == "__main__":
    main()
