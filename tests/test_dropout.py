"""The fast adapter dropout (tunesmith/methods/dropout.py): right rate, seeded, exact gradient."""

from __future__ import annotations

import torch
from torch import nn

from tunesmith.methods.dropout import LEVELS, Dropout, drop_mask, dropout


def test_drop_rate_matches_p_within_sampling_noise():
    torch.manual_seed(0)
    n = 1_000_000
    for p in (0.05, 0.1, 0.5):
        rate = drop_mask(torch.Size([n]), p, torch.device("cpu")).float().mean().item()
        expected = round(p * LEVELS) / LEVELS
        assert abs(rate - expected) < 5 * (expected * (1 - expected) / n) ** 0.5, (p, rate)


def test_masks_follow_torch_seed_and_differ_between_calls():
    cpu = torch.device("cpu")
    torch.manual_seed(3)
    first, second = drop_mask(torch.Size([64, 32]), 0.3, cpu), drop_mask(torch.Size([64, 32]), 0.3, cpu)
    torch.manual_seed(3)
    again = drop_mask(torch.Size([64, 32]), 0.3, cpu)
    assert torch.equal(first, again)
    assert not torch.equal(first, second)


def test_forward_and_gradient_are_mask_times_scale():
    torch.manual_seed(1)
    x = torch.randn(40, 24, requires_grad=True)
    p = 0.25
    torch.manual_seed(7)
    y = dropout(x, p)
    torch.manual_seed(7)
    kept = ~drop_mask(x.shape, p, x.device)
    assert torch.allclose(y, x.detach() * kept / (1 - p), rtol=1e-6, atol=0)
    assert torch.equal(y == 0, ~kept)
    upstream = torch.randn_like(y)
    y.backward(upstream)
    assert torch.allclose(x.grad, upstream * kept / (1 - p))


def test_module_is_an_nn_dropout_and_identity_in_eval_or_at_zero():
    layer = Dropout(0.2)
    assert isinstance(layer, nn.Dropout) and layer.p == 0.2
    x = torch.randn(8, 8)
    assert torch.equal(layer.eval()(x), x)
    assert torch.equal(dropout(x, 0.0), x)
    assert not torch.equal(layer.train()(x), x)
