"""What each CLI subcommand does, as plain functions (the CLI only parses arguments).

`train` is the whole workflow: validate, load, prepare data, score before, fine-tune, save,
score after, report. Each step is a call into one package; nothing here knows a method's math.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch

from tunesmith.config import Config, ModelConfig, load_config, save_config
from tunesmith.errors import UserError
from tunesmith.train import distributed

log = logging.getLogger(__name__)

DEMO_CONFIG = Path(__file__).parent / "configs" / "demo.yaml"


def prepare_run_dir(cfg: Config) -> Path:
    run_dir = Path(cfg.output.dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"output.dir={str(run_dir)!r} exists and is not a folder.")
    if not cfg.train.resume and (run_dir / "checkpoints").exists() and any((run_dir / "checkpoints").iterdir()):
        log.warning("%s already holds checkpoints; they will be replaced (set train.resume=true to continue)", run_dir)
        import shutil

        shutil.rmtree(run_dir / "checkpoints")
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / "config.yaml")
    return run_dir


def train(cfg: Config) -> dict:
    """Fine-tune as configured; returns the summary written to summary.json and report.md.

    Under torchrun (docs/distributed.md) every process runs this; rank 0 alone writes files."""
    from tunesmith.data.dataset import prepare_datasets
    from tunesmith.evaluate.report import plot_loss, write_report
    from tunesmith.methods.inject import count_parameters
    from tunesmith.methods.registry import describe_method, get_method
    from tunesmith.models.loading import load_model_and_tokenizer, resolve_device
    from tunesmith.train.loop import train as train_loop
    from tunesmith.train.threads import set_cpu_threads

    if not cfg.data.train:
        raise UserError("data.train is not set: name a training file (e.g. data.train=data/train.jsonl).")
    if resolve_device(cfg.model.device).type == "cpu":
        set_cpu_threads(cfg.train.threads)  # torch would size its pool by the host's cores (train/threads.py)
    distributed.init(cfg.model.device)  # under torchrun: join the other processes (alone: nothing)
    with distributed.main_first():  # rank 0 sets up output.dir and converts a built-in model once; then the others
        run_dir = prepare_run_dir(cfg) if distributed.is_main() else Path(cfg.output.dir)
        model, tokenizer = load_model_and_tokenizer(cfg.model)
    data = prepare_datasets(cfg.data, tokenizer, cfg.train.seed)
    log.info("data: %s", data.describe())

    before = None
    if cfg.data.test and cfg.eval.before_after:
        before = cached_score(run_dir / "before.json", lambda: score_test_set(model, tokenizer, cfg, "before"))
        log.info("before fine-tuning: %s", _fmt(before))

    method = get_method(cfg.method.name)
    torch.manual_seed(cfg.train.seed)  # adapter initialisation is part of the run's seed
    adapted = method.apply(model, cfg.method)
    trainable, total = count_parameters(model)
    log.info("%s on %d modules: %s trainable of %s parameters (%.2f%%)", cfg.method.name,
             len(adapted), f"{trainable:,}", f"{total:,}", 100 * trainable / total)

    started = time.time()
    # The groups are built inside the loop: FSDP2 (full under torchrun) replaces the parameters first.
    state = train_loop(model, data.train, data.validation, cfg, run_dir, tokenizer.pad_token_id,
                       param_groups=lambda m: method.param_groups(m, cfg.method), after_step=method.after_step)
    train_seconds = time.time() - started
    if distributed.is_sharded(model):
        del model  # FSDP2 left each process a shard of every weight; the artifact and scoring need whole ones
        model = trained_model_from_checkpoint(cfg, method, run_dir)
    if distributed.is_main():
        method.save(model, run_dir / "adapter", cfg.method, cfg.model.name_or_path)
        plot_loss(run_dir / "metrics.jsonl", run_dir / "loss.png")

    after, examples = None, []
    if cfg.data.test:
        after, examples = score_test_set(model, tokenizer, cfg, "after", return_examples=3)
        log.info("after fine-tuning:  %s", _fmt(after))
    summary = {
        "model": cfg.model.name_or_path,
        "method": describe_method(cfg.method),
        "trainable": trainable,
        "total": total,
        "steps": state.step,
        "skipped_steps": state.skipped_steps,
        "tokens_seen": state.tokens_seen,
        "train_seconds": train_seconds,
        "data": data.describe(),
        "val_loss": last_validation_loss(run_dir / "metrics.jsonl"),
        "before": before,
        "after": after,
        "examples": examples,
    }
    if distributed.is_main():
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
        report = write_report(run_dir, summary)
        log.info("report: %s\nadapter: %s", report, run_dir / "adapter")
    distributed.shutdown()
    return summary


def trained_model_from_checkpoint(cfg: Config, method, run_dir: Path):
    """A whole copy of the trained model: the base, the method applied, and the trainable weights of the
    newest checkpoint (the loop always saves one at the last step, whole, as any checkpoint)."""
    from safetensors.torch import load_file

    from tunesmith.models.loading import load_model_and_tokenizer
    from tunesmith.train.checkpoint import complete_checkpoints, copy_trainable

    model, _ = load_model_and_tokenizer(cfg.model)
    torch.manual_seed(cfg.train.seed)
    method.apply(model, cfg.method)
    weights = complete_checkpoints(run_dir)[-1] / "trainable.safetensors"
    copy_trainable(model, load_file(weights), weights)
    model.eval()
    return model


def last_validation_loss(metrics_path: Path) -> float | None:
    from tunesmith.evaluate.report import read_metrics

    losses = [r["val_loss"] for r in read_metrics(metrics_path) if r.get("val_loss") is not None]
    return losses[-1] if losses else None


def cached_score(path: Path, compute):
    """The base model's score does not change on resume: compute it once per run directory."""
    if path.exists():
        return json.loads(path.read_text(encoding="utf-8"))
    scores = compute()
    if distributed.is_main():
        path.write_text(json.dumps(scores), encoding="utf-8")
    return scores


def score_test_set(model, tokenizer, cfg: Config, label: str, return_examples: int = 0):
    """Generate an answer for every test row and score it against the reference. Under torchrun each
    process generates its share of the rows (every process holds the whole model then); all score all."""
    from tunesmith.data.demo import score
    from tunesmith.evaluate.generate import generate, render_prompt
    from tunesmith.evaluate.task import test_cases

    cases = test_cases(cfg.data)
    if cfg.eval.max_samples:
        cases = cases[: cfg.eval.max_samples]
    prompts = [render_prompt(tokenizer, messages) for messages, _ in cases]
    references = [reference for _, reference in cases]
    mine = generate(model, tokenizer, distributed.share(prompts), cfg.eval.max_new_tokens, cfg.eval.batch_size,
                    progress=distributed.is_main(), desc=f"score test ({label})")
    predictions = [p for share in distributed.gather_objects(mine) for p in share]  # in row order
    scores = score(predictions, references)
    if return_examples:
        examples = [{"reference": r, "prediction": p} for p, r in list(zip(predictions, references))[:return_examples]]
        return scores, examples
    return scores


def evaluate(cfg: Config, adapter: str | None) -> dict:
    """Score the test split with the base model, or with an artifact on it. A model.quantization the config
    names is used as is; left unset, a QLoRA adapter gets the quantized base it was trained on."""
    from tunesmith.methods.registry import load_artifact
    from tunesmith.models.loading import load_model_and_tokenizer

    if not cfg.data.test:
        raise UserError("data.test is not set: name a test file to score (e.g. data.test=data/test.jsonl).")
    explicit = "quantization" in cfg.model.model_fields_set
    model_cfg = cfg.model if explicit or not adapter else adapter_base_config(cfg.model, Path(adapter))
    model, tokenizer = load_model_and_tokenizer(model_cfg)
    if adapter:
        load_artifact(model, Path(adapter))
    scores = score_test_set(model, tokenizer, cfg, "adapter" if adapter else "base")
    print(json.dumps(scores, indent=2))
    return scores


def adapter_base_config(model: ModelConfig, adapter_dir: Path | None, quantization: str = "auto") -> ModelConfig:
    """`model` with the quantization an artifact must run on. A QLoRA adapter was fitted to the quantized base,
    and the float base is a different model to it (docs/qlora.md), so auto takes model.quantization (and
    double_quant, compute_dtype) from the run's config.yaml beside the adapter folder, as `merge` does; an
    artifact without one keeps `model` as it is. none, nf4, fp4, int8: that quantization, whatever the run used."""
    if quantization == "auto":
        quant = run_quantization(adapter_dir) if adapter_dir is not None else {}
    else:
        quant = {"quantization": quantization}
    if quant.get("quantization", "none") != "none":
        log.info("base quantized as in training: %s", ", ".join(f"{k}={v}" for k, v in quant.items()))
    return ModelConfig(**{**model.model_dump(), **quant}) if quant else model


def load_for_inference(model_name: str, adapter: str | None, quantization: str = "auto"):
    """(model, tokenizer) for generate and chat: the base, quantized as the adapter's run was (see
    adapter_base_config), with the artifact on it."""
    from tunesmith.methods.registry import load_artifact
    from tunesmith.models.loading import load_model_and_tokenizer

    adapter_dir = Path(adapter) if adapter else None
    model, tokenizer = load_model_and_tokenizer(adapter_base_config(ModelConfig(name_or_path=model_name), adapter_dir,
                                                                    quantization))
    if adapter_dir is not None:
        load_artifact(model, adapter_dir)
    return model, tokenizer


def generate_one(model_name: str, adapter: str | None, prompt: str, max_new_tokens: int, system: str | None,
                 quantization: str = "auto") -> str:
    from tunesmith.evaluate.generate import generate, render_prompt

    model, tokenizer = load_for_inference(model_name, adapter, quantization)
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    return generate(model, tokenizer, [render_prompt(tokenizer, messages)], max_new_tokens)[0]


def chat(model_name: str, adapter: str | None, max_new_tokens: int, system: str | None,
         quantization: str = "auto") -> None:
    """A read-eval-print loop; the conversation so far is the prompt of each turn. Empty line or EOF quits."""
    from tunesmith.evaluate.generate import generate, render_prompt

    model, tokenizer = load_for_inference(model_name, adapter, quantization)
    history = [{"role": "system", "content": system}] if system else []
    print("tunesmith chat: type a message; an empty line or Ctrl-D quits.")
    while True:
        try:
            text = input("you> ").strip()
        except EOFError:
            break
        if not text:
            break
        history.append({"role": "user", "content": text})
        answer = generate(model, tokenizer, [render_prompt(tokenizer, history)], max_new_tokens)[0]
        history.append({"role": "assistant", "content": answer})
        print(f"model> {answer}")


def write_demo_data(out: Path, seed: int = 0, variant: str = "easy") -> dict:
    from tunesmith.data.demo import write_demo

    return write_demo(out, seed=seed, variant=variant)


def demo(out: Path, overrides: list[str]) -> dict:
    """The first-run experience: demo data, score, fine-tune, score, print both."""
    data_dir = out / "data"
    cfg = load_config(DEMO_CONFIG, [
        f"data.train={data_dir / 'train.jsonl'}",
        f"data.validation={data_dir / 'validation.jsonl'}",
        f"data.test={data_dir / 'test.jsonl'}",
        f"output.dir={out}",
        *overrides,
    ])
    distributed.init(cfg.model.device)
    with distributed.main_first():  # under torchrun rank 0 writes the data before any process reads it
        if distributed.is_main():
            write_demo_data(data_dir)
    summary = train(cfg)
    if not distributed.is_main():
        return summary
    before, after = summary["before"] or {}, summary["after"] or {}
    print()
    print("=" * 64)
    print(f"exact match on {out / 'data' / 'test.jsonl'}:")
    print(f"  before fine-tuning: {before.get('exact_match', float('nan')):5.1f}%")
    print(f"  after fine-tuning:  {after.get('exact_match', float('nan')):5.1f}%")
    print(f"report:  {out / 'report.md'}")
    print(f"adapter: {out / 'adapter'}")
    print("=" * 64)
    return summary


def merge(adapter: str, out: str, model_name: str | None, quantization: str = "auto") -> None:
    """Base model + artifact (any method) -> one plain transformers folder.

    A QLoRA adapter was trained against the quantized base, so by default (quantization auto: the
    model.quantization of the run's config.yaml beside the adapter folder) the base is quantized the
    same way, then dequantized to float and the update folded into that (docs/qlora.md)."""
    from tunesmith.methods.registry import artifact_base_model, get_method, load_artifact
    from tunesmith.models.loading import load_model_and_tokenizer

    adapter_dir = Path(adapter)
    if model_name is None:
        model_name = artifact_base_model(adapter_dir)
        if not model_name:
            raise UserError(f"The artifact in {adapter!r} names no base model; pass --model.")
    model_cfg = adapter_base_config(ModelConfig(name_or_path=model_name), adapter_dir, quantization)
    model, tokenizer = load_model_and_tokenizer(model_cfg)
    method = get_method(load_artifact(model, adapter_dir).name)
    if method.merge is None:
        raise UserError(f"{method.name} artifacts cannot be merged into the weights (the adapter is not a weight "
                        "update); use the base model with --adapter instead.")
    if model_cfg.quantization != "none":
        from tunesmith.models.quantize import dequantize_model

        log.info("dequantizing the base before merging")
        dequantize_model(model, model.get_input_embeddings().weight.dtype)
    merged = method.merge(model)
    merged.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    print(f"merged model saved to {out}")


def run_quantization(adapter_dir: Path) -> dict:
    """model.quantization (and double_quant, compute_dtype) of the run whose config.yaml sits beside the
    adapter folder (output.dir/adapter); {} when there is none."""
    import yaml

    path = adapter_dir.parent / "config.yaml"
    try:
        section = (yaml.safe_load(path.read_text(encoding="utf-8")) or {}).get("model") or {}
    except (OSError, yaml.YAMLError, AttributeError):
        return {}
    keys = ("quantization", "double_quant", "compute_dtype")
    return {k: section[k] for k in keys if k in section} if section.get("quantization", "none") != "none" else {}


def quantize(model_name: str, out: str, bits: int, quant_type: str = "nf4", double_quant: bool = True) -> None:
    """A bitsandbytes 4-bit (nf4/fp4) or 8-bit checkpoint that AutoModelForCausalLM.from_pretrained loads."""
    from tunesmith.models.loading import load_model_and_tokenizer, resolve_device
    from tunesmith.models.quantize import resolve_compute_dtype, save_quantized

    quantization = "int8" if bits == 8 else quant_type
    cfg = ModelConfig(name_or_path=model_name, quantization=quantization, double_quant=double_quant)
    device = resolve_device(cfg.device)
    model, tokenizer = load_model_and_tokenizer(cfg, device)
    save_quantized(model, tokenizer, out, quantization, double_quant, resolve_compute_dtype(cfg.compute_dtype, device))
    print(f"{bits}-bit ({quantization}) model saved to {out}")


def _fmt(scores: dict | None) -> str:
    if not scores:
        return "n/a"
    return ", ".join(f"{k} {v:.1f}%" for k, v in scores.items())
