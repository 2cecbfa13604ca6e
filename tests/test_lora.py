"""Native LoRA: the math, the invariants (init = base, merge = unmerged, disabled = base) and injection."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from tunesmith.config import MethodConfig
from tunesmith.errors import UserError
from tunesmith.methods.inject import (
    adapter_modules,
    adapters_disabled,
    apply_lora,
    count_parameters,
    find_targets,
    merge_adapters,
    merge_and_unload,
    trainable_parameters,
    unmerge_adapters,
)
from tunesmith.methods.lora import LoRALinear

PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def ids(seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 320, (2, 9), generator=torch.Generator().manual_seed(seed))


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(ids()).logits


def randomise_b(model, std: float = 0.2) -> None:
    torch.manual_seed(123)
    with torch.no_grad():
        for _, a in adapter_modules(model):
            a.lora_B.weight.normal_(std=std)


def lora(model, **kw):
    return apply_lora(model, MethodConfig(r=4, alpha=8, dropout=0.0, **kw))


@pytest.mark.parametrize("rslora", [False, True])
def test_lora_linear_matches_formula(rslora):
    torch.manual_seed(0)
    base = nn.Linear(6, 5)
    w0, b0 = base.weight.detach().clone(), base.bias.detach().clone()
    layer = LoRALinear(base, r=3, alpha=6.0, rslora=rslora)
    assert layer.weight is base.weight and layer.bias is base.bias  # owns the base parameters
    assert not layer.weight.requires_grad and not layer.bias.requires_grad
    assert torch.count_nonzero(layer.lora_B.weight) == 0 and torch.count_nonzero(layer.lora_A.weight) > 0
    with torch.no_grad():
        layer.lora_B.weight.normal_()
    s = 6.0 / math.sqrt(3) if rslora else 6.0 / 3
    assert layer.scaling == pytest.approx(s)
    x = torch.randn(4, 6)
    want = x @ w0.T + b0 + s * x @ layer.lora_A.weight.T @ layer.lora_B.weight.T
    torch.testing.assert_close(layer(x), want, atol=1e-5, rtol=1e-5)
    delta = layer.delta_weight()
    assert delta.shape == (5, 6)
    torch.testing.assert_close(delta, s * layer.lora_B.weight @ layer.lora_A.weight)


def test_init_forward_equals_base(tiny_model):
    before = logits(tiny_model)
    lora(tiny_model)
    torch.testing.assert_close(logits(tiny_model), before, atol=1e-6, rtol=0)


def test_base_state_dict_keys_unchanged(tiny_model):
    base_keys = set(tiny_model.state_dict())
    lora(tiny_model)
    keys = set(tiny_model.state_dict())
    assert "model.layers.0.self_attn.q_proj.weight" in keys
    assert base_keys <= keys
    assert all(".lora_A." in k or ".lora_B." in k for k in keys - base_keys)


def test_merge_unmerge_round_trip(tiny_model):
    lora(tiny_model)
    randomise_b(tiny_model)
    weights = {n: a.weight.detach().clone() for n, a in adapter_modules(tiny_model)}
    unmerged = logits(tiny_model)
    merge_adapters(tiny_model)
    merge_adapters(tiny_model)  # twice: harmless
    assert all(a.merged for _, a in adapter_modules(tiny_model))
    name, a = next(adapter_modules(tiny_model))
    torch.testing.assert_close(a.weight, weights[name] + a.delta_weight(), atol=1e-6, rtol=0)
    merged = logits(tiny_model)
    assert (merged - unmerged).abs().max() <= 1e-5
    unmerge_adapters(tiny_model)
    unmerge_adapters(tiny_model)
    for n, a in adapter_modules(tiny_model):
        assert not a.merged
        torch.testing.assert_close(a.weight, weights[n], atol=1e-6, rtol=0)
    torch.testing.assert_close(logits(tiny_model), unmerged, atol=1e-5, rtol=0)


def test_disabled_equals_base_and_restores(tiny_model):
    base = logits(tiny_model)
    lora(tiny_model)
    randomise_b(tiny_model)
    adapted = logits(tiny_model)
    assert (adapted - base).abs().max() > 1e-3  # the adapters really change the output
    next(adapter_modules(tiny_model))[1].disabled = True  # one already off: stays off afterwards
    with adapters_disabled(tiny_model):
        torch.testing.assert_close(logits(tiny_model), base, atol=1e-6, rtol=0)
        merge_adapters(tiny_model)  # disabled while merged is still the base model
        torch.testing.assert_close(logits(tiny_model), base, atol=1e-5, rtol=0)
        unmerge_adapters(tiny_model)
    flags = [a.disabled for _, a in adapter_modules(tiny_model)]
    assert flags[0] is True and not any(flags[1:])


def test_only_lora_params_trainable_and_get_grads(tiny_model):
    lora(tiny_model)
    randomise_b(tiny_model)
    names = [n for n, p in tiny_model.named_parameters() if p.requires_grad]
    assert names and all(".lora_A." in n or ".lora_B." in n for n in names)
    assert len(trainable_parameters(tiny_model)) == len(names) == 2 * 7 * 2
    tiny_model(ids()).logits.sum().backward()
    a = next(adapter_modules(tiny_model))[1]
    assert a.weight.grad is None and a.lora_A.weight.grad.abs().sum() > 0


def test_trainable_count_formula(tiny_model):
    total_before = sum(p.numel() for p in tiny_model.parameters())
    lora(tiny_model)
    want = sum(4 * (a.in_features + a.out_features) for _, a in adapter_modules(tiny_model))
    # per layer: q 32->32, k,v 32->16, o 32->32, gate/up 32->64, down 64->32
    assert want == 2 * 4 * (64 + 48 + 48 + 64 + 96 + 96 + 96)
    assert count_parameters(tiny_model) == (want, total_before + want)


def test_all_linear_excludes_head(tiny_model):
    names = find_targets(tiny_model, "all-linear")
    assert len(names) == 2 * 7 and "lm_head" not in names
    assert sorted({n.split(".")[-1] for n in names}) == sorted(PROJ)
    assert find_targets(tiny_model, ["lm_head"]) == ["lm_head"]  # the head only when named


def test_untied_head_also_excluded():
    from conftest import build_tiny_model

    model = build_tiny_model(tie=False)
    assert all("lm_head" not in n for n in find_targets(model, "all-linear"))


def test_list_suffix_and_regex_matching(tiny_model):
    assert find_targets(tiny_model, ["q_proj", "v_proj"]) == [
        "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj",
        "model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj",
    ]
    assert find_targets(tiny_model, ["self_attn.o_proj"]) == ["model.layers.0.self_attn.o_proj",
                                                              "model.layers.1.self_attn.o_proj"]
    assert find_targets(tiny_model, ["model.layers.1.mlp.up_proj"]) == ["model.layers.1.mlp.up_proj"]
    with pytest.raises(UserError):
        find_targets(tiny_model, ["proj"])  # a suffix matches whole name parts only
    assert find_targets(tiny_model, r".*\.0\.mlp\.(gate|up)_proj") == ["model.layers.0.mlp.gate_proj",
                                                                     "model.layers.0.mlp.up_proj"]
    assert len(find_targets(tiny_model, r".*_proj")) == 14  # a regex must match the whole name


# "q_proj" as a string is a regex and fullmatches no full name; ["mlp"] is not a linear layer
@pytest.mark.parametrize("target", [["nope"], "nope.*", "q_proj", ["mlp"], "(unclosed", []])
def test_bad_target_raises_user_error(tiny_model, target):
    with pytest.raises(UserError) as e:
        find_targets(tiny_model, target)
    assert "target_modules" in str(e.value)


def test_no_match_message_lists_linears(tiny_model):
    with pytest.raises(UserError) as e:
        apply_lora(tiny_model, MethodConfig(target_modules=["qproj"]))
    assert "qproj" in str(e.value)
    assert "q_proj" in str(e.value)
    assert not any(True for _ in adapter_modules(tiny_model))


def test_apply_twice_refused(tiny_model):
    lora(tiny_model)
    with pytest.raises(UserError):
        lora(tiny_model)


def test_merging_tied_head_refused(tiny_model):
    lora(tiny_model, target_modules=["lm_head"])
    with pytest.raises(UserError, match="tied"):
        merge_adapters(tiny_model)


def test_merge_and_unload_gives_plain_model(tiny_model, tmp_path):
    from transformers import AutoModelForCausalLM

    lora(tiny_model)
    randomise_b(tiny_model)
    adapted = logits(tiny_model)
    merged = merge_and_unload(tiny_model)
    assert not any(isinstance(m, LoRALinear) for m in merged.modules())
    assert isinstance(merged.model.layers[0].self_attn.q_proj, nn.Linear)
    assert not any("lora" in k for k in merged.state_dict())
    torch.testing.assert_close(logits(merged), adapted, atol=1e-5, rtol=0)
    merged.save_pretrained(tmp_path, safe_serialization=True)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(logits(reloaded), adapted, atol=1e-5, rtol=0)


def test_dropout_only_in_training():
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(8, 8), r=2, alpha=4, dropout=0.5)
    with torch.no_grad():
        layer.lora_B.weight.normal_()
    x = torch.randn(3, 8)
    layer.eval()
    torch.testing.assert_close(layer(x), layer(x))
    layer.train()
    assert not torch.allclose(layer(x), layer.eval()(x))
