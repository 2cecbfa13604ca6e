"""The PEFT adapter format, both ways: our adapters load in peft and peft's load in ours, same logits."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import build_tiny_model, ids, logits
from safetensors.torch import load_file, save_file

from tunesmith.config import MethodConfig
from tunesmith.errors import UserError
from tunesmith.methods.inject import adapter_modules, apply_lora
from tunesmith.methods.io import adapter_state_dict, load_adapter, save_adapter

peft = pytest.importorskip("peft")


def ours_trained(cfg: MethodConfig):
    """Our LoRA on the tiny model with random B, so the update is not zero."""
    model = build_tiny_model()
    apply_lora(model, cfg)
    torch.manual_seed(7)
    with torch.no_grad():
        for _, a in adapter_modules(model):
            a.lora_B.weight.normal_(std=0.2)
    return model


def peft_trained(**kw):
    config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, task_type="CAUSAL_LM", **kw)
    model = peft.get_peft_model(build_tiny_model(), config)
    torch.manual_seed(7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.2)
    return model


CASES = [
    dict(target_modules="all-linear"),
    dict(target_modules=["q_proj", "v_proj"]),
    dict(target_modules=["k_proj", "down_proj"], rslora=True),
    dict(target_modules=r"model\.layers\.0\.self_attn\.(q|o)_proj"),  # a subset: saved as full names
]


@pytest.mark.parametrize("kw", CASES)
def test_ours_loads_in_peft(tmp_path, kw):
    model = ours_trained(MethodConfig(r=4, alpha=8, dropout=0.1, **kw))
    ours = logits(model)
    assert (ours - logits(build_tiny_model())).abs().max() > 1e-3  # the adapter changes the output
    save_adapter(model, tmp_path, MethodConfig(r=4, alpha=8, dropout=0.1, **kw), "tiny-llama")
    saved = json.loads((tmp_path / "adapter_config.json").read_text())["target_modules"]
    names = sorted(n for n, _ in adapter_modules(model))
    subset = kw is CASES[3]  # suffixes would also catch layer 1, so full names are written
    assert saved == (names if subset else sorted({n.split(".")[-1] for n in names}))
    theirs = peft.PeftModel.from_pretrained(build_tiny_model(), tmp_path)
    assert len([m for m in theirs.modules() if isinstance(m, peft.tuners.lora.LoraLayer)]) == len(
        list(adapter_modules(model)))
    assert (logits(theirs) - ours).abs().max() <= 1e-5


@pytest.mark.parametrize("kw", [
    dict(target_modules="all-linear"),
    dict(target_modules=["q_proj", "v_proj"]),
    dict(target_modules="all-linear", use_rslora=True),
    dict(target_modules=r".*\.1\.mlp\.(up|down)_proj"),
])
def test_peft_loads_in_ours(tmp_path, kw):
    theirs = peft_trained(**kw)
    expected = logits(theirs)
    theirs.save_pretrained(tmp_path)
    model = build_tiny_model()
    cfg = load_adapter(model, tmp_path)
    assert cfg.r == 4 and cfg.alpha == 8 and cfg.rslora == kw.get("use_rslora", False)
    assert (logits(model) - expected).abs().max() <= 1e-5


@pytest.mark.parametrize("targets", [["q_proj", "v_proj"], "all-linear"])
def test_key_names_and_config_match_peft(tmp_path, targets):
    theirs = peft_trained(target_modules=targets)
    theirs.save_pretrained(tmp_path / "peft")
    model = ours_trained(MethodConfig(r=4, alpha=8, dropout=0.0, target_modules=targets))
    save_adapter(model, tmp_path / "ours", MethodConfig(r=4, alpha=8, dropout=0.0, target_modules=targets), "x")
    peft_keys = set(load_file(tmp_path / "peft" / "adapter_model.safetensors"))
    assert set(load_file(tmp_path / "ours" / "adapter_model.safetensors")) == peft_keys
    assert set(adapter_state_dict(model)) == peft_keys
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in peft_keys

    ours_cfg = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    peft_cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert set(ours_cfg) == set(peft_cfg) - {"peft_version"}
    for key in ("peft_type", "task_type", "r", "lora_alpha", "use_rslora", "bias", "fan_in_fan_out",
                "init_lora_weights", "inference_mode", "modules_to_save"):
        assert ours_cfg[key] == peft_cfg[key], key
    suffixes = sorted({t.split(".")[-1] for t in peft_cfg["target_modules"]})
    assert ours_cfg["target_modules"] == suffixes
    assert ours_cfg["base_model_name_or_path"] == "x"


def test_saved_tensors_contiguous_and_no_temp_files(tmp_path):
    cfg = MethodConfig(r=4, alpha=8, target_modules=["q_proj"])
    model = ours_trained(cfg)
    state = adapter_state_dict(model)
    assert all(t.is_contiguous() and not t.requires_grad for t in state.values())
    save_adapter(model, tmp_path, cfg, "x")
    save_adapter(model, tmp_path, cfg, "x")  # overwriting is fine
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]


def test_round_trip_ours(tmp_path):
    cfg = MethodConfig(r=4, alpha=16, dropout=0.0, rslora=True, target_modules=["o_proj", "up_proj"])
    model = ours_trained(cfg)
    save_adapter(model, tmp_path, cfg, "x")
    fresh = build_tiny_model()
    loaded = load_adapter(fresh, tmp_path)
    assert loaded.target_modules == ["o_proj", "up_proj"] and loaded.alpha == 16 and loaded.rslora
    torch.testing.assert_close(logits(fresh), logits(model), atol=1e-6, rtol=0)


def test_pickle_only_adapter_refused(tmp_path):
    cfg = MethodConfig(r=4, alpha=8, target_modules=["q_proj"])
    save_adapter(ours_trained(cfg), tmp_path, cfg, "x")
    (tmp_path / "adapter_model.safetensors").rename(tmp_path / "adapter_model.bin")
    with pytest.raises(UserError) as e:
        load_adapter(build_tiny_model(), tmp_path)
    assert "adapter_model.bin" in str(e.value) and "pickle" in str(e.value)
    assert "weights_only=True" in str(e.value)


def test_missing_or_wrong_config_refused(tmp_path):
    with pytest.raises(UserError, match="adapter_config.json"):
        load_adapter(build_tiny_model(), tmp_path)
    (tmp_path / "adapter_config.json").write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        load_adapter(build_tiny_model(), tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "IA3", "r": 4}))
    with pytest.raises(UserError, match="IA3"):
        load_adapter(build_tiny_model(), tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"], "lora_bias": True}))
    with pytest.raises(UserError, match="lora_bias"):  # (use_dora is supported: tests/test_methods_dora.py)
        load_adapter(build_tiny_model(), tmp_path)


@pytest.mark.parametrize("change", ["drop", "extra"])
def test_weights_loaded_strictly(tmp_path, change):
    cfg = MethodConfig(r=4, alpha=8, target_modules=["q_proj"])
    save_adapter(ours_trained(cfg), tmp_path, cfg, "x")
    path = tmp_path / "adapter_model.safetensors"
    state = load_file(path)
    key = "base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight"
    if change == "drop":
        del state[key]
    else:
        key = "base_model.model.model.layers.1.self_attn.k_proj.lora_B.weight"
        state[key] = torch.zeros(16, 4)
    save_file(state, path)
    with pytest.raises(UserError) as e:
        load_adapter(build_tiny_model(), tmp_path)
    assert "adapter_model.safetensors" in str(e.value) and key in str(e.value)


def test_wrong_shape_refused(tmp_path):
    cfg = MethodConfig(r=4, alpha=8, target_modules=["q_proj"])
    save_adapter(ours_trained(cfg), tmp_path, cfg, "x")
    conf = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**conf, "r": 8}))
    with pytest.raises(UserError, match="shape"):
        load_adapter(build_tiny_model(), tmp_path)
