"""`tunesmith eval`, `generate` and `chat`: run a model, optionally with an adapter, on the base it was
trained on (a QLoRA adapter gets its quantized base back; docs/qlora.md)."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Literal

from pydantic import Field

from tunesmith.commands.options import add_section_options, resolve_options
from tunesmith.commands.train import OVERRIDES_HELP, config_keys_epilog, score_test_set
from tunesmith.config import DEFAULT_MODEL, Config, ModelConfig, Section, load_config
from tunesmith.errors import UserError

log = logging.getLogger(__name__)


# The options of generate and chat, as flags or as the `generate:` / `chat:` section of a --config file
# (commands/options.py turns the fields into both); a flag given on the command line wins over the file.
BaseQuantization = Literal["auto", "none", "nf4", "fp4", "int8"]


class GenerateConfig(Section):
    """`tunesmith generate` and `tunesmith chat` (file sections `generate:` and `chat:`)."""

    model: str = Field(DEFAULT_MODEL, description="Model name, folder or .gguf.")
    adapter: str | None = Field(None, description="Adapter folder (PEFT format) to apply.")
    max_new_tokens: int = Field(256, ge=1, description="Generation budget.")
    system: str | None = Field(None, description="System prompt.")
    quantization: BaseQuantization = Field(
        "auto", description="Base quantization. auto: as in the adapter's run, from the config.yaml beside it; "
        "none: the float base; nf4, fp4, int8: that one, whatever the run used.",
    )
    server: str | None = Field(None, description="URL of a running OpenAI-compatible server (tunesmith serve) to "
                               "ask instead of loading the model here; --adapter then names a served adapter, else "
                               "--model the served model. The key, if it wants one: $TUNESMITH_API_KEY.")


def register(subparsers) -> None:
    p = subparsers.add_parser("eval", help="score a model (optionally with an adapter) on the test split",
                              description="Score the test split (data.test) with the model, or with an adapter "
                              "on it, and print the scores as JSON; with --harness, run lm-evaluation-harness tasks "
                              "on it instead.",
                              epilog=config_keys_epilog(), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="YAML config naming the model and data.test")
    p.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)
    p.add_argument("--adapter", action="append", metavar="ARTIFACT",
                   help="an artifact to score, repeatable to compare several (docs/evaluation.md): an adapter folder "
                   "(applied to model.name_or_path), a model folder (config.json, e.g. from tunesmith merge) or a "
                   ".gguf file; with objective.name=reward, the reward model folder (default output.dir/reward_model)")
    p.add_argument("--base", action="store_true",
                   help="score model.name_or_path too, first: the others' differences are taken from it")
    h = p.add_argument_group("lm-evaluation-harness (docs/evaluation.md; pip install 'tunesmith[harness]')")
    h.add_argument("--harness", metavar="TASKS", help="run these harness tasks (comma-separated) instead of the test "
                   "split, on each model as loaded: tunesmith_json_choice, tunesmith_qa_choice, tunesmith_arithmetic "
                   "(built in, offline; the tag tunesmith runs all three) or tasks of --harness-include")
    h.add_argument("--harness-include", action="append", default=[], metavar="DIR",
                   help="a folder of your own harness task YAMLs (repeatable)")
    h.add_argument("--harness-limit", type=int, metavar="N", help="score at most N rows per task")
    h.add_argument("--harness-fewshot", type=int, metavar="N", help="few-shot examples (default: each task's own)")
    h.add_argument("--harness-chat", action="store_true", help="render prompts with the tokenizer's chat template")
    h.add_argument("--harness-out", metavar="FILE", help="where to save the results JSON (default "
                   "output.dir/harness.json)")
    p.set_defaults(run=_run_eval)

    for name, text, run in (("generate", "complete one prompt", _run_generate),
                            ("chat", "talk to the model interactively", _run_chat)):
        p = subparsers.add_parser(name, help=text, description=text)
        add_section_options(p, name, GenerateConfig)
        if name == "generate":
            p.add_argument("prompt", help="the user message")
        p.set_defaults(run=run)


def _run_eval(args: argparse.Namespace) -> None:
    cfg = load_config(args.config, args.overrides)
    if args.harness is None:
        evaluate(cfg, args.adapter, args.base)
        return
    from tunesmith.evaluate.harness import HarnessOptions, parse_tasks

    options = HarnessOptions(parse_tasks(args.harness), args.harness_include, args.harness_limit, args.harness_fewshot,
                             args.harness_chat, cfg.eval.batch_size)
    evaluate_on_harness(cfg, args.adapter, args.base, options, args.harness_out)


def _run_generate(args: argparse.Namespace) -> None:
    o: GenerateConfig = resolve_options(args)
    if o.server:
        messages = ([{"role": "system", "content": o.system}] if o.system else []) + [{"role": "user",
                                                                                       "content": args.prompt}]
        print(ask_server(o, messages).strip())
        return
    print(generate_one(o.model, o.adapter, args.prompt, o.max_new_tokens, o.system, o.quantization))


def _run_chat(args: argparse.Namespace) -> None:
    o: GenerateConfig = resolve_options(args)
    chat(o.model, o.adapter, o.max_new_tokens, o.system, o.quantization, server=o)


def ask_server(o: GenerateConfig, messages: list[dict], stream: bool = False) -> str:
    """The answer of the server at o.server (serve/client.py): greedy, the adapter (or model) by its served name;
    printed as it streams in when `stream`."""
    from tunesmith.serve.client import chat_completion

    parts = []
    for piece in chat_completion(o.server, o.adapter or o.model, messages, o.max_new_tokens, stream=stream):
        parts.append(piece)
        if stream:
            print(piece, end="", flush=True)
    return "".join(parts)


def evaluate(cfg: Config, adapter: str | list[str] | None, base: bool = False) -> dict:
    """Score the test split with the base model, or with each artifact given (the base first with `base`), and
    print the scores as JSON (one artifact: its flat scores) after a markdown table on stderr; with several, the
    table and the JSON give each one's difference from the first, paired on the same rows (evaluate/compare.py)."""
    from tunesmith.evaluate.compare import comparison, targets

    if not cfg.data.test:
        raise UserError("data.test is not set: name a test file to score (e.g. data.test=data/test.jsonl).")
    artifacts = [adapter] if isinstance(adapter, str) else list(adapter or [])
    if cfg.objective.name == "reward":
        if len(artifacts) > 1 or base:
            raise UserError("Reward models are scored one at a time: give one --adapter (or none), without --base.")
        return evaluate_reward_model(cfg, artifacts[0] if artifacts else None)
    chosen = targets(artifacts, base)
    results = []
    for target in chosen:
        model, tokenizer = load_target(cfg, target.path, target.kind)
        results.append(score_test_set(model, tokenizer, cfg, target.name))
        del model, tokenizer  # one model in memory at a time
    return comparison(cfg, chosen, results)


def evaluate_on_harness(cfg: Config, adapter: str | list[str] | None, base: bool, options,
                        out: str | None = None) -> dict:
    """lm-evaluation-harness tasks on the base or each artifact, each loaded as `evaluate` loads it (an adapter on
    its base, quantized as in training), in memory; one table of tasks x targets; the JSON saved at `out` (default
    output.dir/harness.json). evaluate/harness.py."""
    from tunesmith.evaluate.compare import targets
    from tunesmith.evaluate.harness import evaluate_harness

    if cfg.objective.name == "reward":
        raise UserError("--harness scores language models; a reward model has no text to score (objective.name="
                        "reward): leave out --harness, or objective.name.")
    artifacts = [adapter] if isinstance(adapter, str) else list(adapter or [])
    chosen = targets(artifacts, base)
    path = Path(out) if out else Path(cfg.output.dir) / "harness.json"
    return evaluate_harness(chosen, lambda t: load_target(cfg, t.path, t.kind), options, path)


def load_target(cfg: Config, path: str | None, kind: str):
    """(model, tokenizer) of what `tunesmith eval` scores: the config's model (path None), a model folder or .gguf
    file (kind model) with the config's model options, or that model with an artifact on it (kind adapter). A
    model.quantization the config names is used as is; left unset, a QLoRA adapter gets the quantized base it
    was trained on."""
    from tunesmith.methods.registry import load_artifact
    from tunesmith.models.loading import load_model_and_tokenizer

    if kind == "model":
        return load_model_and_tokenizer(cfg.model.model_copy(update={"name_or_path": path, "gguf_file": None}))
    explicit = "quantization" in cfg.model.model_fields_set
    model_cfg = cfg.model if explicit or path is None else adapter_base_config(cfg.model, Path(path))
    model, tokenizer = load_model_and_tokenizer(model_cfg)
    if path is not None:
        load_artifact(model, Path(path))
    return model, tokenizer


def evaluate_reward_model(cfg: Config, folder: str | None) -> dict:
    """A reward model's pair accuracy on data.test (preference rows): the folder given, else the run's
    output.dir/reward_model, scored by plain transformers as `tunesmith score` does."""
    from tunesmith.commands.score import score_file

    model_dir = folder or str(Path(cfg.output.dir) / "reward_model")
    _, summary = score_file(model_dir, cfg.data.test, cfg.eval.batch_size, cfg.data.max_seq_len, cfg.data.system_prompt)
    if "pair_accuracy" not in summary:
        raise UserError(f"{cfg.data.test}: a reward model is evaluated on preference rows (prompt, chosen, rejected).")
    scores = {"pair_accuracy": summary["pair_accuracy"]}
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
         quantization: str = "auto", server: GenerateConfig | None = None) -> None:
    """A read-eval-print loop; the conversation so far is the prompt of each turn. Empty line or EOF quits.
    With `server.server` set, each turn is asked of that running server (streamed) instead of a model loaded here."""
    from tunesmith.evaluate.generate import generate, render_prompt

    remote = server is not None and server.server
    if not remote:
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
        if remote:
            print("model> ", end="", flush=True)
            answer = ask_server(server, history, stream=True).strip()
            print()
        else:
            answer = generate(model, tokenizer, [render_prompt(tokenizer, history)], max_new_tokens)[0]
            print(f"model> {answer}")
        history.append({"role": "assistant", "content": answer})
