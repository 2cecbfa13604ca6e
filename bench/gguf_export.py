"""GGUF export fidelity: how far each type moves the default model, read back by transformers' GGUF loader.

    .venv/bin/python bench/gguf_export.py [--rows 32] [--prompts 8]

The default model (SmolLM2-135M-Instruct, fp32) is exported by tunesmith.export.gguf in each type and
loaded back with AutoModelForCausalLM.from_pretrained(gguf_file=...), which dequantizes to fp32. On
held-out text (demo-task conversations from a seed no split uses, answer included, rendered with the
chat template) it reports, per token position and averaged over all of them (tunesmith/export/fidelity.py):

    KL(p_source || p_export) = sum_v p_source(v) (log p_source(v) - log p_export(v))   in nats
    top-1 agreement          = share of positions where both models' most likely token is the same

and, on `--prompts` demo prompts, how many greedy answers (48 new tokens) equal the source's. Sizes are
the files' bytes. tests/test_export_gguf.py holds the slow test with the bounds these numbers support.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch


def greedy_answers(model, tokenizer, n: int) -> list[str]:
    from tunesmith.data.demo import demo_rows
    from tunesmith.evaluate.generate import generate, render_prompt

    prompts = [render_prompt(tokenizer, row["messages"][:-1]) for row in demo_rows(n, seed=4343)]
    return generate(model, tokenizer, prompts, max_new_tokens=48, batch_size=n)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--types", default="f32,f16,q8_0,q4_0")
    args = parser.parse_args()

    from transformers import AutoModelForCausalLM

    from tunesmith.config import ModelConfig
    from tunesmith.export.fidelity import compare, held_out_texts, log_probs
    from tunesmith.export.gguf import export_gguf
    from tunesmith.models.loading import load_model_and_tokenizer

    source, tokenizer = load_model_and_tokenizer(ModelConfig())
    source.eval()
    texts = held_out_texts(tokenizer, args.rows)
    reference_probs = log_probs(source, tokenizer, texts)
    reference = greedy_answers(source, tokenizer, args.prompts)
    print(f"{args.rows} held-out conversations, {args.prompts} greedy prompts\n")
    print("| type | file MiB | KL per token (nats) | top-1 agreement | greedy answers equal |")
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for kind in args.types.split(","):
            path = export_gguf(source, tokenizer, Path(tmp) / f"model-{kind}.gguf", kind)
            exported = AutoModelForCausalLM.from_pretrained(tmp, gguf_file=path.name, dtype=torch.float32).eval()
            f = compare(reference_probs, log_probs(exported, tokenizer, texts))
            same = sum(a == b for a, b in zip(greedy_answers(exported, tokenizer, args.prompts), reference))
            print(f"| {kind} | {path.stat().st_size / 2**20:.1f} | {f['kl']:.2e} | {100 * f['top1']:.2f}% | "
                  f"{same}/{args.prompts} |", flush=True)
            path.unlink()


if __name__ == "__main__":
    main()
