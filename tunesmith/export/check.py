"""Every model folder tunesmith writes is read back and checked before the command reports success.

What goes wrong around a save, by users' reports of the other toolkits, and what is checked here:

    tokenizer      the files are there, AutoTokenizer loads them, the chat template survived
    tied weights   config.json ties lm_head to the embeddings only when they are equal: a trained head
                   saved as tied is silently replaced by the embeddings on reload
    vocabulary     the embedding has config.vocab_size rows and the tokenizer's ids fit in them
    dtype          the weights are stored in the dtype asked for
    behaviour      greedy answers to a few prompts equal those of the model before saving (fp32 only:
                   a cast changes the numbers legitimately)

A failure raises ArtifactCheckError naming every problem found; the folder is left for inspection.
The check costs one more load of the model and a few short generations (docs/export.md).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from tunesmith.errors import UserError

log = logging.getLogger(__name__)

PROMPTS = ("What is the capital of France?", 'Extract name and age as JSON. Text: Ada is 36.',
           "Write one sentence about the sea.")
NEW_TOKENS = 16


class ArtifactCheckError(UserError):
    """A saved folder does not reload as the model it was saved from."""


def check_saved_model(folder: str | Path, model, tokenizer=None, dtype: torch.dtype | None = None,
                      quantized: bool = False) -> None:
    """Reload `folder` and compare it with `model` and `tokenizer`, the objects it was saved from (tokenizer None:
    the model came without one, and the saved one is taken as it is). `dtype`: the dtype the weights were asked
    to be stored in (None: as the model holds them). `quantized`: a bitsandbytes folder, reloaded with its
    quantization_config (weights are compared through the answers only)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = Path(folder)
    problems: list[str] = []
    try:
        saved_tokenizer = AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError) as e:
        saved_tokenizer = None
        problems.append(f"the tokenizer does not load ({e})")
    if tokenizer is None:
        tokenizer = saved_tokenizer
    elif saved_tokenizer is not None and getattr(tokenizer, "chat_template", None) != saved_tokenizer.chat_template:
        problems.append("the chat template is missing or differs from the model's")
    device = next(model.parameters()).device
    reloaded = AutoModelForCausalLM.from_pretrained(folder, dtype="auto").to(device)  # as stored
    reloaded.eval()
    problems += weight_problems(model, reloaded, dtype, quantized)
    if saved_tokenizer is not None and len(saved_tokenizer) > reloaded.get_input_embeddings().weight.shape[0]:
        problems.append(f"the tokenizer has {len(saved_tokenizer)} tokens but the embedding only "
                        f"{reloaded.get_input_embeddings().weight.shape[0]} rows")
    if not problems and (dtype in (None, torch.float32)) and saved_tokenizer is not None:
        problems += answer_problems(model, tokenizer, reloaded, saved_tokenizer)
    del reloaded
    if problems:
        raise ArtifactCheckError(f"{folder} was written but does not reload as the model it was saved from: "
                                 + "; ".join(problems) + ".")
    log.info("checked %s: reloads with the same tokenizer, weights and greedy answers", folder)


def check_merged_folder(folder: str | Path, donor: str | Path, dtypes: dict[str, torch.dtype]) -> None:
    """A folder written without a model in memory (`tunesmith merge CONFIG.yaml`, streamed tensor by tensor):
    every weight present in the dtype planned (`dtypes`: name -> dtype; read from the files' headers), the tokenizer
    loads with the donor's chat template, the embedding covers the vocabulary, and the model answers with finite
    logits. It is checked as it was written, without a whole model in memory: the model is built on the meta
    device and run with each module's weights read from the files just before it runs and dropped after
    (streamed_forward), so the peak is one tensor (the embedding), not a second copy of the model."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from tunesmith.merge.run import read_template
    from tunesmith.merge.tensors import ModelTensors

    folder, problems = Path(folder), []
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError) as e:
        tokenizer = None
        problems.append(f"the tokenizer does not load ({e})")
    donor_template = read_template(Path(donor))  # from its files: a second tokenizer load cost 0.1-0.4 s
    if tokenizer is not None and donor_template and not tokenizer.chat_template:
        problems.append("the chat template is missing")
    files = ModelTensors(folder)
    model = meta_model(AutoConfig.from_pretrained(folder), AutoModelForCausalLM)
    missing = sorted(name for name in model.state_dict() if files.resolve(name) is None)
    if missing:
        problems.append(f"weights missing from the files: {', '.join(missing[:5])}")
    problems += [f"{name} is stored as {files.info[name].dtype}, not {want}" for name, want in dtypes.items()
                 if name in files.info and files.info[name].dtype != want][:5]
    rows = model.get_input_embeddings().weight.shape[0]
    if tokenizer is not None and len(tokenizer) > rows:
        problems.append(f"the tokenizer has {len(tokenizer)} tokens but the embedding only {rows} rows")
    if tokenizer is not None and not problems:
        ids = tokenizer(PROMPTS[0], return_tensors="pt").input_ids
        if not torch.isfinite(streamed_forward(model, files, ids)).all():
            problems.append("the logits of a prompt are not finite")
    if problems:
        raise ArtifactCheckError(f"{folder} was written but does not reload as a usable model: "
                                 + "; ".join(problems) + ".")
    log.info("checked %s: reloads with every weight, its tokenizer and finite logits", folder)


def meta_model(config, auto_class):
    """The model of `config` with its parameters on the meta device (no memory) and its buffers real (rotary
    frequencies are computed at construction, not stored). Weight initialisation is skipped: on meta tensors it
    does nothing but walk every module (0.1 s of the 0.46 s check of the default model)."""
    from accelerate import init_empty_weights

    try:
        from transformers.initialization import no_init_weights  # transformers 5
    except ImportError:
        from transformers.modeling_utils import no_init_weights  # transformers 4
    with init_empty_weights(include_buffers=False), no_init_weights():
        model = auto_class.from_config(config)
    model.tie_weights()  # skipped with the initialisation in transformers 5
    return model.eval()


def streamed_forward(model, files, ids: torch.Tensor) -> torch.Tensor:
    """model(ids).logits of a meta-device model whose weights are in `files` (a merge.tensors.ModelTensors): a
    forward pre-hook on every module with weights of its own reads them (the head of a tied model: the
    embeddings) and a forward hook puts them back on the meta device, so one module's weights are held at a time."""
    by_module = {}
    for prefix, module in model.named_modules(remove_duplicate=False):
        own = {k: f"{prefix}.{k}" if prefix else k for k, p in module._parameters.items() if p is not None}
        if own:
            by_module[module] = own
    # as from_pretrained(dtype="auto") loads it: every weight in the dtype of the stored embeddings
    dtype = files.meta(next(n for n in by_module[model.get_input_embeddings()].values())).dtype

    def load(module, args):
        for key, name in by_module[module].items():
            weight = files.get(name)
            module._parameters[key] = torch.nn.Parameter(weight.to(dtype) if weight.is_floating_point() else weight,
                                                         requires_grad=False)

    def drop(module, args, output):
        for key in by_module[module]:
            module._parameters[key] = torch.nn.Parameter(module._parameters[key].to("meta"), requires_grad=False)

    handles = [h for m in by_module for h in (m.register_forward_pre_hook(load), m.register_forward_hook(drop))]
    try:
        with torch.no_grad():
            return model(ids).logits
    finally:
        for h in handles:
            h.remove()


def weight_problems(model, reloaded, dtype: torch.dtype | None, quantized: bool) -> list[str]:
    problems = []
    config = reloaded.config
    rows = reloaded.get_input_embeddings().weight.shape[0]
    if rows != config.vocab_size:
        problems.append(f"config.json says vocab_size {config.vocab_size} but the embedding has {rows} rows")
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    trained_apart = head is not None and (head.weight.shape != embed.weight.shape
                                          or not torch.equal(head.weight.float(), embed.weight.float()))
    if trained_apart and getattr(config, "tie_word_embeddings", False):
        problems.append("tie_word_embeddings is true but the output head differs from the embeddings: the reloaded "
                        "model would use the embeddings as its head")
    if quantized:
        return problems
    source = {k: v for k, v in model.state_dict().items()}
    for name, saved in reloaded.state_dict().items():
        if name not in source:
            problems.append(f"{name} is saved but the model has no such weight")
            continue
        want = source[name].to(dtype) if dtype is not None else source[name]
        if saved.dtype != want.dtype:
            problems.append(f"{name} is stored as {saved.dtype}, not {want.dtype}")
        elif not torch.equal(saved.cpu(), want.cpu()):
            problems.append(f"{name} differs from the model's")
        if len(problems) > 5:
            break
    return problems


def answer_problems(model, tokenizer, reloaded, saved_tokenizer) -> list[str]:
    from tunesmith.evaluate.generate import generate, render_prompt

    def answers(m, tok):
        prompts = [render_prompt(tok, [{"role": "user", "content": p}]) for p in PROMPTS]
        return generate(m, tok, prompts, max_new_tokens=NEW_TOKENS, batch_size=len(prompts))

    before, after = answers(model, tokenizer), answers(reloaded, saved_tokenizer)
    return [f"the greedy answer to {p!r} changed from {b!r} to {a!r}"
            for p, b, a in zip(PROMPTS, before, after) if a != b]
