"""`tunesmith merge` for every method, and the registry's coverage of the config's method names."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import build_tiny_model, build_tiny_tokenizer, ids, logits

from tunesmith.commands.artifacts import merge
from tunesmith.commands.infer import load_for_inference
from tunesmith.config import MethodConfig, load_config
from tunesmith.errors import UserError
from tunesmith.methods.registry import METHODS, get_method, load_artifact

DOCS = Path(__file__).parent.parent / "docs" / "methods"
IA3 = {"peft_type": "IA3", "target_modules": ["k_proj", "down_proj"], "feedforward_modules": ["down_proj"]}
MERGEABLE = {
    "lora": {}, "lora_fa": {}, "dora": {}, "vera": {"r": 8}, "delta_lora": {},
    "full": {}, "freeze": {"trainable_blocks": 1}, "peft": {"peft_config": IA3},
}


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("base")
    build_tiny_model().save_pretrained(folder)
    build_tiny_tokenizer().save_pretrained(folder)
    return folder


def trained_artifact(name: str, base_dir: Path, out: Path) -> torch.Tensor:
    """Apply `name`, perturb what trains, save the artifact naming base_dir; return the tuned logits."""
    if name == "peft":
        pytest.importorskip("peft")
    cfg = MethodConfig(name=name, **{"r": 4, "alpha": 8, "dropout": 0.0, **MERGEABLE.get(name, {})})
    method = get_method(name)
    model = build_tiny_model()
    method.apply(model, cfg)
    torch.manual_seed(5)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    if method.after_step:
        method.after_step(model)
    method.save(model, out, cfg, str(base_dir))
    return logits(model)


@pytest.mark.parametrize("name", sorted(MERGEABLE))
def test_merge_command_gives_a_plain_model_with_the_same_logits(tmp_path, base_dir, name):
    from transformers import AutoModelForCausalLM

    tuned = trained_artifact(name, base_dir, tmp_path / "artifact")
    assert (tuned - logits(build_tiny_model())).abs().max() > 1e-3
    merge(str(tmp_path / "artifact"), str(tmp_path / "merged"), None)  # base model from the artifact
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert (logits(merged) - tuned).abs().max() <= 1e-4
    assert all(k.count("lora") + k.count("vera") + k.count("adapter") == 0 for k in merged.state_dict())


def test_merge_refuses_bottleneck_adapters(tmp_path, base_dir):
    trained_artifact("adapter", base_dir, tmp_path / "artifact")
    with pytest.raises(UserError, match="cannot be merged"):
        merge(str(tmp_path / "artifact"), str(tmp_path / "merged"), None)


def test_generate_with_any_artifact(tmp_path, base_dir):
    """--adapter takes any method's artifact (here: bottleneck adapters, tunesmith's own format)."""
    tuned = trained_artifact("adapter", base_dir, tmp_path / "artifact")
    model, _ = load_for_inference(str(base_dir), str(tmp_path / "artifact"))
    assert (logits(model) - tuned).abs().max() == 0


def test_every_configurable_method_is_registered_and_documented():
    """method.name accepts exactly the registered methods (the registry is the one list), each documented."""
    names = list(METHODS)
    for name in names:
        peft_config = {"peft_type": "IA3"} if name == "peft" else None
        assert MethodConfig(name=name, peft_config=peft_config).name == name
        assert get_method(name).name == name
        page = DOCS / f"{name}.md"
        assert page.is_file(), page
        assert "arXiv" in page.read_text() or name in ("full", "peft"), page


def test_not_an_artifact_folder(tmp_path):
    with pytest.raises(UserError, match="neither"):
        load_artifact(build_tiny_model(), tmp_path)


def test_an_unregistered_method_name_is_a_config_error():
    with pytest.raises(UserError, match="unknown method 'lorax'; known: lora, "):
        load_config(None, ["method.name=lorax"])


def test_lora_plus_only_for_the_lora_family():
    assert load_config(None, ["method.name=dora", "method.lora_plus_ratio=16"]).method.lora_plus_ratio == 16
    with pytest.raises(UserError, match="lora_plus_ratio"):
        load_config(None, ["method.name=vera", "method.lora_plus_ratio=16"])
