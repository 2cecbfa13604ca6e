"""Adapters merged into one adapter on the full weight change (tunesmith/merge/adapters.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import build_tiny_model, logits
from test_methods_merge import base_dir  # noqa: F401 (a fixture: the tiny model saved with its tokenizer)

from tunesmith.config import MethodConfig
from tunesmith.errors import UserError
from tunesmith.merge.adapters import merge_adapters, read_lora
from tunesmith.methods.registry import get_method, load_artifact


def trained(base_dir: Path, out: Path, seed: int, name: str = "lora", **settings) -> torch.Tensor:
    """A perturbed adapter of `name` saved in out (naming base_dir); returns its logits."""
    cfg = MethodConfig(name=name, **{"r": 4, "alpha": 8, "dropout": 0.0, **settings})
    model = build_tiny_model()
    get_method(name).apply(model, cfg)
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    get_method(name).save(model, out, cfg, str(base_dir))
    return logits(model)


@pytest.fixture(scope="module")
def adapters(base_dir, tmp_path_factory):
    """Two LoRA adapters of different rank and scaling: plain r 4 alpha 8, rsLoRA r 2 alpha 3."""
    root = tmp_path_factory.mktemp("adapters")
    trained(base_dir, root / "a", seed=5)
    trained(base_dir, root / "b", seed=6, r=2, alpha=3, rslora=True)
    return root / "a", root / "b"


def loaded_logits(folder: Path) -> torch.Tensor:
    model = build_tiny_model()
    load_artifact(model, folder)
    return logits(model)


@pytest.mark.parametrize("rslora", [False, True])
@pytest.mark.parametrize("method", ["linear", "task_arithmetic"])
def test_one_adapter_with_weight_one_reproduces_its_logits(tmp_path, base_dir, rslora, method):
    tuned = trained(base_dir, tmp_path / "in", seed=3, rslora=rslora)
    assert (tuned - logits(build_tiny_model())).abs().max() > 1e-3
    summary = merge_adapters([tmp_path / "in"], [1.0], method, tmp_path / "out")
    assert summary["r"] == 4 and summary["max_relative_error"] < 1e-6
    assert (loaded_logits(tmp_path / "out") - tuned).abs().max() <= 1e-6


def test_exact_merge_is_the_weighted_sum_of_the_weight_changes(tmp_path, adapters):
    a, b = read_lora(adapters[0]), read_lora(adapters[1])
    assert b.scale == pytest.approx(3 / 2 ** 0.5)  # rsLoRA: alpha / sqrt(r)
    summary = merge_adapters(adapters, [0.7, -0.4], "task_arithmetic", tmp_path / "ta", parameters={"lambda": 1.5})
    merged = read_lora(tmp_path / "ta")
    assert merged.r == 6 and merged.scale == 1.0 and set(merged.layers) == set(a.layers)
    for name in a.layers:
        want = 1.5 * (0.7 * a.delta(name) - 0.4 * b.delta(name))
        assert (merged.delta(name) - want).abs().max() <= 1e-6, name
    assert summary["max_relative_error"] < 1e-6
    merge_adapters(adapters, [3.0, 1.0], "linear", tmp_path / "linear")  # normalize: true, as linear.py
    merged = read_lora(tmp_path / "linear")
    for name in a.layers:
        assert (merged.delta(name) - (0.75 * a.delta(name) + 0.25 * b.delta(name))).abs().max() <= 1e-6, name


def test_the_merged_adapter_loads_in_tunesmith_and_in_peft(tmp_path, adapters, base_dir):
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    merge_adapters(adapters, [0.5, 0.5], "task_arithmetic", tmp_path / "out")
    ours = loaded_logits(tmp_path / "out")
    assert (ours - logits(build_tiny_model())).abs().max() > 1e-3
    theirs = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), tmp_path / "out")
    assert (logits(theirs) - ours).abs().max() <= 1e-5


def test_svd_truncation_reports_the_error_it_makes(tmp_path, adapters):
    a, b = read_lora(adapters[0]), read_lora(adapters[1])
    summary = merge_adapters(adapters, [1.0, 1.0], "task_arithmetic", tmp_path / "r3", rank=3)
    merged = read_lora(tmp_path / "r3")
    assert merged.r == 3 and merged.scale == 1.0
    for name in a.layers:
        want = a.delta(name) + b.delta(name)
        measured = ((want - merged.delta(name)).norm() / want.norm()).item()
        assert summary["relative_error"][name] == pytest.approx(measured, rel=1e-4, abs=1e-7)
        assert measured > 1e-3  # rank 6 squeezed into 3
    full = merge_adapters(adapters, [1.0, 1.0], "task_arithmetic", tmp_path / "r6", rank=6)
    assert full["max_relative_error"] < 1e-5


def test_ties_is_computed_on_the_weight_changes(tmp_path, adapters):
    """TIES of tunesmith/merge/ties.py on dW_1, dW_2 with a zero base; rank 32 = min(out, in) keeps it exact."""
    from tunesmith.merge.ties import TIES

    a, b = read_lora(adapters[0]), read_lora(adapters[1])
    summary = merge_adapters(adapters, [1.0, 0.5], "ties", tmp_path / "ties", rank=64, density=0.3)
    merged = read_lora(tmp_path / "ties")
    shared = {"normalize": True, "rescale": False, "lambda": 1.0, "int8_mask": False, "variant": "mergekit"}
    per_model = [{"weight": 1.0, "density": 0.3}, {"weight": 0.5, "density": 0.3}]
    for name in a.layers:
        deltas = [a.delta(name), b.delta(name)]
        want = TIES.merge(torch.zeros_like(deltas[0]), deltas, shared, per_model)
        assert (merged.delta(name) - want).abs().max() <= 1e-5, name
        assert (want == 0).float().mean() > 0.4  # trimmed: not a low-rank sum any more
    assert summary["max_relative_error"] < 1e-5


def test_dare_is_reproducible_by_seed(tmp_path, adapters):
    first = merge_adapters(adapters, [1.0, 1.0], "dare_linear", tmp_path / "d1", rank=8, density=0.5, seed=1)
    again = merge_adapters(adapters, [1.0, 1.0], "dare_linear", tmp_path / "d2", rank=8, density=0.5, seed=1)
    other = merge_adapters(adapters, [1.0, 1.0], "dare_linear", tmp_path / "d3", rank=8, density=0.5, seed=2)
    assert first["relative_error"] == again["relative_error"] != other["relative_error"]


def test_refused_inputs_and_methods(tmp_path, adapters, base_dir):
    trained(base_dir, tmp_path / "bottleneck", seed=1, name="adapter")
    with pytest.raises(UserError, match="tunesmith artifact"):
        merge_adapters([tmp_path / "bottleneck"], [1], "linear", tmp_path / "o")
    with pytest.raises(UserError, match="whole weights"):
        merge_adapters(adapters, [1, 1], "slerp", tmp_path / "o")
    with pytest.raises(UserError, match="give `rank`"):
        merge_adapters(adapters, [1, 1], "ties", tmp_path / "o")
    with pytest.raises(UserError, match="one weight"):
        merge_adapters(adapters, [1], "linear", tmp_path / "o")
    with pytest.raises(UserError, match="not a global parameter"):
        merge_adapters(adapters, [1, 1], "linear", tmp_path / "o", parameters={"lambda": 2})
    assert not (tmp_path / "o").exists()


def test_recipe_with_output_adapter(tmp_path, adapters):
    import yaml

    from tunesmith.merge.run import run_merge_file

    recipe = {"models": [{"model": str(adapters[0]), "parameters": {"weight": 0.7}},
                         {"model": str(adapters[1]), "parameters": {"weight": 0.3}}],
              "merge_method": "ties", "parameters": {"density": 0.5, "normalize": False},
              "output": "adapter", "rank": 64}
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    summary = run_merge_file(str(tmp_path / "recipe.yaml"), str(tmp_path / "out"))
    direct = merge_adapters(adapters, [0.7, 0.3], "ties", tmp_path / "direct", rank=64, density=0.5,
                            parameters={"normalize": False})
    a, b = read_lora(tmp_path / "out"), read_lora(tmp_path / "direct")
    assert summary["mode"] == "svd" and all(torch.equal(a.delta(n), b.delta(n)) for n in b.layers)
    recipe["parameters"]["density"] = [0.2, 0.8]
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    with pytest.raises(UserError, match="single value"):
        run_merge_file(str(tmp_path / "recipe.yaml"), str(tmp_path / "out2"))
    del recipe["output"]
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    with pytest.raises(UserError, match="output: adapter"):
        run_merge_file(str(tmp_path / "recipe.yaml"), str(tmp_path / "out3"))
