"""Bottleneck adapters: placement, identity at init, the formula, base keys unchanged, artifact, no merge."""

from __future__ import annotations

import pytest
import torch
from conftest import build_tiny_model, ids, logits

from tunesmith.config import MethodConfig
from tunesmith.errors import UserError
from tunesmith.methods.adapter import BottleneckAdapter, find_sublayers
from tunesmith.methods.inject import adapters_disabled
from tunesmith.methods.registry import get_method, load_artifact

CFG = MethodConfig(name="adapter", adapter_size=8)
METHOD = get_method("adapter")


def trained():
    model = build_tiny_model()
    METHOD.apply(model, CFG)
    torch.manual_seed(5)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, BottleneckAdapter):
                m.up.weight.normal_(std=0.3)
    return model


def test_placed_after_attention_and_mlp():
    assert find_sublayers(build_tiny_model()) == ["model.layers.0.self_attn", "model.layers.0.mlp",
                                                  "model.layers.1.self_attn", "model.layers.1.mlp"]


def test_identity_at_init_base_keys_and_trainable():
    model = build_tiny_model()
    before, base_keys = logits(model), set(model.state_dict())
    METHOD.apply(model, CFG)
    torch.testing.assert_close(logits(model), before, atol=0, rtol=0)
    assert base_keys <= set(model.state_dict())  # the base model's keys are unchanged
    trainable = {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}
    assert all(".adapter." in n for n in trainable)
    assert sum(trainable.values()) == 4 * (2 * 8 * 32 + 8 + 32)  # 2 m d + m + d per adapter, 4 adapters


def test_adapter_formula_on_the_sublayer_output():
    model = trained()
    mlp = model.model.layers[0].mlp
    x = torch.randn(3, 32)
    with torch.no_grad():
        h = mlp.down_proj(mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x))  # the MLP without its adapter
        a = mlp.adapter
        want = h + a.up(torch.nn.functional.gelu(a.down(h)))
        torch.testing.assert_close(mlp(x), want)
    base = logits(build_tiny_model())
    assert (logits(model) - base).abs().max() > 1e-3
    with adapters_disabled(model):
        torch.testing.assert_close(logits(model), base, atol=1e-6, rtol=0)


def test_round_trip_and_merge_refused(tmp_path):
    model = trained()
    tuned = logits(model)
    METHOD.save(model, tmp_path, CFG, "tiny")
    fresh = build_tiny_model()
    assert load_artifact(fresh, tmp_path).adapter_size == 8
    assert (logits(fresh) - tuned).abs().max() == 0
    assert METHOD.merge is None
    with pytest.raises(UserError, match="already"):
        METHOD.apply(fresh, CFG)
