"""Serving throughput of mixed-adapter continuous batching (tunesmith/serve/batching.py, mixed.py), one process.

    .venv-test/bin/python bench/serve.py                      # the default model, 16 random LoRA adapters
    .venv-test/bin/python bench/serve.py --tiny               # a tiny random Llama: runs in seconds (a smoke run)
    .venv-test/bin/python bench/serve.py --json out.json      # the results as JSON too

Every strategy serves the same requests: fixed prompt length (random token ids, seed 0) and fixed output length
(greedy, end-of-sequence ignored so every request makes exactly --output-len tokens); tokens/s is generated
tokens over wall time, the median of --repeats runs. Strategies:

    base            every request on the base model, one batch
    mixed-N         the requests spread round-robin over N adapters, one mixed batch (N = 1, 4, 16)
    per-adapter-N   one batch per adapter in turn (the requests of adapter 1, then of adapter 2, ...)
    peft-N          PEFT's mixed batch: PeftModel with N adapters, generate(..., adapter_names=[...]) (peft needed)
    poisson         --poisson-requests arriving at --rate per second (exponential gaps, seed 1), over 16 adapters,
                    served by continuous batching and by static batching (a new batch only when the last one is
                    done); throughput and time to first token p50/p95. Each load of --loads: output lengths
                    fixed (--output-len), mixed (uniform from a quarter to four times it) or tailed (exponential,
                    with mixed's mean, capped at 16 times --output-len: a few long answers among many short ones,
                    as chat traffic has)

    .venv-test/bin/python bench/serve.py --poisson-only --loads tailed      # one Poisson load alone

Adapters are LoRA r 16 on every linear layer with random nonzero B (the adapters' values do not change the cost).
Targets the issue sets (docs/serving.md): mixed-4/16 >= 0.8x base; >= 2x per-adapter-4 and >= 4x per-adapter-16;
>= 1.3x peft-16; mixed-16 >= 0.8x mixed-1; poisson continuous >= 1.5x static.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from tunesmith.serve.compute import ComputeThread

ROOT = Path(__file__).resolve().parents[1]


def load_base(args):
    """(model, tokenizer, folder): the default model, or a tiny random Llama saved in a temporary folder."""
    from tunesmith.config import DEFAULT_MODEL, ModelConfig
    from tunesmith.models.loading import load_model_and_tokenizer

    name = args.model or DEFAULT_MODEL
    if args.tiny:
        sys.path.insert(0, str(ROOT / "tests"))
        from conftest import build_tiny_model, build_tiny_tokenizer

        name = str(Path(args.work) / "tiny")
        model = build_tiny_model(layers=4)
        model.config.max_position_embeddings = 1024
        model.save_pretrained(name)
        build_tiny_tokenizer().save_pretrained(name)
    model, tok = load_model_and_tokenizer(ModelConfig(name_or_path=name))
    return model.requires_grad_(False).eval(), tok, name


def make_adapters(model_folder: str, n: int, work: Path) -> list[Path]:
    """n LoRA adapters (r 16, every linear layer, B random nonzero), saved in PEFT's format."""
    from tunesmith.config import MethodConfig, ModelConfig
    from tunesmith.methods.inject import trainable_parameters
    from tunesmith.methods.registry import get_method
    from tunesmith.models.loading import load_model_and_tokenizer

    cfg = MethodConfig(name="lora", r=16, alpha=32, dropout=0.0, target_modules="all-linear")
    model, _ = load_model_and_tokenizer(ModelConfig(name_or_path=model_folder))
    get_method("lora").apply(model, cfg)
    folders = []
    for i in range(n):
        torch.manual_seed(100 + i)
        with torch.no_grad():
            for p in trainable_parameters(model):
                p.normal_(0.0, 0.02)
        folders.append(work / f"adapter{i}")
        get_method("lora").save(model, folders[-1], cfg, model_folder)
    return folders


def build_engine(compute, model, tok, folders, batch: int, static: bool = False):
    """A started BatchingEngine over the adapters, built on (and running on) the compute thread."""
    from tunesmith.serve.adapters import AdapterRegistry
    from tunesmith.serve.batching import BatchingEngine

    def build():
        registry = AdapterRegistry(model, "base", max_loaded=len(folders) + 1)
        for i, folder in enumerate(folders):
            registry.load(f"a{i}", str(folder))
        return BatchingEngine(model, tok, registry, max_queue=10_000, max_batch_size=batch, static=static,
                              compute=compute)

    engine = compute.call(build)
    engine.eos_ids = set()  # fixed output lengths
    engine.start()
    return engine


def close_engine(engine) -> None:
    engine.close()
    engine.call(engine.mixer.remove)  # the plain base again, for the next registry


def requests(args, adapters: list[str | None], n: int):
    from tunesmith.serve.engine import GenRequest

    g = torch.Generator().manual_seed(0)
    vocab = args.vocab
    return [GenRequest(torch.randint(3, vocab, (args.prompt_len,), generator=g).tolist(), adapters[i % len(adapters)],
                       args.output_len) for i in range(n)]


async def _serve(engine, reqs, gaps=None) -> tuple[float, list[float], int]:
    """(wall seconds, time to first token of each request, tokens made); requests arrive after `gaps` seconds."""
    from tunesmith.serve.engine import Finish

    start = time.perf_counter()

    async def one(req, delay):
        await asyncio.sleep(delay)
        t0 = time.perf_counter()
        stream, first, tokens = engine.submit(req), None, 0
        async for item in stream:
            if first is None:
                first = time.perf_counter() - t0
            if isinstance(item, Finish):
                tokens = item.completion_tokens
        return first, tokens

    delays = [0.0] * len(reqs) if gaps is None else list(torch.tensor(gaps).cumsum(0).tolist())
    results = await asyncio.gather(*(one(r, d) for r, d in zip(reqs, delays)))
    return time.perf_counter() - start, [f for f, _ in results], sum(t for _, t in results)


def serve(engine, reqs, gaps=None):
    return asyncio.run(_serve(engine, reqs, gaps))


def peft_tokens_per_s(args, model_name: str, folders: list[Path], reqs) -> float:
    """PEFT's mixed batch: one generate over every request with adapter_names (greedy, fixed length)."""
    from peft import PeftModel

    from tunesmith.config import ModelConfig
    from tunesmith.models.loading import load_model_and_tokenizer

    base, _ = load_model_and_tokenizer(ModelConfig(name_or_path=model_name))
    model = PeftModel.from_pretrained(base, str(folders[0]), adapter_name="a0")
    for i, folder in enumerate(folders[1:], start=1):
        model.load_adapter(str(folder), adapter_name=f"a{i}")
    model.eval()
    ids = torch.tensor([r.prompt_ids for r in reqs])
    names = [r.adapter for r in reqs]
    kw = dict(max_new_tokens=args.output_len, min_new_tokens=args.output_len, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        model.generate(input_ids=ids[:2], attention_mask=torch.ones_like(ids[:2]), adapter_names=names[:2],
                       **{**kw, "max_new_tokens": 2, "min_new_tokens": 2})  # warm-up
        start = time.perf_counter()
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), adapter_names=names, **kw)
    return (out.shape[1] - ids.shape[1]) * len(reqs) / (time.perf_counter() - start)


def percentile(values: list[float], q: float) -> float:
    return float(torch.tensor(values).quantile(q))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="a tiny random Llama instead of the default model")
    parser.add_argument("--model", help="base model (default: the built-in default model)")
    parser.add_argument("--requests", type=int, default=32, help="requests per strategy (default 32)")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--poisson-requests", type=int, default=48)
    parser.add_argument("--rate", type=float, default=4.0, help="Poisson arrivals per second (default 4)")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each strategy and Poisson load; the "
                        "median is reported (default 3)")
    parser.add_argument("--no-peft", action="store_true", help="leave out PEFT's adapter_names batches")
    parser.add_argument("--poisson-only", action="store_true", help="only the Poisson loads (no strategies, no PEFT)")
    parser.add_argument("--loads", default="fixed,mixed,tailed",
                        help="Poisson loads by output lengths, comma-separated: fixed, mixed, tailed (default all)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    args.loads = [x.strip() for x in args.loads.split(",") if x.strip()]
    if not args.loads or set(args.loads) - set(LOADS):
        parser.error(f"--loads {','.join(args.loads)}: choose from {', '.join(LOADS)}")
    if args.tiny:
        args.requests, args.prompt_len, args.output_len = min(args.requests, 16), 16, 8
        args.poisson_requests, args.rate = min(args.poisson_requests, 16), 200.0
    torch.manual_seed(0)
    # every tensor operation on one thread, as tunesmith serve does (tunesmith/serve/compute.py says why)
    compute = ComputeThread()
    with tempfile.TemporaryDirectory(prefix="tunesmith-bench-serve-") as work:
        args.work = work
        model, tok, name = compute.call(load_base, args)
        args.vocab = min(len(tok), model.config.vocab_size)
        folders = compute.call(make_adapters, name, 16, Path(work))
        results = run(args, compute, model, tok, name, folders)
    compute.close()
    print(table(results, args))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


def run(args, compute, model, tok, name, folders) -> dict:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    compute.call(model.to, device)
    results: dict = {"device": device, "requests": args.requests, "prompt_len": args.prompt_len,
                     "output_len": args.output_len}
    if args.poisson_only:
        results["poisson"] = poisson(args, compute, model, tok, folders)
        return results
    engine = build_engine(compute, model, tok, folders, batch=args.requests)
    try:
        serve(engine, requests(args, [None], 2))  # warm-up
        runs: dict[str, list[float]] = {}
        for _ in range(args.repeats):  # the strategies in turn, each repeat, so that a slow spell hits them all
            for label, adapters in (("base", [None]), ("mixed-1", ["a0"]), ("mixed-4", [f"a{i}" for i in range(4)]),
                                    ("mixed-16", [f"a{i}" for i in range(16)])):
                wall, _, tokens = serve(engine, requests(args, adapters, args.requests))
                runs.setdefault(label, []).append(tokens / wall)
            for n in (4, 16):
                reqs = requests(args, [f"a{i}" for i in range(n)], args.requests)
                wall, tokens = 0.0, 0
                for i in range(n):  # one batch per adapter, in turn
                    w, _, t = serve(engine, [r for r in reqs if r.adapter == f"a{i}"])
                    wall, tokens = wall + w, tokens + t
                runs.setdefault(f"per-adapter-{n}", []).append(tokens / wall)
        results.update({label: percentile(values, 0.5) for label, values in runs.items()})
        results["runs"] = runs
    finally:
        close_engine(engine)
    results["poisson"] = poisson(args, compute, model, tok, folders)
    if not args.no_peft:
        compute.call(model.cpu)
        try:
            for n in (4, 16):
                reqs = requests(args, [f"a{i}" for i in range(n)], args.requests)
                runs = [compute.call(peft_tokens_per_s, args, name, folders[:n], reqs) for _ in range(args.repeats)]
                results[f"peft-{n}"], results["runs"][f"peft-{n}"] = percentile(runs, 0.5), runs
        except ImportError:
            print("peft is not installed: its rows are left out", file=sys.stderr)
    return results


LOADS = ("fixed", "mixed", "tailed")


def output_lengths(args) -> dict[str, list[int]]:
    """Each load's output lengths (seed 0): fixed --output-len; mixed uniform in [--output-len / 4, 4 x
    --output-len]; tailed 1 + an exponential draw with mixed's mean, at most 16 x --output-len."""
    n, low, high = args.poisson_requests, max(1, args.output_len // 4), 4 * args.output_len
    mean = (low + high) / 2
    tailed = torch.empty(n).exponential_(1 / (mean - 1), generator=torch.Generator().manual_seed(0))
    return {"fixed": [args.output_len] * n,
            "mixed": torch.randint(low, high + 1, (n,), generator=torch.Generator().manual_seed(0)).tolist(),
            "tailed": (1 + tailed.round().long()).clamp(max=16 * args.output_len).tolist()}


def poisson(args, compute, model, tok, folders) -> dict:
    """Continuous against static batching under the same Poisson arrivals over 16 adapters, once per load of
    --loads (output_lengths; the same requests for both schedulers), as requests of real traffic differ."""
    # arrival gaps from their own generator (seed 1: not the tailed lengths' draws), so the arrivals are the same
    # whichever strategies ran before
    gaps = torch.empty(args.poisson_requests).exponential_(args.rate, generator=torch.Generator().manual_seed(1))
    gaps = gaps.tolist()
    lengths = {load: lens for load, lens in output_lengths(args).items() if load in args.loads}
    out = {}
    for load, lens in lengths.items():
        reqs = requests(args, [f"a{i}" for i in range(16)], args.poisson_requests)
        for req, n in zip(reqs, lens):
            req.max_tokens = n
        runs: dict[str, list[dict]] = {}
        for _ in range(args.repeats):
            for label, static in (("continuous", False), ("static", True)):
                # a fresh registry per run: the model's adapters are laid over again (mixed.py)
                engine = build_engine(compute, model, tok, folders, batch=args.requests, static=static)
                try:
                    wall, ttft, tokens = serve(engine, reqs, gaps)
                finally:
                    close_engine(engine)
                runs.setdefault(label, []).append({"tokens_per_s": tokens / wall, "ttft_p50": percentile(ttft, 0.5),
                                                   "ttft_p95": percentile(ttft, 0.95), "tokens": tokens})
        for label, results in runs.items():  # the run of median throughput
            results.sort(key=lambda r: r["tokens_per_s"])
            out[f"{load}-{label}"] = {**results[len(results) // 2], "runs": [r["tokens_per_s"] for r in results]}
    out["lengths"] = {load: [min(lens), max(lens), sum(lens) / len(lens)] for load, lens in lengths.items()}
    return out


def table(r: dict, args) -> str:
    rows = [f"device {r['device']}; {r['requests']} requests, prompt {r['prompt_len']} tokens, output "
            f"{r['output_len']} tokens, greedy", ""]
    if "base" in r:
        base = r["base"]
        rows += ["| strategy | tokens/s | vs base |", "|---|---|---|"]
        for key in ("base", "mixed-1", "mixed-4", "mixed-16", "per-adapter-4", "per-adapter-16", "peft-4", "peft-16"):
            if key in r:
                rows.append(f"| {key} | {r[key]:.1f} | {r[key] / base:.2f}x |")
        ratios = [("mixed-4 / per-adapter-4", "mixed-4", "per-adapter-4"), ("mixed-16 / per-adapter-16", "mixed-16",
                  "per-adapter-16"), ("mixed-16 / peft-16", "mixed-16", "peft-16"), ("mixed-16 / mixed-1", "mixed-16",
                  "mixed-1")]
        rows += [""] + [f"{label}: {r[a] / r[b]:.2f}x" for label, a, b in ratios if a in r and b in r] + [""]
    p = r["poisson"]
    rows += [f"Poisson load, {args.poisson_requests} requests at {args.rate}/s over 16 adapters:", "",
             "| output lengths (min-max, mean) | batching | tokens/s | TTFT p50 (s) | TTFT p95 (s) | runs |",
             "|---|---|---|---|---|---|"]
    for load, (low, high, mean) in p["lengths"].items():
        rows += [f"| {load} ({low}-{high}, {mean:.0f}) | {b} | {p[f'{load}-{b}']['tokens_per_s']:.1f} | "
                 f"{p[f'{load}-{b}']['ttft_p50']:.3f} | {p[f'{load}-{b}']['ttft_p95']:.3f} | "
                 f"{', '.join(f'{x:.1f}' for x in p[f'{load}-{b}']['runs'])} |" for b in ("continuous", "static")]
    rows += [f"continuous / static, {load} lengths: "
             f"{p[f'{load}-continuous']['tokens_per_s'] / p[f'{load}-static']['tokens_per_s']:.2f}x"
             for load in p["lengths"]]
    return "\n".join(rows)


if __name__ == "__main__":
    main()
