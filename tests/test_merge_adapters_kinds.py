"""Adapter merges with DoRA and VeRA inputs (merge/adapter_inputs.py, dora_merge.py) and peft's
add_weighted_adapter variants (merge/peft_variants.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import build_tiny_model, logits
from test_merge_adapters import loaded_logits, trained
from test_methods_merge import base_dir  # noqa: F401 (a fixture: the tiny model saved with its tokenizer)

from tunesmith.errors import UserError
from tunesmith.merge.adapters import merge_adapters, read_lora
from tunesmith.merge.dora_merge import dora_delta


def weight_of(model, layer: str) -> torch.Tensor:
    return dict(model.named_parameters())[f"{layer}.weight"].detach()


@pytest.mark.parametrize("kind,settings", [("dora", {}), ("dora", {"rslora": True}), ("vera", {"r": 8})])
def test_one_dora_or_vera_adapter_with_weight_one_reproduces_its_logits(tmp_path, base_dir, kind, settings):
    tuned = trained(base_dir, tmp_path / "in", seed=3, name=kind, **settings)
    assert (tuned - logits(build_tiny_model())).abs().max() > 1e-3
    summary = merge_adapters([tmp_path / "in"], [1.0], "task_arithmetic", tmp_path / "out")
    assert summary["output_kind"] == ("dora" if kind == "dora" else "lora")
    assert summary["max_relative_error"] < 1e-6
    assert (loaded_logits(tmp_path / "out") - tuned).abs().max() <= 1e-6


@pytest.fixture(scope="module")
def kinds(base_dir, tmp_path_factory):
    """A DoRA, a LoRA and a VeRA adapter on the tiny base."""
    root = tmp_path_factory.mktemp("kinds")
    trained(base_dir, root / "dora", seed=11, name="dora")
    trained(base_dir, root / "lora", seed=12, r=2, alpha=3, rslora=True)
    trained(base_dir, root / "vera", seed=13, name="vera", r=8)
    return root


def test_a_weighted_sum_with_dora_is_an_exact_dora_adapter(tmp_path, kinds, base_dir):
    """W0 + sum_i c_i dW_i per layer, with dW of DoRA = diag(k)(W0 + sBA) - W0; loads in peft alike."""
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    folders = [kinds / "dora", kinds / "lora", kinds / "vera"]
    inputs = [read_lora(f) for f in folders]
    assert [x.kind for x in inputs] == ["dora", "lora", "vera"]
    summary = merge_adapters(folders, [0.6, -0.5, 0.9], "task_arithmetic", tmp_path / "m",
                             parameters={"lambda": 1.3})
    merged = read_lora(tmp_path / "m")
    assert merged.kind == "dora" and merged.r == 4 + 2 + 8 and merged.scale == 1.0
    base = build_tiny_model()
    for name in inputs[0].layers:
        w0 = weight_of(base, name)
        want = sum(1.3 * c * x.delta(name, w0).double() for c, x in zip((0.6, -0.5, 0.9), inputs))
        a, b = merged.layers[name]
        got = dora_delta(a, b, merged.magnitudes[name], w0)
        assert (got - want).abs().max() <= 1e-6, name
    assert summary["max_relative_error"] < 1e-5
    ours = loaded_logits(tmp_path / "m")
    theirs = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), tmp_path / "m")
    assert (logits(theirs) - ours).abs().max() <= 1e-5
    assert (ours - logits(base)).abs().max() > 1e-3


def test_svd_of_a_dora_merge_is_the_merged_change(tmp_path, kinds):
    from tunesmith.merge.ties import TIES

    summary = merge_adapters([kinds / "dora", kinds / "vera"], [1.0, 0.5], "ties", tmp_path / "t", rank=64,
                             density=0.4)
    merged, dora, vera = read_lora(tmp_path / "t"), read_lora(kinds / "dora"), read_lora(kinds / "vera")
    assert merged.kind == "lora" and summary["output_kind"] == "lora"
    base = build_tiny_model()
    shared = {"normalize": True, "rescale": False, "lambda": 1.0, "int8_mask": False, "variant": "mergekit"}
    for name in dora.layers:
        w0 = weight_of(base, name)
        want = TIES.merge(torch.zeros_like(w0), [dora.delta(name, w0), vera.delta(name)], shared,
                          [{"weight": 1.0, "density": 0.4}, {"weight": 0.5, "density": 0.4}])
        assert (merged.delta(name) - want).abs().max() <= 1e-5, name


def test_what_has_no_exact_form_is_refused_with_the_reason(tmp_path, kinds, base_dir):
    # one DoRA adapter with c = -1/(k - 1) on a row: D = 1 + c (k - 1) = 0 there, no DoRA form
    dora = read_lora(kinds / "dora")
    name = next(iter(dora.layers))
    k = dora.row_factor(name, weight_of(build_tiny_model(), name))
    row = int((k - 1).abs().argmax())
    c = float(-1 / (k[row] - 1))
    with pytest.raises(UserError, match=f"Layer {name}, row {row}: .*no DoRA form"):
        merge_adapters([kinds / "dora"], [c], "task_arithmetic", tmp_path / "z")
    assert merge_adapters([kinds / "dora"], [c], "task_arithmetic", tmp_path / "z2", rank=4)["output_kind"] == "lora"
    # DoRA trained on a 4-bit base: its magnitude belongs to the dequantized weights
    qdora = tmp_path / "run"
    trained(base_dir, qdora / "adapter", seed=1, name="dora")
    (qdora / "config.yaml").write_text("model: {quantization: nf4}\n")
    with pytest.raises(UserError, match="trained on a nf4 base"):
        merge_adapters([qdora / "adapter"], [1.0], "linear", tmp_path / "q")
    with pytest.raises(UserError, match="variant: peft takes LoRA and rsLoRA adapters only"):
        merge_adapters([kinds / "dora", kinds / "lora"], [1, 1], "linear", tmp_path / "p",
                       parameters={"variant": "peft"})
    assert not (tmp_path / "z").exists() and not (tmp_path / "q").exists()


# ---------------------------------------------------------------------------------------------
# variant: peft

@pytest.fixture(scope="module")
def same_rank(base_dir, tmp_path_factory):
    """Two LoRA adapters of rank 4, one plain (alpha 8), one rsLoRA (alpha 3), as peft's variants need."""
    root = tmp_path_factory.mktemp("same_rank")
    trained(base_dir, root / "a", seed=21)
    trained(base_dir, root / "b", seed=22, alpha=3, rslora=True)
    return root / "a", root / "b"


def peft_merge(base_dir: Path, adapters, weights, combination_type: str, density, seed: int, monkeypatch,
               **options):
    """peft's add_weighted_adapter on the two adapters (options: its svd_rank, svd_clamp, majority_sign_method...);
    the RNG seeded where its merge loop starts."""
    peft = pytest.importorskip("peft")
    import peft.tuners.lora.model as lora_model
    from transformers import AutoModelForCausalLM

    model = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), adapters[0],
                                           adapter_name="a")
    model.load_adapter(adapters[1], adapter_name="b")
    freeze = lora_model._freeze_adapter

    def seeded_freeze(*args):  # called after the new adapter's init draws, right before the merge loop
        freeze(*args)
        torch.manual_seed(seed)

    monkeypatch.setattr(lora_model, "_freeze_adapter", seeded_freeze)
    model.add_weighted_adapter(["a", "b"], weights, "m", combination_type=combination_type, density=density,
                               **options)
    return {name[len("base_model.model."):]: (m.lora_A["m"].weight.detach(), m.lora_B["m"].weight.detach())
            for name, m in model.named_modules() if hasattr(m, "lora_A") and "m" in m.lora_A}


# every combination type of peft 0.21, and its options: (type, svd_rank, {option: value}) -> the output rank
PEFT_TYPES = [("linear", None, {}, 4), ("ties", None, {}, 4), ("dare_linear", None, {}, 4), ("dare_ties", None, {}, 4),
              ("magnitude_prune", None, {}, 4), ("ties", None, {"majority_sign_method": "frequency"}, 4),
              ("cat", None, {}, 8), ("svd", None, {}, 4), ("svd", 3, {"svd_clamp": 0.9}, 3),
              ("ties_svd", None, {}, 4), ("dare_linear_svd", None, {}, 4),
              ("dare_ties_svd", 5, {"majority_sign_method": "frequency", "svd_full_matrices": False}, 5),
              ("magnitude_prune_svd", None, {}, 4)]


@pytest.mark.parametrize("method,rank,options,r_out", PEFT_TYPES,
                         ids=[f"{m}-{rank}-{'-'.join(o)}" for m, rank, o, _ in PEFT_TYPES])
def test_variant_peft_equals_add_weighted_adapter(tmp_path, base_dir, same_rank, method, rank, options, r_out,
                                                   monkeypatch):
    density = None if method in ("linear", "cat", "svd") else 0.5
    svd = {"svd_rank": rank} if rank else {}
    theirs = peft_merge(base_dir, same_rank, [0.7, -0.4], method, density, 3, monkeypatch, **svd, **options)
    summary = merge_adapters(same_rank, [0.7, -0.4], method, tmp_path / "m", rank=rank, density=density, seed=3,
                             parameters={"variant": "peft", **options})
    ours = read_lora(tmp_path / "m")
    assert ours.r == r_out and ours.scale == 1.0 and set(ours.layers) == set(theirs)
    for name, (a, b) in theirs.items():
        assert (ours.layers[name][0] - a).abs().max() <= 1e-6, name
        assert (ours.layers[name][1] - b).abs().max() <= 1e-6, name
    if method == "linear":  # the cross terms: B A is not 0.7 dW_a - 0.4 dW_b
        assert summary["max_relative_error"] > 0.1
    if method == "cat":  # exact: both changes, side by side
        assert summary["max_relative_error"] < 1e-6


def test_variant_peft_refuses_what_peft_does_not_take(tmp_path, same_rank):
    with pytest.raises(UserError, match="normalize do not exist in peft's add_weighted_adapter"):
        merge_adapters(same_rank, [0.7, -0.4], "svd", tmp_path / "m", parameters={"variant": "peft", "normalize": 1})
    with pytest.raises(UserError, match="svd_clamp must be a float"):
        merge_adapters(same_rank, [0.7, -0.4], "svd", tmp_path / "m", parameters={"variant": "peft",
                                                                                    "svd_clamp": "high"})
    with pytest.raises(UserError, match="majority_sign_method='most' must be total or frequency"):
        merge_adapters(same_rank, [0.7, -0.4], "ties", tmp_path / "m", density=0.5,
                       parameters={"variant": "peft", "majority_sign_method": "most"})
    with pytest.raises(UserError, match="is not one of them"):
        merge_adapters(same_rank, [0.7, -0.4], "slerp", tmp_path / "m", parameters={"variant": "peft"})
