"""Adapters merged into one adapter, computed on the full weight change of each layer.

A LoRA adapter changes each adapted linear layer by

    dW_i = s_i B_i A_i,      A_i: (r_i, in), B_i: (out, r_i),  s_i = alpha_i / r_i  (rsLoRA: alpha_i / sqrt(r_i))

The merge methods of tunesmith merge (linear, task_arithmetic, ties, dare_linear, dare_ties; their
files give the formulas) are applied per layer to the task vectors dW_i, with a zero base: a whole-model
merge of base + adapter_i gives the base plus exactly this merged change. PEFT's add_weighted_adapter
instead combines A and B separately for linear/ties/dare, so its product holds cross terms
B_i A_j (i != j) and is not the merge its name promises.

The merged change is written as one PEFT LoRA adapter (alpha = r, so the scale s is 1):

  exact (linear, task_arithmetic, rank unset): the merged change is sum_i c_i dW_i, with c_i = w_i
      (lambda w_i for task arithmetic; divided by sum_i w_i under normalize). Concatenating ranks,
          A = [A_1; A_2; ...]                (r_total, in)
          B = [c_1 s_1 B_1, c_2 s_2 B_2, ...]  (out, r_total)
      gives B A = sum_i c_i s_i B_i A_i exactly (up to float rounding). A layer missing from an
      adapter contributes zero blocks, so every layer has rank r_total = sum_i r_i.
  SVD (any method, `rank` = k): dW = U S V^T, B = U_k S_k^(1/2), A = S_k^(1/2) V_k^T (the best rank-k
      approximation in Frobenius norm, Eckart-Young); layers with min(out, in) < k get zero blocks.

Both report, per layer, the relative error ||dW - B A||_F / ||dW||_F of the factors as saved (fp32),
in the returned summary and in adapter_merge_report.json beside the adapter.

DoRA and VeRA inputs (adapter_inputs.py reads every kind as factors): VeRA is the LoRA factors
B = diag(b) B_v[:out], A = diag(d) A_v[:, :in] with s = 1, so everything above holds for it. A DoRA
change dW_i = diag(k_i) (W0 + s_i B_i A_i) - W0 depends on the base weights W0 (read per layer from
the base model): the exact methods then write a DoRA adapter, exact for any weights (dora_merge.py
derives it: a row scaling D of W0 + low rank), and `rank` writes the SVD of the merged dW as LoRA.
`variant: peft` gives peft's add_weighted_adapter factors instead (peft_variants.py).

Refused, with the reason: a DoRA row whose merged weight keeps no part of W0 (D = 0, no DoRA form), a
DoRA adapter trained on a 4-bit base, DoRA and VeRA under variant: peft, other PEFT types and
tunesmith's own artifact formats, slerp and model_stock (they act on the whole weights W0 + dW, not
on task vectors), and inputs whose layers disagree in shape.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from tunesmith.errors import UserError
from tunesmith.merge.adapter_inputs import A_KEY, B_KEY, M_KEY, AdapterFactors, BaseWeights, read_adapter

log = logging.getLogger(__name__)

ADAPTER_METHODS = ("linear", "task_arithmetic", "ties", "dare_linear", "dare_ties")
EXACT_METHODS = ("linear", "task_arithmetic")
REPORT_NAME = "adapter_merge_report.json"


def read_lora(folder: str | Path, base_model: str | None = None) -> AdapterFactors:
    """One input adapter (LoRA, rsLoRA, DoRA, VeRA) as factors per layer (adapter_inputs.py)."""
    return read_adapter(folder, BaseWeights(base_model or recorded_base([folder])))


def recorded_base(folders) -> str | None:
    """The first base_model_name_or_path any of the adapter folders records."""
    for folder in folders:
        path = Path(folder).expanduser() / "adapter_config.json"
        try:
            name = json.loads(path.read_text(encoding="utf-8")).get("base_model_name_or_path")
        except (OSError, ValueError, AttributeError):
            continue
        if name:
            return name
    return None


def layer_shapes(inputs: list[AdapterFactors]) -> dict[str, tuple[int, int]]:
    """(out, in) of every layer any input adapts, sorted by name; a disagreement is a UserError."""
    shapes: dict[str, tuple[int, int]] = {}
    for x in inputs:
        for name, (a, b) in x.layers.items():
            shape = (b.shape[0], a.shape[1])
            if shapes.setdefault(name, shape) != shape:
                raise UserError(f"Layer {name} is {shapes[name]} in one adapter and {shape} in {str(x.folder)!r}; "
                                "adapters merged together must be trained on the same base model.")
    return dict(sorted(shapes.items()))


def method_parameters(method, weights: list[float], density, parameters: dict | None, n: int):
    """(shared, per_model) as the merge method takes them: its defaults, then `parameters`, `weights`, `density`."""
    from tunesmith.merge.registry import REQUIRED

    parameters = dict(parameters or {})
    for key in parameters:
        if key not in method.shared():
            raise UserError(f"{key!r} is not a global parameter of {method.name} (its global parameters: "
                            f"{', '.join(method.shared())}).")
    shared = {k: parameters.get(k, p.default) for k, p in method.shared().items()}
    densities = density if isinstance(density, (list, tuple)) else [density] * n
    if len(weights) != n or len(densities) != n:
        raise UserError(f"Give one weight (and one density, or a single one) per adapter: {n} adapters, "
                        f"{len(weights)} weights, {len(densities)} densities.")
    if "density" not in method.per_model() and any(d is not None for d in densities):
        raise UserError(f"{method.name} has no density; density applies to ties and dare_*.")
    per_model = []
    for w, d in zip(weights, densities):
        params = {"weight": float(w)}
        if "density" in method.per_model():
            default = method.per_model()["density"].default
            params["density"] = float(d) if d is not None else (None if default is REQUIRED else default)
        per_model.append(params)
    return shared, per_model


def merged_delta(method, deltas: list[torch.Tensor], shared: dict, per_model: list[dict]) -> torch.Tensor:
    """The method applied to the task vectors dW_i (out, in) with a zero base; linear has no base."""
    base = None if method.base == "none" else torch.zeros_like(deltas[0])
    return method.merge(base, deltas, shared, per_model).float()


def exact_coefficients(method_name: str, shared: dict, weights: list[float]) -> list[float]:
    """c_i with merged dW = sum_i c_i dW_i (linear.py and task_arithmetic.py, divisor guards included)."""
    total = sum(weights)
    if method_name == "linear":
        if shared["normalize"] and total == 0:
            raise UserError("linear with normalize: the weights sum to 0; set normalize: false or change them.")
        return [w / total if shared["normalize"] else w for w in weights]
    divisor = total if shared["normalize"] and abs(total) >= 1e-8 else 1.0
    return [shared["lambda"] * w / divisor for w in weights]


def concatenated(inputs: list[AdapterFactors], coefficients: list[float], name: str, shape: tuple[int, int]):
    """A = [A_1; ...] (r_total, in), B = [c_1 s_1 B_1, ...] (out, r_total); zero blocks where a layer is missing."""
    out_f, in_f = shape
    a_blocks, b_blocks = [], []
    for x, c in zip(inputs, coefficients):
        if name in x.layers:
            a, b = x.layers[name]
            a_blocks.append(a.float())
            b_blocks.append(b.float() * (c * x.scale))
        else:
            a_blocks.append(torch.zeros(x.r, in_f))
            b_blocks.append(torch.zeros(out_f, x.r))
    return torch.cat(a_blocks, dim=0), torch.cat(b_blocks, dim=1)


def truncated(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-k factors of delta (out, in): B = U_k S_k^(1/2) (out, k), A = S_k^(1/2) V_k^T (k, in),
    zero-padded to `rank` columns/rows when min(out, in) < rank. SVD in fp64, factors in fp32."""
    u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
    k = min(rank, s.numel())
    root = s[:k].sqrt()
    b = torch.zeros(delta.shape[0], rank, dtype=torch.float64)
    a = torch.zeros(rank, delta.shape[1], dtype=torch.float64)
    b[:, :k] = u[:, :k] * root
    a[:k] = root[:, None] * vh[:k]
    return a.float(), b.float()


def relative_error(delta: torch.Tensor, written: torch.Tensor) -> float:
    """||dW - dW_written||_F / ||dW||_F in fp64 (0 when both are 0); dW_written = B A, or a DoRA layer's change."""
    norm = delta.double().norm().item()
    residual = (delta.double() - written.double()).norm().item()
    return residual / norm if norm > 0 else residual


def merge_adapters(folders: list[str | Path], weights: list[float], method: str, out_dir: str | Path,
                   rank: int | None = None, density=None, seed: int = 0, parameters: dict | None = None,
                   base_model: str | None = None) -> dict:
    """Merge LoRA, rsLoRA, DoRA and VeRA adapters on their full weight changes into one PEFT adapter in out_dir
    (module docstring): LoRA, or DoRA when an exact merge has a DoRA input.

    weights: one per adapter; density: one float (or one per adapter) for ties/dare; rank: truncate by
    SVD to this rank (unset: exact concatenation, linear and task_arithmetic only); parameters: the
    method's global parameters (normalize, lambda, rescale, variant; variant: peft gives peft's
    add_weighted_adapter, peft_variants.py); base_model: where DoRA's W0 and VeRA's layer sizes are read
    (unset: the adapters' base_model_name_or_path). Returns the summary, with the relative Frobenius
    error of every layer."""
    from tunesmith.merge.registry import get_merge_method

    if not folders:
        raise UserError("Give at least one adapter folder to merge.")
    parameters = dict(parameters or {})
    if parameters.get("variant") == "peft":  # peft's combination types (peft_variants.PEFT_METHODS)
        return merge_peft_variant(folders, weights, method, out_dir, rank, density, seed, parameters, base_model)
    check_method_and_rank(method, rank)
    spec = get_merge_method(method)
    base = BaseWeights(base_model or recorded_base(folders))
    inputs = [read_adapter(f, base) for f in folders]
    shapes = layer_shapes(inputs)
    shared, per_model = method_parameters(spec, list(weights), density, parameters, len(inputs))
    coefficients = exact_coefficients(method, shared, [p["weight"] for p in per_model]) if rank is None else None
    dora = any(x.kind == "dora" for x in inputs)
    why = "Merging DoRA adapters (their change depends on W0)"
    tensors, errors = {}, {}
    from tunesmith.methods.io import PREFIX

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # dare draws its masks from the global RNG: layers sorted, adapters in order
        for name, shape in shapes.items():
            w0 = base.weight(name, why) if dora else None
            if rank is None and dora:
                from tunesmith.merge.dora_merge import dora_delta, dora_factors

                a, b, m, delta = dora_factors(inputs, coefficients, name, w0)
                errors[name] = relative_error(delta, dora_delta(a, b, m, w0))
                tensors[f"{PREFIX}{name}{M_KEY}"] = m.contiguous()
            else:
                deltas = [x.delta(name, w0) for x in inputs]
                deltas = [d if d is not None else torch.zeros(shape) for d in deltas]
                delta = merged_delta(spec, deltas, shared, per_model)
                a, b = concatenated(inputs, coefficients, name, shape) if rank is None else truncated(delta, rank)
                errors[name] = relative_error(delta, b.double() @ a.double())
            tensors[f"{PREFIX}{name}{A_KEY}"] = a.contiguous()
            tensors[f"{PREFIX}{name}{B_KEY}"] = b.contiguous()
    r_out = rank if rank is not None else sum(x.r for x in inputs)
    kind = "dora" if rank is None and dora else "lora"
    summary = {"method": method, "inputs": [str(x.folder) for x in inputs], "input_kinds": [x.kind for x in inputs],
               "weights": [p["weight"] for p in per_model], "mode": "exact" if rank is None else "svd",
               "output_kind": kind, "r": r_out, "seed": seed,
               "max_relative_error": max(errors.values(), default=0.0), "relative_error": errors, "out": str(out_dir)}
    write_adapter(out_dir, tensors, output_config(inputs, shapes, r_out, use_dora=kind == "dora"), summary)
    log.info("%s merge of %d adapters into %s (%s r=%d, %s): max relative error %.3g", method, len(inputs), out_dir,
             kind, r_out, summary["mode"], summary["max_relative_error"])
    return summary


def check_method_and_rank(method: str, rank: int | None) -> None:
    """UserError unless `method` merges adapters on their changes and `rank` fits it (unset: an exact method)."""
    if method not in ADAPTER_METHODS:
        why = (" (it acts on the whole weights W0 + dW, not on task vectors)"
               if method in ("slerp", "model_stock") else "")
        raise UserError(f"merge_method {method!r} cannot merge adapters into an adapter{why}; supported: "
                        f"{', '.join(ADAPTER_METHODS)} (and peft's combination types under variant: peft).")
    if rank is None and method not in EXACT_METHODS:
        raise UserError(f"merge_method {method} changes the weights entry by entry, so the merged change is no "
                        "longer low-rank: give `rank` to write it truncated by SVD (rank = min(out, in) is exact).")
    check_rank(rank)


def check_rank(rank) -> None:
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise UserError(f"rank={rank!r} must be a positive integer.")


PEFT_PARAMETERS = {"majority_sign_method": str, "svd_clamp": float, "svd_full_matrices": bool}


def merge_peft_variant(folders, weights, method: str, out_dir, rank: int | None, density, seed: int,
                       parameters: dict, base_model: str | None) -> dict:
    """variant: peft: what peft's add_weighted_adapter(combination_type=method) writes (peft_variants.py); rank
    is its svd_rank, and parameters may carry its majority_sign_method, svd_clamp and svd_full_matrices. The
    report's relative error is against the weighted sum of the changes, sum_i w_i dW_i: the cross terms' share
    for linear."""
    from tunesmith.merge.peft_variants import peft_factors
    from tunesmith.methods.io import PREFIX

    other = sorted(set(parameters) - {"variant", *PEFT_PARAMETERS})
    if other:
        raise UserError(f"variant: peft takes weights, density, rank (svd_rank) and {', '.join(PEFT_PARAMETERS)} "
                        f"only ({', '.join(other)} do not exist in peft's add_weighted_adapter).")
    bad = [k for k, kind in PEFT_PARAMETERS.items() if k in parameters and not isinstance(parameters[k], kind)
           and not (kind is float and isinstance(parameters[k], int) and not isinstance(parameters[k], bool))]
    if bad:
        raise UserError(f"variant: peft: {', '.join(f'{k} must be a {PEFT_PARAMETERS[k].__name__}' for k in bad)}.")
    check_rank(rank)
    densities = set(density) if isinstance(density, (list, tuple)) else {density}
    if len(densities) != 1:
        raise UserError("variant: peft takes one density for all adapters, as peft's add_weighted_adapter does.")
    if len(weights) != len(folders):
        raise UserError(f"Give one weight per adapter: {len(folders)} adapters, {len(weights)} weights.")
    base = BaseWeights(base_model or recorded_base(folders))
    inputs = [read_adapter(f, base) for f in folders]
    shapes = layer_shapes(inputs)
    order = base.module_order() if method.startswith("dare") else None  # peft's draw order
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        factors, r_out = peft_factors(inputs, [float(w) for w in weights], method, densities.pop(), order, rank,
                                      parameters.get("majority_sign_method", "total"), parameters.get("svd_clamp"),
                                      parameters.get("svd_full_matrices", True))
    tensors, errors = {}, {}
    for name in shapes:
        a, b = factors[name]
        want = sum(w * x.low_rank(name) for x, w in zip(inputs, weights) if name in x.layers)
        errors[name] = relative_error(want, b.double() @ a.double())
        tensors[f"{PREFIX}{name}{A_KEY}"], tensors[f"{PREFIX}{name}{B_KEY}"] = a, b
    summary = {"method": method, "variant": "peft", "inputs": [str(x.folder) for x in inputs],
               "weights": [float(w) for w in weights], "mode": "peft", "output_kind": "lora", "r": r_out,
               "seed": seed, "relative_error_against": "sum_i w_i dW_i",
               "max_relative_error": max(errors.values(), default=0.0), "relative_error": errors, "out": str(out_dir)}
    write_adapter(out_dir, tensors, output_config(inputs, shapes, r_out), summary)
    return summary


def output_config(inputs: list[AdapterFactors], shapes: dict, r: int, use_dora: bool = False) -> dict:
    """adapter_config.json of the merged adapter: LoRA (or DoRA), alpha = r (scale 1), the inputs' base, targets."""
    from tunesmith.methods.io import _PEFT_DEFAULTS

    bases = {x.raw.get("base_model_name_or_path") for x in inputs}
    if len(bases) > 1:
        log.warning("the adapters name different base models (%s); the merged adapter names the first's",
                    ", ".join(sorted(map(str, bases))))
    targets = {json.dumps(x.raw.get("target_modules"), sort_keys=True) for x in inputs}
    target_modules = inputs[0].raw.get("target_modules") if len(targets) == 1 else sorted(shapes)
    return dict(sorted({
        **_PEFT_DEFAULTS,
        "base_model_name_or_path": inputs[0].raw.get("base_model_name_or_path"), "bias": "none",
        "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True, "lora_alpha": r,
        "lora_dropout": 0.0, "peft_type": "LORA", "r": r, "target_modules": target_modules,
        "task_type": inputs[0].raw.get("task_type", "CAUSAL_LM"), "use_rslora": False, "use_dora": use_dora,
    }.items()))


def write_adapter(out_dir: str | Path, tensors: dict, config: dict, summary: dict) -> None:
    from tunesmith.files import atomic_save_safetensors, atomic_write_json
    from tunesmith.methods.io import CONFIG_NAME, WEIGHTS_NAME

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_save_safetensors(tensors, out / WEIGHTS_NAME)
    atomic_write_json(out / CONFIG_NAME, config)
    atomic_write_json(out / REPORT_NAME, summary)


# ---------------------------------------------------------------------------------------------
# The recipe form: `output: adapter` in a mergekit recipe (tunesmith merge CONFIG.yaml OUT_DIR)

NOT_FOR_ADAPTERS = ("dtype", "out_dtype", "tokenizer_source", "tokenizer", "chat_template")


def merge_recipe_adapters(recipe, out_dir: str | Path, seed: int | None, where: str) -> dict:
    """A recipe whose `models:` are LoRA adapter folders, merged into one adapter (`rank:` for SVD).
    Parameters are scalars (no per-tensor filters or gradients); base_model, when given, is not an input but
    where DoRA's W0 and VeRA's layer sizes are read."""
    import time

    start = time.perf_counter()
    bad = [k for k in NOT_FOR_ADAPTERS if getattr(recipe, k) is not None]
    if bad:
        raise UserError(f"{where}: {', '.join(bad)} does not apply to `output: adapter` (the adapter is saved in "
                        "fp32 and carries no tokenizer).")
    shared = {k: scalar(v, f"parameters.{k}", where) for k, v in (recipe.parameters or {}).items()}
    per_model_keys = ("weight", "density")
    weights, densities = [], []
    for i, entry in enumerate(recipe.models):
        own = dict(entry.parameters or {})
        for key in own:
            if key not in per_model_keys:
                raise UserError(f"{where}: models[{i}].parameters.{key} is not a per-adapter parameter "
                                f"(those are {', '.join(per_model_keys)}).")
        values = {k: scalar(own[k], f"models[{i}].parameters.{k}", where) if k in own else shared.get(k)
                  for k in per_model_keys}
        if values["weight"] is None:
            raise UserError(f"{where}: models[{i}] ({entry.model}) needs a weight (its own or the global one).")
        weights.append(float(values["weight"]))
        densities.append(None if values["density"] is None else float(values["density"]))
    parameters = {k: v for k, v in shared.items() if k not in per_model_keys}
    summary = merge_adapters([e.model for e in recipe.models], weights, recipe.merge_method, out_dir,
                             rank=recipe.rank, density=densities, seed=0 if seed is None else seed,
                             parameters=parameters, base_model=recipe.base_model)
    summary.update(tensors=2 * len(summary["relative_error"]), seconds=round(time.perf_counter() - start, 2))
    return summary


def scalar(setting, key: str, where: str):
    """A plain YAML scalar; per-tensor filters and layer gradients do not apply to an adapter merge."""
    if isinstance(setting, (bool, int, float, str)):
        return setting
    raise UserError(f"{where}: {key} must be a single value for `output: adapter` (filters and gradients are "
                    "not supported there).")
