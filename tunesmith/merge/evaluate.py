"""`tunesmith merge RECIPE OUT --eval EVAL.yaml [--eval ...] [--sweep KEY=V1,V2,...]`: every input and every
merge scored on the same held-out sets in one run.

Each --eval is a tunesmith config (model, data.test, eval: metrics, generation settings), as `tunesmith
eval` takes it: its test split is one held-out set, scored by evaluate/task.py (the metrics registry).
The rows of the table are the recipe's inputs (the base model, each model or adapter; an adapter is
scored on the --eval config's model, which should be the base it was trained on) and the merge; each
(eval set, metric) is a column. Each model is loaded once, with the first --eval config's model options,
and scored on every set; one model is in memory at a time.

--sweep KEY=V1,V2,... merges once per value (several --sweep: every combination), each into
OUT/<KEY=V...>/, and scores each. Keys:

    weight=v        the first weighted model gets v and the other weighted models (1 - v) / (N - 1) each:
                    a mixing proportion (with two models: v and 1 - v). The base of task-vector methods is
                    not weighted.
    models.I.KEY=v  model I's own KEY (weight, density, ...), 0-based in recipe order.
    KEY=v           any other parameter of the method: per-model ones (density, gamma, epsilon) set for every
                    model, global ones (lambda, t, normalize, ...) under `parameters:`.

The table (markdown) is printed and written to OUT/merge_eval.md, with the scores as JSON in
OUT/merge_eval.json.
"""

from __future__ import annotations

import itertools
import json
import logging
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from tunesmith.errors import UserError

log = logging.getLogger(__name__)
TABLE_NAME, JSON_NAME = "merge_eval.md", "merge_eval.json"
MODEL_KEY = re.compile(r"^models\.(\d+)\.(\w+)$")


@dataclass(frozen=True)
class Scored:
    name: str  # the row's label
    path: str  # what is loaded: a model folder, a .gguf file, a built-in model name, or an adapter folder
    kind: str  # "model" or "adapter"
    base: str | None = None  # an adapter's base when the recipe names it (BASE+ADAPTER)


def parse_sweeps(sweeps: list[str]) -> list[tuple[str, list[float]]]:
    """["weight=0.3,0.5"] -> [("weight", [0.3, 0.5])]; a malformed one is a UserError naming it."""
    out = []
    for text in sweeps:
        key, eq, values = text.partition("=")
        try:
            numbers = [float(v) for v in values.split(",") if v.strip()]
        except ValueError:
            numbers = []
        if not eq or not key.strip() or not numbers:
            raise UserError(f"--sweep {text!r}: give KEY=V1,V2,... with numbers (e.g. --sweep weight=0.3,0.5,0.7).")
        out.append((key.strip(), numbers))
    return out


def weighted_indices(recipe) -> list[int]:
    """The models that take a weight: all but the base of a method that has one."""
    from tunesmith.merge.inputs import same_reference
    from tunesmith.merge.registry import get_merge_method

    has_base = recipe.output != "adapter" and get_merge_method(recipe.merge_method).base == "required"
    return [i for i, e in enumerate(recipe.models)
            if not (has_base and recipe.base_model and same_reference(e.model, recipe.base_model))]


def with_setting(recipe, key: str, value: float):
    """A copy of the recipe with one sweep setting applied (module docstring)."""
    from tunesmith.merge.registry import get_merge_method

    out = recipe.model_copy(deep=True)

    def set_own(i: int, name: str, v: float) -> None:
        if not 0 <= i < len(out.models):
            raise UserError(f"--sweep models.{i}.{name}: the recipe has {len(out.models)} models (0-based).")
        out.models[i].parameters = {**(out.models[i].parameters or {}), name: v}

    match = MODEL_KEY.match(key)
    if match:
        set_own(int(match.group(1)), match.group(2), value)
        return out
    if key == "weight":
        weighted = weighted_indices(out)
        rest = (1 - value) / (len(weighted) - 1) if len(weighted) > 1 else None
        for j, i in enumerate(weighted):
            set_own(i, "weight", value if j == 0 else rest)
        return out
    params = get_merge_method(out.merge_method).params
    if key not in params:
        raise UserError(f"--sweep {key}: not a parameter of {out.merge_method} (its parameters: "
                        f"{', '.join(params)}; or weight, or models.I.KEY).")
    if params[key].per_model and out.output != "adapter":
        for i in weighted_indices(out):
            set_own(i, key, value)
    elif params[key].per_model:  # adapters: density lives on each model too
        for i in range(len(out.models)):
            set_own(i, key, value)
    else:
        out.parameters = {**(out.parameters or {}), key: value}
    return out


def sweep_points(recipe, sweeps: list[tuple[str, list[float]]]) -> list[tuple[str, object]]:
    """(label, recipe) for every combination of the sweep values; no sweep: [("merge", recipe)]."""
    if not sweeps:
        return [("merge", recipe)]
    points = []
    for values in itertools.product(*(v for _, v in sweeps)):
        point = recipe
        for (key, _), value in zip(sweeps, values):
            point = with_setting(point, key, value)
        points.append((" ".join(f"{k}={v:g}" for (k, _), v in zip(sweeps, values)), point))
    return points


def input_targets(recipe) -> list[Scored]:
    """The base (when the recipe names one that is not listed), then each model of the recipe."""
    from tunesmith.merge.inputs import is_adapter_folder, same_reference

    refs = [e.model for e in recipe.models]
    if recipe.base_model and not any(same_reference(r, recipe.base_model) for r in refs):
        refs.insert(0, recipe.base_model)
    out = []
    for ref in refs:
        base, plus, adapter = ref.partition("+")
        if plus and Path(adapter).expanduser().is_dir() and not Path(ref).expanduser().exists():
            out.append(Scored(ref, adapter, "adapter", base))
        elif is_adapter_folder(Path(ref).expanduser()):
            out.append(Scored(ref, ref, "adapter"))
        else:
            out.append(Scored(ref, ref, "model"))
    return out


def score_targets(targets: list[Scored], configs: list) -> list[dict]:
    """{set label: {metric: score}} per target, and which scores are shares of 0-100."""
    from tunesmith.commands.infer import load_target
    from tunesmith.commands.train import score_test_set

    first = configs[0][1]
    results = []
    for target in targets:
        cfg = first
        if target.base:
            cfg = first.model_copy(update={"model": first.model.model_copy(update={"name_or_path": target.base})})
        log.info("scoring %s on %d held-out sets", target.name, len(configs))
        model, tokenizer = load_target(cfg, target.path, target.kind)
        scores, percent = {}, {}
        for label, eval_cfg in configs:
            evaluation = score_test_set(model, tokenizer, eval_cfg, f"{target.name} on {label}")
            scores[label] = evaluation.scores
            percent.update({f"{label}: {k}": evaluation.percent(k) for k in evaluation.scores})
        del model, tokenizer
        results.append({"name": target.name, "path": target.path, "kind": target.kind, "scores": scores,
                        "percent": percent})
    return results


def table(rows: list[dict]) -> str:
    """Markdown: one row per scored model, one column per (held-out set, metric)."""
    from tunesmith.evaluate.report import format_value, label

    columns = list(dict.fromkeys((s, k) for r in rows for s, scores in r["scores"].items() for k in scores))
    header = lambda cells: "| " + " | ".join(cells) + " |"
    lines = [header(["model", *(f"{s}: {label(k)}" for s, k in columns)]), header(["---"] * (len(columns) + 1))]
    for r in rows:
        cells = [format_value(r["scores"][s].get(k), r["percent"].get(f"{s}: {k}", True)) for s, k in columns]
        lines.append(header([r["name"], *cells]))
    return "\n".join(lines)


def eval_configs(paths: list[str]) -> list[tuple[str, object]]:
    """(label, Config) of every --eval file; the label is the file's stem (made unique)."""
    from tunesmith.config import load_config

    out = []
    for path in paths:
        cfg = load_config(path, [])
        if not cfg.data.test:
            raise UserError(f"--eval {path}: data.test is not set; each --eval config names a held-out test file.")
        label, i = Path(path).stem, 2
        while any(label == seen for seen, _ in out):
            label, i = f"{Path(path).stem} ({i})", i + 1
        out.append((label, cfg))
    return out


def merge_and_evaluate(recipe_path: str, out_dir: str, seed: int | None, eval_paths: list[str],
                       sweeps: list[str]) -> dict:
    """Merge the recipe (once, or once per sweep point under out_dir), score the inputs and every merge on
    each --eval set, print the table and write it with the JSON to out_dir. Returns the JSON."""
    from tunesmith.files import atomic_write_json, atomic_write_text
    from tunesmith.merge.config import read_recipe
    from tunesmith.merge.run import merge_recipe

    configs = eval_configs(eval_paths)
    recipe = read_recipe(recipe_path)
    points = sweep_points(recipe, parse_sweeps(sweeps))
    out = Path(out_dir)
    merged = []
    for label, point in points:
        folder = out if len(points) == 1 and not sweeps else out / re.sub(r"[^\w.=-]+", "_", label)
        merge_recipe(point, folder, seed, where=repr(str(recipe_path)))
        merged.append(Scored(label, str(folder), "adapter" if point.output == "adapter" else "model"))
    rows = score_targets(input_targets(recipe) + merged, configs)
    text = table(rows)
    print(text, file=sys.stderr)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / TABLE_NAME, text + "\n")
    report = {"recipe": str(recipe_path), "sets": {label: cfg.data.test for label, cfg in configs},
              "seed": seed, "rows": rows}
    atomic_write_json(out / JSON_NAME, report)
    print(json.dumps({r["name"]: r["scores"] for r in rows}, indent=2))
    return report
