"""LoRA-FA: A frozen, the custom backward is exact, only A x is kept for backward, PEFT LoRA format, merging."""

from __future__ import annotations

import pytest
import torch
from conftest import build_tiny_model, ids, logits
from torch import nn

from tunesmith.config import MethodConfig, TrainConfig
from tunesmith.methods.dropout import drop_mask
from tunesmith.methods.inject import adapter_modules, merge_and_unload
from tunesmith.methods.io import load_adapter, save_adapter
from tunesmith.methods.lora import LoRALinear
from tunesmith.methods.lora_fa import LoRAFALinear, _FrozenAUpdate, apply_lora_fa
from tunesmith.train.optim import build_optimizer

CFG = MethodConfig(name="lora_fa", r=4, alpha=8, dropout=0.0)


def test_custom_backward_is_exact():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 6, dtype=torch.float64, generator=g, requires_grad=True)
    a = torch.randn(2, 6, dtype=torch.float64, generator=g)
    b = torch.randn(4, 2, dtype=torch.float64, generator=g, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, b: _FrozenAUpdate.apply(x, a, b, 1.5, 0.0), (x, b))
    y = _FrozenAUpdate.apply(x, a, b, 1.5, 0.0)
    torch.testing.assert_close(y, 1.5 * x @ a.T @ b.T)


def test_custom_dropout_matches_autograd_with_the_same_mask():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 6, dtype=torch.float64, generator=g, requires_grad=True)
    a = torch.randn(2, 6, dtype=torch.float64, generator=g)
    b = torch.randn(4, 2, dtype=torch.float64, generator=g, requires_grad=True)
    torch.manual_seed(1)
    y = _FrozenAUpdate.apply(x, a, b, 1.5, 0.25)
    torch.manual_seed(1)
    keep = ~drop_mask(x.shape, 0.25, x.device)  # the same draw the Function made
    assert 0 < keep.sum() < keep.numel()
    xr, br = x.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    yr = 1.5 * (xr * keep / 0.75) @ a.T @ br.T
    torch.testing.assert_close(y, yr)
    weights = torch.randn(y.shape, dtype=torch.float64, generator=g)
    (y * weights).sum().backward()
    (yr * weights).sum().backward()
    torch.testing.assert_close(x.grad, xr.grad)
    torch.testing.assert_close(b.grad, br.grad)


def saved_for_backward(fn) -> list[tuple[torch.Size, torch.dtype]]:
    """(shape, dtype) of the tensors autograd keeps for backward while `fn` runs."""
    shapes = []

    def pack(t):
        shapes.append((t.shape, t.dtype))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return shapes


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_only_a_x_is_kept_for_backward(dropout):
    """LoRA keeps dropout(x) (in numbers per token) for A's gradient; LoRA-FA keeps A x (r per token)."""
    torch.manual_seed(0)
    x = torch.randn(8, 64).requires_grad_()  # an input that needs a gradient, as inside a model
    lora, fa = LoRALinear(nn.Linear(64, 64), 2, 4, dropout), LoRAFALinear(nn.Linear(64, 64), 2, 4, dropout)
    lora_saved, fa_saved = saved_for_backward(lambda: lora(x)), saved_for_backward(lambda: fa(x))
    assert (torch.Size([8, 64]), torch.float32) in lora_saved  # x (or dropout(x)) itself
    assert (torch.Size([8, 2]), torch.float32) in fa_saved  # z = A x
    # the only (tokens, in)-shaped tensor LoRA-FA keeps is dropout's keep-mask, as bool
    assert [d for s, d in fa_saved if s == torch.Size([8, 64])] == ([torch.bool] if dropout else [])


def test_only_b_trains_and_a_stays_fixed():
    model = build_tiny_model()
    apply_lora_fa(model, CFG)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and all(n.endswith(".lora_B.weight") for n in names)
    a_before = {n: a.lora_A.weight.clone() for n, a in adapter_modules(model)}
    opt = build_optimizer([p for p in model.parameters() if p.requires_grad], TrainConfig(lr=1e-2))
    model.train()
    for _ in range(2):
        model(ids()).logits.pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    for n, a in adapter_modules(model):
        assert torch.equal(a.lora_A.weight, a_before[n]) and a.lora_A.weight.grad is None
        assert a.lora_B.weight.abs().sum() > 0


def test_gradients_equal_lora_with_frozen_a():
    """Same weights: LoRA-FA's B gradient equals plain LoRA's, and so do the gradients flowing below."""
    torch.manual_seed(0)
    fa_model = build_tiny_model()
    apply_lora_fa(fa_model, CFG)
    ref = build_tiny_model()
    from tunesmith.methods.inject import apply_lora

    apply_lora(ref, CFG)
    ref.load_state_dict(fa_model.state_dict())
    with torch.no_grad():
        for (_, a), (_, b) in zip(adapter_modules(fa_model), adapter_modules(ref)):
            a.lora_B.weight.normal_(std=0.2)
            b.lora_B.weight.copy_(a.lora_B.weight)
    for m in (fa_model, ref):
        m(ids()).logits.pow(2).mean().backward()
    for (n, a), (_, b) in zip(adapter_modules(fa_model), adapter_modules(ref)):
        torch.testing.assert_close(a.lora_B.weight.grad, b.lora_B.weight.grad, atol=1e-7, rtol=1e-5)


def test_saved_as_peft_lora_and_merges(tmp_path):
    from transformers import AutoModelForCausalLM

    model = build_tiny_model()
    apply_lora_fa(model, CFG)
    torch.manual_seed(7)
    with torch.no_grad():
        for _, a in adapter_modules(model):
            a.lora_B.weight.normal_(std=0.2)
    adapted = logits(model)
    save_adapter(model, tmp_path, CFG, "tiny")
    fresh = build_tiny_model()
    assert load_adapter(fresh, tmp_path).name == "lora"  # it is a LoRA adapter
    torch.testing.assert_close(logits(fresh), adapted, atol=1e-6, rtol=0)
    peft = pytest.importorskip("peft")
    theirs = peft.PeftModel.from_pretrained(build_tiny_model(), tmp_path)
    assert (logits(theirs) - adapted).abs().max() <= 1e-5
    merged = merge_and_unload(model)
    assert (logits(merged) - adapted).abs().max() <= 1e-4
    merged.save_pretrained(tmp_path / "merged")
    assert (logits(AutoModelForCausalLM.from_pretrained(tmp_path / "merged")) - adapted).abs().max() <= 1e-4
