"""tunesmith embed train against sentence-transformers' trainer with MultipleNegativesRankingLoss, one run each.

    .venv-test/bin/python bench/embed.py [--steps 60] [--batch 32] [--lr 1e-4] [--method full] [--out runs/bench-embed]

Both fine-tune the same base encoder (the built-in all-MiniLM-L6-v2, or --model) on the same training pairs of
the demo corpus (tunesmith/embed/demo.py, seed 0) with the same batch size, steps, peak learning rate, warmup,
cosine decay, AdamW and gradient clipping at 1, and are scored by the same code (tunesmith's metrics: equal to
InformationRetrievalEvaluator) on the held-out questions against the whole corpus. tunesmith runs as `embed
train` does, without a validation split (so both train on every pair and end at the last step) and, unless
--mask-same-document, without its same-document masking: the same loss as MNRL. sentence-transformers runs SentenceTransformerTrainer with its default shuffled batch sampler.
Reported: the training wall time of each (the trainer's own train() call; tunesmith's loop), their ratio, and
MRR@10 / NDCG@10 / hit rate@5 of both. sentence-transformers and datasets come with the `test` extra.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def run_tunesmith(args, paths, out: Path) -> tuple[float, dict]:
    from tunesmith.embed.config import load_embed_config
    from tunesmith.embed.train import train_embedder

    cfg = load_embed_config(None, [
        f"model.name_or_path={args.model}", f"data.train={paths['train']}", f"data.test={paths['beir']}",
        "data.val_split=0", f"method.name={args.method}", f"train.max_steps={args.steps}",
        f"train.batch_size={args.batch}", f"train.lr={args.lr}", f"train.warmup_steps={args.warmup}",
        "train.schedule=cosine", f"train.threads={args.threads}", "eval.bootstrap=0", f"output.dir={out}",
        f"objective.mask_same_document={str(args.mask_same_document).lower()}"])
    summary = train_embedder(cfg)
    return summary["train_seconds"], {k: v["value"] for k, v in summary["evaluation"]["full"]["after"].items()}


def run_sentence_transformers(args, paths, out: Path) -> tuple[float, dict]:
    from datasets import Dataset
    from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer, \
        SentenceTransformerTrainingArguments
    try:  # sentence-transformers >= 6 moved the losses
        from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss
    except ImportError:
        from sentence_transformers.losses import MultipleNegativesRankingLoss

    from tunesmith.embed.data import read_pairs
    from tunesmith.embed.encoder import load_encoder, resolve_encoder_folder
    from tunesmith.embed.evaluate import load_retrieval_set
    from tunesmith.embed.train import MAIN, score_dimensions

    pairs = read_pairs(paths["train"])
    dataset = Dataset.from_dict({"anchor": [p.query for p in pairs], "positive": [p.positive for p in pairs]})
    model = SentenceTransformer(str(resolve_encoder_folder(args.model)), device="cpu")
    if args.method != "full":
        from peft import LoraConfig

        model.add_adapter(LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear",
                                     task_type="FEATURE_EXTRACTION"))
    training = SentenceTransformerTrainingArguments(
        output_dir=str(out / "trainer"), max_steps=args.steps, per_device_train_batch_size=args.batch,
        learning_rate=args.lr, warmup_steps=args.warmup, lr_scheduler_type="cosine", weight_decay=0.0,
        max_grad_norm=1.0, optim="adamw_torch", seed=0, save_strategy="no", report_to="none", logging_steps=10,
        use_cpu=True, dataloader_drop_last=False)
    trainer = SentenceTransformerTrainer(model=model, args=training, train_dataset=dataset,
                                         loss=MultipleNegativesRankingLoss(model))
    started = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - started
    if args.method != "full":
        model = model.merge_and_unload() if hasattr(model, "merge_and_unload") else model
    model.save(str(out / "model"))
    values = score_dimensions(load_encoder(str(out / "model")), load_retrieval_set(paths["beir"]), 64, [])[MAIN]
    return seconds, {k: float(v.mean()) for k, v in values.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="all-minilm-l6-v2")
    parser.add_argument("--method", default="full", choices=["full", "lora"])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--warmup", type=int, default=6)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads for both (0: tunesmith's choice)")
    parser.add_argument("--mask-same-document", action="store_true",
                        help="tunesmith masks a query's other same-document passages out of its negatives (embed "
                        "train's default); off by default here, so both sides compute plain MNRL")
    parser.add_argument("--out", default="runs/bench-embed")
    args = parser.parse_args()

    import torch

    from tunesmith.embed.demo import write_embed_demo
    from tunesmith.train.threads import set_cpu_threads

    set_cpu_threads(args.threads)
    out = Path(args.out)
    paths = write_embed_demo(out / "data")
    torch.manual_seed(0)
    st_seconds, st_scores = run_sentence_transformers(args, paths, out / "sentence-transformers")
    ts_seconds, ts_scores = run_tunesmith(args, paths, out / "tunesmith")
    result = {"steps": args.steps, "batch": args.batch, "lr": args.lr, "method": args.method,
              "mask_same_document": args.mask_same_document,
              "threads": torch.get_num_threads(),
              "tunesmith": {"train_seconds": round(ts_seconds, 2), **{k: round(ts_scores[k], 4) for k in
                                                                     ("mrr@10", "ndcg@10", "accuracy@5")}},
              "sentence_transformers": {"train_seconds": round(st_seconds, 2), **{k: round(st_scores[k], 4) for k in
                                                                                 ("mrr@10", "ndcg@10", "accuracy@5")}},
              "speed_ratio": round(st_seconds / ts_seconds, 3)}  # > 1: tunesmith is faster
    print(json.dumps(result, indent=2))
    (out / "result.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
