"""folded_for_sampling (tunesmith/methods/weight_delta.py): while GRPO and PPO sample, each adapter layer computes
with W0 + dW in one matmul; the logits are the unfolded model's to rounding, the adapter's own matmuls do not run,
and the base weights come back bit for bit."""

from __future__ import annotations

import pytest
import torch
from conftest import build_tiny_model, logits

from tunesmith.config import MethodConfig
from tunesmith.methods.registry import get_method
from tunesmith.methods.weight_delta import WeightDeltaLinear, folded_for_sampling

METHODS = {"lora": {}, "lora_fa": {}, "dora": {}, "vera": {"r": 8}, "delta_lora": {}, "rslora": {}}


def adapted(name: str):
    options = {"r": 4, "alpha": 8, "dropout": 0.0, **METHODS[name]}
    if name == "rslora":
        name, options = "lora", {**options, "rslora": True}
    model = build_tiny_model()
    get_method(name).apply(model, MethodConfig(name=name, **options))
    torch.manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


@pytest.mark.parametrize("name", sorted(METHODS))
def test_folded_logits_equal_the_adapters_and_the_base_weights_come_back(name, monkeypatch):
    model = adapted(name)
    layers = [m for m in model.modules() if isinstance(m, WeightDeltaLinear)]
    weights = [m.weight.detach().clone() for m in layers]
    unfolded = logits(model)
    assert (unfolded - logits(build_tiny_model())).abs().max() > 1e-3  # the adapter changes the answers
    unfolded_calls = []  # every unfolded forward, DoRA's too, computes W0 x + b through base_forward first
    base_forward = WeightDeltaLinear.base_forward
    monkeypatch.setattr(WeightDeltaLinear, "base_forward",
                        lambda self, x: unfolded_calls.append(1) or base_forward(self, x))
    with folded_for_sampling(model) as count:
        assert count == len(layers) > 0
        folded = logits(model)
    assert not unfolded_calls  # one matmul with W0 + dW per layer
    assert torch.equal(logits(model), unfolded) and len(unfolded_calls) == len(layers)
    torch.testing.assert_close(folded, unfolded, atol=1e-5, rtol=0)
    assert all(m.folded is None for m in layers)
    assert all(torch.equal(m.weight, w) for m, w in zip(layers, weights))


def test_layers_that_cannot_fold_are_left_alone_and_an_error_unfolds():
    model = adapted("lora")
    layers = [m for m in model.modules() if isinstance(m, WeightDeltaLinear)]
    layers[0].disabled = True  # the reference forward: the update off
    layers[1].merge()  # already in the weight
    with folded_for_sampling(model) as count:
        assert count == len(layers) - 2 and layers[0].folded is None and layers[1].folded is None
    with folded_for_sampling(model, enabled=False) as count:
        assert count == 0 and all(m.folded is None for m in layers)
    with pytest.raises(RuntimeError, match="boom"), folded_for_sampling(model):
        assert layers[2].folded is not None
        raise RuntimeError("boom")
    assert all(m.folded is None for m in layers)


@pytest.mark.parametrize("choice", ["onednn", "mkl"])
def test_the_cpu_kernel_of_folded_layers_and_the_head(choice, monkeypatch):
    """models/cpu_linear.py: TUNESMITH_CPU_LINEAR forces oneDNN or F.linear (MKL); with oneDNN the folded layers and
    the head multiply through it while folded (the head's class forward is back after), and both kernels give the
    unfolded logits to rounding."""
    from tunesmith.models import cpu_linear

    monkeypatch.setenv("TUNESMITH_CPU_LINEAR", choice)
    cpu_linear.onednn_chosen.cache_clear()
    try:
        if choice == "onednn" and not cpu_linear.onednn_chosen():
            pytest.skip("this torch has no oneDNN linear op")
        model = adapted("lora")
        unfolded = logits(model)
        calls = []
        real = cpu_linear.onednn_linear
        monkeypatch.setattr(cpu_linear, "onednn_linear", lambda *a: calls.append(1) or real(*a))
        with folded_for_sampling(model):
            assert ("forward" in model.lm_head.__dict__) == (choice == "onednn")
            folded = logits(model)
        assert "forward" not in model.lm_head.__dict__
        layers = sum(isinstance(m, WeightDeltaLinear) for m in model.modules())
        assert len(calls) == (layers + 1 if choice == "onednn" else 0)  # every folded layer and the head, once
        torch.testing.assert_close(folded, unfolded, atol=1e-5, rtol=1e-5)
        x, w, b = torch.randn(3, 5, 32), torch.randn(7, 32), torch.randn(7)
        torch.testing.assert_close(real(x, w, b), torch.nn.functional.linear(x, w, b), atol=1e-5, rtol=1e-5)
    finally:
        cpu_linear.onednn_chosen.cache_clear()
