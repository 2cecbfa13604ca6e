"""A QLoRA adapter merged into a dequantized base vs applied over the NF4 base: how far apart are the logits?

    .venv/bin/python bench/qlora_merge.py --adapter runs/qlora/adapter [--rows 8]

Loads the base quantized as in the adapter's run (model.quantization in the run's config.yaml),
applies the adapter, and computes logits on the first `--rows` test prompts of the run's data
(teacher-forced on prompt + reference answer). Then it runs `tunesmith merge` twice, into the
dequantized base (the default for a QLoRA run) and into the float base (`--quantization none`),
loads each merged folder with transformers and compares logits and greedy next-token choices.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapter", required=True)
    parser.add_argument("--rows", type=int, default=8)
    args = parser.parse_args()

    import torch
    from transformers import AutoModelForCausalLM

    from tunesmith.commands.artifacts import merge
    from tunesmith.config import load_config
    from tunesmith.evaluate.generate import render_prompt
    from tunesmith.evaluate.task import test_cases
    from tunesmith.methods.registry import load_artifact
    from tunesmith.models.loading import load_model_and_tokenizer

    adapter = Path(args.adapter)
    cfg = load_config(adapter.parent / "config.yaml")
    model, tokenizer = load_model_and_tokenizer(cfg.model, torch.device("cpu"))
    load_artifact(model, adapter)
    texts = [render_prompt(tokenizer, messages) + reference
             for messages, reference in test_cases(cfg.data)[: args.rows]]
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    mask = batch["attention_mask"].bool()

    def logits(m) -> torch.Tensor:
        m.eval()
        with torch.no_grad():
            return m(**batch).logits[mask].float()  # (real tokens, vocab)

    adapted = logits(model)
    del model
    print(f"{cfg.model.quantization} base + adapter, {int(mask.sum())} tokens of {args.rows} test rows; "
          f"logit scale: max |logit| {adapted.abs().max():.1f}\n")
    print("| merged into | max abs logit diff | mean abs logit diff | same argmax |")
    print("|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for label, quantization in (("dequantized NF4 base (default)", "auto"), ("float base", "none")):
            out = Path(tmp) / quantization
            merge(str(adapter), str(out), None, quantization)
            merged = logits(AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32))
            diff = (merged - adapted).abs()
            same = (merged.argmax(-1) == adapted.argmax(-1)).float().mean() * 100
            print(f"| {label} | {diff.max():.2e} | {diff.mean():.2e} | {same:.1f}% |")


if __name__ == "__main__":
    main()
