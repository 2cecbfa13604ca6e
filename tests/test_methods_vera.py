"""VeRA: projections equal to peft's for the same seed, the formula, what trains, peft format both ways, merging."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import build_tiny_model, ids, logits
from safetensors.torch import load_file, save_file
from torch import nn

from tunesmith.config import MethodConfig
from tunesmith.methods.inject import adapters_disabled, merge_and_unload
from tunesmith.methods.registry import load_artifact
from tunesmith.methods.vera import VeRALinear, VeRAProjections, apply_vera, save_vera, vera_modules

peft = pytest.importorskip("peft")

TARGETS = ["q_proj", "v_proj", "down_proj"]  # in 32/32/64, out 32/16/32: the slices differ per layer
CFG = MethodConfig(name="vera", r=4, dropout=0.0, target_modules=TARGETS, vera_seed=11)


def peft_vera(**kw):
    config = peft.VeraConfig(r=4, target_modules=TARGETS, projection_prng_key=11, **kw)
    return peft.get_peft_model(build_tiny_model(), config)


def ours_trained(cfg: MethodConfig = CFG):
    model = build_tiny_model()
    apply_vera(model, cfg)
    torch.manual_seed(7)
    with torch.no_grad():
        for _, m in vera_modules(model):
            m.vera_lambda_b.normal_(std=0.5)
            m.vera_lambda_d.normal_()
    return model


def test_projections_equal_peft_for_the_same_seed():
    model = build_tiny_model()
    apply_vera(model, CFG)
    theirs = peft_vera().base_model
    assert model.vera_projections.A.shape == (4, 64) and model.vera_projections.B.shape == (32, 4)
    torch.testing.assert_close(model.vera_projections.A, theirs.vera_A["default"], atol=0, rtol=0)
    torch.testing.assert_close(model.vera_projections.B, theirs.vera_B["default"], atol=0, rtol=0)


def test_layer_matches_formula():
    torch.manual_seed(0)
    base = nn.Linear(6, 5)
    w0, b0 = base.weight.detach().clone(), base.bias.detach().clone()
    proj = VeRAProjections(r=3, max_in=8, max_out=7, seed=0)
    layer = VeRALinear(base, proj, d_init=0.1)
    assert torch.all(layer.vera_lambda_d == 0.1) and torch.count_nonzero(layer.vera_lambda_b) == 0
    with torch.no_grad():
        layer.vera_lambda_b.normal_()
        layer.vera_lambda_d.normal_()
    a, b = proj.A[:, :6], proj.B[:5, :]  # the layer's slices of the shared projections
    delta = torch.diag(layer.vera_lambda_b) @ b @ torch.diag(layer.vera_lambda_d) @ a
    x = torch.randn(4, 6)
    torch.testing.assert_close(layer(x), x @ (w0 + delta).T + b0, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(layer.delta_weight(), delta, atol=1e-6, rtol=1e-5)


def test_init_equals_base_and_trainable_count():
    model = build_tiny_model()
    before, total = logits(model), sum(p.numel() for p in model.parameters())
    apply_vera(model, CFG)
    torch.testing.assert_close(logits(model), before, atol=1e-6, rtol=0)
    trainable = {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}
    assert all(n.endswith(("vera_lambda_b", "vera_lambda_d")) for n in trainable)
    # r + out per layer: q 4+32, v 4+16, down 4+32, two blocks
    assert sum(trainable.values()) == 2 * (36 + 20 + 36)
    assert sum(p.numel() for p in model.parameters()) == total + sum(trainable.values())  # A, B are buffers
    assert not any("vera_projections" in k for k in model.state_dict())


def test_ours_loads_in_peft(tmp_path):
    model = ours_trained()
    ours = logits(model)
    assert (ours - logits(build_tiny_model())).abs().max() > 1e-3
    save_vera(model, tmp_path, CFG, "tiny")
    theirs = peft.PeftModel.from_pretrained(build_tiny_model(), tmp_path)
    assert (logits(theirs) - ours).abs().max() <= 1e-5
    ours_cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    theirs.save_pretrained(tmp_path / "peft")
    peft_cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert set(ours_cfg) == set(peft_cfg) - {"peft_version"}
    for key in ("peft_type", "r", "projection_prng_key", "save_projection", "d_initial", "bias"):
        assert ours_cfg[key] == peft_cfg[key], key
    assert set(load_file(tmp_path / "adapter_model.safetensors")) == set(
        load_file(tmp_path / "peft" / "adapter_model.safetensors"))


@pytest.mark.parametrize("save_projection", [True, False])
def test_peft_vera_loads_in_ours(tmp_path, save_projection):
    theirs = peft_vera(save_projection=save_projection, d_initial=0.3)
    torch.manual_seed(3)
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "vera_lambda" in name:
                p.normal_()
    theirs.save_pretrained(tmp_path)
    model = build_tiny_model()
    cfg = load_artifact(model, tmp_path)
    assert cfg.name == "vera" and cfg.vera_seed == 11 and cfg.vera_d_init == 0.3
    assert (logits(model) - logits(theirs)).abs().max() <= 1e-5


def test_saved_projections_are_used(tmp_path):
    """A file's vera_A/vera_B win over the seed (so loading never depends on the generator)."""
    model = ours_trained()
    save_vera(model, tmp_path, CFG, "tiny")
    path = tmp_path / "adapter_model.safetensors"
    state = load_file(path)
    state["base_model.vera_A"] = state["base_model.vera_A"] * 2
    save_file(state, path)
    fresh = build_tiny_model()
    load_artifact(fresh, tmp_path)
    torch.testing.assert_close(fresh.vera_projections.A, model.vera_projections.A * 2)


def test_merge_disable_and_unload(tmp_path):
    from transformers import AutoModelForCausalLM

    model = ours_trained()
    adapted, base = logits(model), logits(build_tiny_model())
    with adapters_disabled(model):
        torch.testing.assert_close(logits(model), base, atol=1e-6, rtol=0)
    merged = merge_and_unload(model)
    assert not any(isinstance(m, (VeRALinear, VeRAProjections)) for m in merged.modules())
    assert (logits(merged) - adapted).abs().max() <= 1e-4
    merged.save_pretrained(tmp_path)
    assert (logits(AutoModelForCausalLM.from_pretrained(tmp_path)) - adapted).abs().max() <= 1e-4
