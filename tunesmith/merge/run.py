"""`tunesmith merge CONFIG.yaml OUT_DIR`: run a mergekit recipe, streaming tensor by tensor.

    recipe -> inputs (folders; adapters folded into their base first) -> plan (names, dtypes, shapes)
           -> for each tensor name in sorted order: read it from every input, resolve the parameters
              at its layer (filters, gradients), merge, cast, append to the output shard
           -> config.json (the donor's: base_model, else the first model; dtype = out_dtype or dtype),
              tokenizer files and chat template, the recipe as merged (tunesmith_merge.yaml)

Tensors go in sorted name order, models in recipe order (the base appended when not listed),
which is the order mergekit's scheduler runs them in: the random methods then draw the same
masks under the same --random-seed. Peak memory (docs/merging.md, Memory): a row chunk per input plus the
result for elementwise methods; the task vectors of one tensor for TIES and DARE; else one tensor per input.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

from tunesmith.errors import UserError
from tunesmith.merge import tensors
from tunesmith.merge.config import InputModel, Recipe, evaluate_setting, layer_position, read_recipe
from tunesmith.merge.dare import masks_ahead
from tunesmith.merge.registry import REQUIRED, MergeMethod, get_merge_method
from tunesmith.merge.tensors import TIED_HEAD, ModelTensors, ShardWriter, layer_index, row_chunks
from tunesmith.models.heap import release_freed_memory

log = logging.getLogger(__name__)

TOKENIZER_FILES = ("tokenizer_config.json", "special_tokens_map.json", "tokenizer.json", "tokenizer.model",
                   "added_tokens.json", "merges.txt", "vocab.json", "chat_template.jinja", "chat_template.json",
                   "generation_config.json")
CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + "
          "'<|im_end|>' + '\\n'}}{% endfor %}\n{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def run_merge_file(config_path: str, out_dir: str, seed: int | None = 0, max_shard_bytes: int = 5 * 2**30) -> dict:
    """Read the recipe at config_path and merge it into out_dir. Returns the summary also printed."""
    return merge_recipe(read_recipe(config_path), out_dir, seed, max_shard_bytes, where=repr(str(config_path)))


def merge_recipe(recipe: Recipe, out_dir: str | Path, seed: int | None = 0, max_shard_bytes: int = 5 * 2**30,
                 where: str = "the merge config", on_phase: Callable[[str], None] | None = None) -> dict:
    """Merge `recipe` into out_dir. on_phase(name), when given, is called as each phase ends ("inputs", "merge",
    "files", "check"): bench/merge.py reads the peak resident set of each phase there."""
    phase = on_phase or (lambda name: None)
    from tunesmith.merge.inputs import resolve_reference, same_reference

    if recipe.output == "adapter":
        from tunesmith.merge.adapters import merge_recipe_adapters

        return merge_recipe_adapters(recipe, out_dir, seed, where)
    start = time.perf_counter()
    method = get_merge_method(recipe.merge_method)
    check_parameter_names(recipe, method, where)
    entries, base_index, donor = input_entries(recipe, method, where, same_reference)
    with tempfile.TemporaryDirectory(prefix="tunesmith-merge-") as scratch:
        folders = [resolve_reference(e.model, Path(scratch)) for e in entries]
        out = Path(out_dir)
        if any(out.resolve() == f.resolve() for f in folders):  # its weights would be replaced while read
            raise UserError(f"The output folder {str(out)!r} is one of the merge's inputs; choose another folder.")
        readers = [ModelTensors(f) for f in folders]
        plan, untie = plan_tensors(readers, donor, recipe)
        phase("inputs")
        writer = ShardWriter(out, [(n, d, s) for n, d, s in plan], max_shard_bytes)
        if seed is not None:
            torch.manual_seed(seed)  # after loading: folding an adapter may draw from the RNG
        num_layers = readers[donor].num_layers()
        with masks_ahead(random_draws(plan, readers, entries, base_index, donor, method, recipe)):
            for name, out_dtype, _ in plan:
                t = layer_position(layer_index(name), num_layers)
                writer.add_rows(name, (x.to(out_dtype) for x in merge_rows(name, readers, entries, base_index,
                                                                            donor, method, recipe, t)))
        files = writer.close()
        release_freed_memory()  # what the merge loop freed, before the check builds its model
        phase("merge")
        write_config(readers[donor], out, recipe, untie)
        write_tokenizer(recipe, entries, folders, donor, out, scratch, where)
        phase("files")
        from tunesmith.export.check import check_merged_folder

        check_merged_folder(out, folders[donor], {name: dtype for name, dtype, _ in plan})
        phase("check")
    write_record(recipe, out, seed)
    summary = {"method": method.name, "inputs": [e.model for e in entries], "tensors": len(plan), "files": files,
               "out": str(out), "seconds": round(time.perf_counter() - start, 2)}
    return summary


def input_entries(recipe: Recipe, method: MergeMethod, where: str, same) -> tuple[list[InputModel], int | None, int]:
    """The inputs in recipe order (the base appended when it is not listed, as mergekit), the base's index
    (None for methods without a base), and the donor of config.json and the tokenizer (the base, else the first)."""
    entries = list(recipe.models)
    base_index = None
    if recipe.base_model is not None:
        base_index = next((i for i, e in enumerate(entries) if same(e.model, recipe.base_model)), None)
        if base_index is None:
            entries.append(InputModel(model=recipe.base_model))
            base_index = len(entries) - 1
    if method.base == "required" and base_index is None:
        raise UserError(f"{where}: merge_method {method.name} needs base_model (the model the others were "
                        "fine-tuned from).")
    donor = base_index if base_index is not None else 0
    if method.base == "none":
        base_index = None  # the base, if any, is one more weighted input
    if len(entries) < method.min_inputs or (method.max_inputs is not None and len(entries) > method.max_inputs):
        want = (f"exactly {method.min_inputs}" if method.min_inputs == method.max_inputs
                else f"at least {method.min_inputs}")
        raise UserError(f"{where}: merge_method {method.name} takes {want} models counting base_model; got "
                        f"{len(entries)}.")
    return entries, base_index, donor


def check_parameter_names(recipe: Recipe, method: MergeMethod, where: str) -> None:
    """Every parameter the recipe sets exists for the method; per-model ones are not set as shared only."""
    known = ", ".join(method.params)
    for key in recipe.parameters or {}:
        if key not in method.params:
            raise UserError(f"{where}: parameters.{key} is not a parameter of {method.name} (its parameters: "
                            f"{known}).")
    for i, model in enumerate(recipe.models):
        for key in model.parameters or {}:
            if key not in method.params:
                raise UserError(f"{where}: models[{i}].parameters.{key} is not a parameter of {method.name} (its "
                                f"parameters: {known}).")
            if not method.params[key].per_model:
                raise UserError(f"{where}: models[{i}].parameters.{key}: {key} applies to the whole merge; set it "
                                "under the top-level `parameters:`.")


def resolve_parameter(method: MergeMethod, key: str, sources: list, name: str, t: float, who: str):
    """The first source (model's own, then global) whose setting applies to tensor `name`; else the default."""
    param = method.params[key]
    for source in sources:
        if source and key in source:
            value = evaluate_setting(source[key], name, t, param.kind)
            if value is not None:
                break
    else:
        if param.default is REQUIRED:
            raise UserError(f"merge_method {method.name} needs `{key}` for {who} (tensor {name}); set it under "
                            "that model's parameters or the global ones.")
        value = param.default
    if param.choices is not None and value not in param.choices:
        raise UserError(f"parameter {key}={value!r} is not one of {', '.join(param.choices)}.")
    return value


def merge_rows(name: str, readers: list[ModelTensors], entries: list[InputModel], base_index: int | None,
               donor: int, method: MergeMethod, recipe: Recipe, t: float):
    """One output tensor, yielded as row chunks in order: read from every input (in recipe.dtype, else the promoted
    dtype) and merged. Elementwise methods read and merge a row chunk of each input at a time; methods with an
    in-place sparsifier hold their task vectors (task_arithmetic.frame_stream); the others whole tensors."""
    metas = [r.meta(name) for r in readers]
    if not metas[donor].dtype.is_floating_point:
        yield readers[donor].get(name)  # integer buffers are copied, not averaged
        return
    shapes = {tuple(m.shape) for m in metas}
    if len(shapes) > 1:
        raise UserError(f"Tensor {name} has different shapes in the inputs "
                        f"({', '.join(f'{e.model}: {tuple(m.shape)}' for e, m in zip(entries, metas))}); merged "
                        "models must share their architecture and vocabulary.")
    dtype = read_dtype(metas, recipe)
    shared = {k: resolve_parameter(method, k, [recipe.parameters], name, t, "the merge")
              for k in method.shared()}
    others = [i for i in range(len(entries)) if i != base_index]
    per_model = [{k: resolve_parameter(method, k, [entries[i].parameters, recipe.parameters], name, t, entries[i].model)
                  for k in method.per_model()} for i in others]
    read = lambda i: lambda rows: readers[i].get(name, rows).to(dtype)
    shape = metas[donor].shape
    chunks = row_chunks(shape, torch.empty((), dtype=dtype).element_size(),
                        tensors.ELEMENTWISE_CHUNK_BYTES if method.elementwise else tensors.CHUNK_BYTES)
    if method.elementwise or (method.sparsify_ is not None and base_index is not None and others):
        if not method.elementwise:
            from tunesmith.merge.task_arithmetic import frame_stream

            if len(chunks) == 1:  # every tensor but the embeddings: each input read once, not once per pass
                read = read_once(read)
            yield from frame_stream(read(base_index), [read(i) for i in others], shape, dtype, chunks, shared,
                                    per_model, method.sparsify_, method.consensus)
            return
        for rows in chunks:
            base = read(base_index)(rows) if base_index is not None else None
            yield method.merge(base, [read(i)(rows) for i in others], shared, per_model)
        return
    base = read(base_index)(None) if base_index is not None else None
    yield method.merge(base, [read(i)(None) for i in others], shared, per_model)


def read_dtype(metas, recipe: Recipe) -> torch.dtype:
    """What a tensor is read and merged in: recipe.dtype, else the inputs' promoted dtype."""
    if recipe.dtype is not None:
        return getattr(torch, recipe.dtype)
    dtype = metas[0].dtype
    for m in metas[1:]:
        dtype = torch.promote_types(dtype, m.dtype)
    return dtype


def random_draws(plan, readers: list[ModelTensors], entries: list[InputModel], base_index: int | None, donor: int,
                 method: MergeMethod, recipe: Recipe) -> list[tuple[int, float, torch.dtype]]:
    """DARE's masks in the order the merge loop draws them (dare.MasksAhead's schedule): per floating tensor in plan
    order, per input other than the base with a density below 1, (entries, density, work dtype). Empty for every
    other method (DELLA's probabilities depend on the magnitudes, so its draws are made in place)."""
    from tunesmith.merge.dare import draw_dtype, drop_plan

    if method.sparsify_ is not drop_plan or base_index is None:
        return []
    num_layers = readers[donor].num_layers()
    draws = []
    for name, _, _ in plan:
        metas = [r.meta(name) for r in readers]
        if not metas[donor].dtype.is_floating_point or len({tuple(m.shape) for m in metas}) > 1:
            continue
        t = layer_position(layer_index(name), num_layers)
        dtype = draw_dtype(read_dtype(metas, recipe))
        for i in range(len(entries)):
            if i == base_index:
                continue
            density = resolve_parameter(method, "density", [entries[i].parameters, recipe.parameters], name, t,
                                        entries[i].model)
            if density < 1:
                draws.append((math.prod(metas[donor].shape), density, dtype))
    return draws


def read_once(read: Callable) -> Callable:
    """read(i)(rows) remembered per input, for a tensor in one chunk: frame_stream reads a task vector in each of
    its passes (L1 norm, mask, merge), up to three reads of each input and five of the base (bench/merge.py:
    DARE TIES 0.8 s of 5.9 in reading). The consumers never write into what a read returns."""
    held: dict[int, torch.Tensor] = {}

    def reader(i: int) -> Callable:
        def rows_of(rows):
            if i not in held:
                held[i] = read(i)(rows)
            return held[i]
        return rows_of
    return reader


def plan_tensors(readers: list[ModelTensors], donor: int, recipe: Recipe):
    """[(name, output dtype, shape)] in sorted name order, and whether the head must be untied.

    The names are the donor's. When the donor ties its head to the embeddings but another input has
    its own lm_head.weight, the head is merged too (tied inputs give their embeddings) and the output
    is untied, so a trained head is not dropped on reload."""
    names = set(readers[donor].names())
    untie = TIED_HEAD[0] not in names and any(TIED_HEAD[0] in r.info for r in readers)
    if untie:
        names.add(TIED_HEAD[0])
    plan = []
    for name in sorted(names):
        metas = [r.meta(name) for r in readers]
        dtype = metas[donor].dtype
        if dtype.is_floating_point:
            if recipe.dtype is not None:
                dtype = getattr(torch, recipe.dtype)
            else:
                for m in metas:
                    dtype = torch.promote_types(dtype, m.dtype)
            if recipe.out_dtype is not None:
                dtype = getattr(torch, recipe.out_dtype)
        plan.append((name, dtype, metas[donor].shape))
    return plan, untie


def write_config(donor: ModelTensors, out: Path, recipe: Recipe, untie: bool) -> None:
    """The donor's config.json, with the dtype the tensors were saved in and the head untied when merged."""
    config = dict(donor.config)
    dtype = recipe.out_dtype or recipe.dtype
    if dtype is not None:
        config["dtype"] = dtype
        config.pop("torch_dtype", None)
    if untie:
        config["tie_word_embeddings"] = False
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def write_tokenizer(recipe: Recipe, entries: list[InputModel], folders: list[Path], donor: int, out: Path,
                    scratch: str, where: str) -> None:
    """Copy the tokenizer (and generation config) of tokenizer_source / tokenizer.source (`base`: the donor),
    then set the chat template when the recipe chooses one."""
    from tunesmith.merge.inputs import resolve_reference, same_reference

    source = recipe.tokenizer_donor()
    folder = folders[donor]
    if source not in (None, "base"):
        index = next((i for i, e in enumerate(entries) if same_reference(e.model, source)), None)
        folder = folders[index] if index is not None else resolve_reference(source, Path(scratch))
    copied = [f for f in TOKENIZER_FILES if (folder / f).is_file()]
    for f in copied:
        shutil.copy(folder / f, out / f)
    if not any(f.startswith("tokenizer") for f in copied):
        log.warning("%s holds no tokenizer files; the merged model has none", folder)
    if recipe.chat_template is not None:
        template = choose_template(recipe.chat_template, folders, where)
        if template is not None:
            set_chat_template(out, template)


def choose_template(choice: str, folders: list[Path], where: str) -> str | None:
    """auto: the template most inputs carry (None when none has one); chatml; or the template itself."""
    from collections import Counter

    if choice == "chatml":
        return CHATML
    if choice != "auto":
        return choice
    found = [t.strip() for f in folders if (t := read_template(f))]
    return Counter(found).most_common(1)[0][0] if found else None


def read_template(folder: Path) -> str | None:
    """The chat template stored in a model folder (chat_template.jinja, else tokenizer_config.json's), read
    without loading the tokenizer; None when it has none (or only named templates, a list)."""
    if (folder / "chat_template.jinja").is_file():
        return (folder / "chat_template.jinja").read_text(encoding="utf-8")
    path = folder / "tokenizer_config.json"
    if path.is_file():
        template = json.loads(path.read_text(encoding="utf-8")).get("chat_template")
        return template if isinstance(template, str) else None
    return None


def set_chat_template(out: Path, template: str) -> None:
    """Write the template where transformers 5 reads it (chat_template.jinja), and drop stale copies."""
    (out / "chat_template.jinja").write_text(template, encoding="utf-8")
    (out / "chat_template.json").unlink(missing_ok=True)
    path = out / "tokenizer_config.json"
    if path.is_file():
        config = json.loads(path.read_text(encoding="utf-8"))
        if "chat_template" in config:
            config.pop("chat_template")
            path.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


def write_record(recipe: Recipe, out: Path, seed: int | None) -> None:
    """tunesmith_merge.yaml: the recipe as merged and the seed, so the merge can be rerun."""
    import yaml

    record = recipe.model_dump(mode="json", exclude_none=True)
    record["random_seed"] = seed
    (out / "tunesmith_merge.yaml").write_text(yaml.safe_dump(record, sort_keys=False), encoding="utf-8")


def run_from_cli(config_path: str, out_dir: str | None, seed: int) -> None:
    """`tunesmith merge CONFIG.yaml OUT_DIR [--random-seed N]`."""
    if out_dir is None:
        raise UserError("tunesmith merge CONFIG.yaml OUT_DIR: give the output folder after the config file.")
    summary = run_merge_file(config_path, out_dir, seed)
    print(f"{summary['method']} merge of {len(summary['inputs'])} models ({', '.join(summary['inputs'])}): "
          f"{summary['tensors']} tensors in {summary['seconds']} s, saved to {summary['out']}")
