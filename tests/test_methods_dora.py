"""DoRA: the formula, init = base, what trains, peft parity both ways (logits and gradients), merging, LoRA+ groups."""

from __future__ import annotations

import pytest
import torch
from conftest import build_tiny_model, ids, logits
from torch import nn

from tunesmith.config import MethodConfig
from tunesmith.methods.dora import DoRALinear, apply_dora
from tunesmith.methods.inject import (adapter_modules, adapters_disabled, merge_adapters, merge_and_unload,
                                      unmerge_adapters)
from tunesmith.methods.io import load_adapter, save_adapter
from tunesmith.methods.registry import load_artifact, lora_plus_groups

peft = pytest.importorskip("peft")

CFG = MethodConfig(name="dora", r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj", "down_proj"])


def ours_trained(cfg: MethodConfig = CFG):
    """DoRA on the tiny model with random B and magnitudes, so W' differs from W0 in direction and size."""
    model = build_tiny_model()
    apply_dora(model, cfg)
    torch.manual_seed(7)
    with torch.no_grad():
        for _, a in adapter_modules(model):
            a.lora_B.weight.normal_(std=0.2)
            a.lora_magnitude_vector.mul_(1 + 0.3 * torch.rand_like(a.lora_magnitude_vector))
    return model


def ours_name(peft_name: str) -> str:
    """peft's parameter name -> ours: base_model.model.X.lora_A.default.weight -> X.lora_A.weight."""
    name = peft_name.replace("base_model.model.", "").replace(".default", "")
    return name.replace("lora_magnitude_vector.weight", "lora_magnitude_vector")


def test_layer_matches_formula():
    torch.manual_seed(0)
    base = nn.Linear(6, 5)
    w0, b0 = base.weight.detach().clone(), base.bias.detach().clone()
    layer = DoRALinear(base, r=3, alpha=6.0)
    torch.testing.assert_close(layer.lora_magnitude_vector, w0.norm(dim=1))  # m starts at ||W0||_c
    with torch.no_grad():
        layer.lora_B.weight.normal_()
        layer.lora_magnitude_vector.normal_()
    direction = w0 + 2.0 * layer.lora_B.weight @ layer.lora_A.weight  # s = alpha / r = 2
    w = layer.lora_magnitude_vector[:, None] * direction / direction.norm(dim=1, keepdim=True)
    x = torch.randn(4, 6)
    torch.testing.assert_close(layer(x), x @ w.T + b0, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(layer.delta_weight(), w - w0, atol=1e-5, rtol=1e-5)


def test_init_equals_base_and_only_adapter_trains():
    model = build_tiny_model()
    before = logits(model)
    apply_dora(model, CFG)
    torch.testing.assert_close(logits(model), before, atol=1e-6, rtol=0)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert len(names) == 3 * 6 and all(n.endswith((".lora_A.weight", ".lora_B.weight", ".lora_magnitude_vector"))
                                       for n in names)


@pytest.mark.parametrize("kw", [{}, {"rslora": True, "target_modules": "all-linear"}])
def test_ours_loads_in_peft(tmp_path, kw):
    cfg = CFG.model_copy(update=kw)
    model = ours_trained(cfg)
    ours = logits(model)
    assert (ours - logits(build_tiny_model())).abs().max() > 1e-3
    save_adapter(model, tmp_path, cfg, "tiny")
    theirs = peft.PeftModel.from_pretrained(build_tiny_model(), tmp_path)
    assert theirs.peft_config["default"].use_dora
    assert (logits(theirs) - ours).abs().max() <= 1e-5


def test_peft_dora_loads_in_ours(tmp_path):
    config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, use_dora=True, target_modules=["k_proj", "up_proj"])
    theirs = peft.get_peft_model(build_tiny_model(), config)
    torch.manual_seed(3)
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "lora_B" in name or "magnitude" in name:
                p.add_(torch.randn_like(p) * 0.2)
    theirs.save_pretrained(tmp_path)
    model = build_tiny_model()
    cfg = load_artifact(model, tmp_path)
    assert cfg.name == "dora" and all(isinstance(a, DoRALinear) for _, a in adapter_modules(model))
    assert (logits(model) - logits(theirs)).abs().max() <= 1e-5


def test_gradients_match_peft(tmp_path):
    """The detached norm (paper Section 4.3) gives the same gradients for A, B and m as peft's."""
    model = ours_trained()
    save_adapter(model, tmp_path, CFG, "tiny")
    theirs = peft.PeftModel.from_pretrained(build_tiny_model(), tmp_path, is_trainable=True)
    for m in (model, theirs):
        m.train()
        m(ids()).logits.pow(2).mean().backward()
    ours = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    theirs_grads = {ours_name(n): p.grad for n, p in theirs.named_parameters() if p.requires_grad}
    assert theirs_grads.keys() == ours.keys()
    for key, grad in theirs_grads.items():
        torch.testing.assert_close(ours[key], grad, atol=1e-6, rtol=1e-4)


def test_round_trip_merge_and_disable(tmp_path):
    model = ours_trained()
    adapted = logits(model)
    save_adapter(model, tmp_path, CFG, "tiny")
    fresh = build_tiny_model()
    assert load_adapter(fresh, tmp_path).name == "dora"
    torch.testing.assert_close(logits(fresh), adapted, atol=1e-6, rtol=0)

    base = logits(build_tiny_model())
    weights = {n: a.weight.detach().clone() for n, a in adapter_modules(model)}
    merge_adapters(model)
    merge_adapters(model)  # twice: harmless
    assert (logits(model) - adapted).abs().max() <= 1e-5
    with adapters_disabled(model):  # merged but disabled is still the base model
        assert (logits(model) - base).abs().max() <= 1e-5
    unmerge_adapters(model)
    for n, a in adapter_modules(model):
        torch.testing.assert_close(a.weight, weights[n], atol=1e-6, rtol=0)
    merged = merge_and_unload(model)
    assert not any(isinstance(m, DoRALinear) for m in merged.modules())
    assert (logits(merged) - adapted).abs().max() <= 1e-4


def test_lora_plus_groups_match_peft():
    """B and the magnitude vectors (1-d) get the higher rate, as in peft's create_loraplus_optimizer."""
    from peft.optimizers import create_loraplus_optimizer

    model = ours_trained()
    groups = lora_plus_groups(model, CFG.model_copy(update={"lora_plus_ratio": 16.0}))
    name_of = {id(p): n for n, p in model.named_parameters()}
    ours = {n: g["lr_scale"] for g in groups for n in map(name_of.get, map(id, g["params"]))}

    theirs = peft.get_peft_model(build_tiny_model(), peft.LoraConfig(
        r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj", "v_proj", "down_proj"]))
    opt = create_loraplus_optimizer(theirs, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=16.0)
    peft_name = {id(p): ours_name(n) for n, p in theirs.named_parameters()}
    scale = {peft_name[id(p)]: g["lr"] / 1e-3 for g in opt.param_groups for p in g["params"]}
    assert scale == pytest.approx(ours)
    assert sorted(set(ours.values())) == [1.0, 16.0]
