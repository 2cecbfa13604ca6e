"""The hand-written LoRA update (tunesmith/methods/lora_kernel.py) against autograd on the same mask."""

from __future__ import annotations

import pytest
import torch

from tunesmith.methods.dropout import drop_mask
from tunesmith.methods.lora_kernel import LoRAUpdate


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_values_and_gradients_match_autograd(p):
    g = torch.Generator().manual_seed(0)
    n, d_in, d_out, r, s = 12, 10, 7, 3, 1.7
    out = torch.randn(n, d_out, dtype=torch.float64, generator=g, requires_grad=True)
    x = torch.randn(n, d_in, dtype=torch.float64, generator=g, requires_grad=True)
    a = torch.randn(r, d_in, dtype=torch.float64, generator=g, requires_grad=True)
    b = torch.randn(d_out, r, dtype=torch.float64, generator=g, requires_grad=True)
    torch.manual_seed(5)
    y = LoRAUpdate.apply(out, x, a, b, s, p)
    torch.manual_seed(5)
    if p:  # the mask the function drew: the same seed from torch's generator
        seed = int(torch.randint(0, 2**62, (1,)))
        keep = ~drop_mask(x.shape, p, x.device, seed)
        assert 0 < keep.sum() < keep.numel()
    else:
        keep = torch.ones_like(x, dtype=torch.bool)
    leaves = [t.detach().clone().requires_grad_() for t in (out, x, a, b)]
    ro, rx, ra, rb = leaves
    reference = ro + s * (rx * keep / (1 - p)) @ ra.T @ rb.T
    torch.testing.assert_close(y, reference)
    weights = torch.randn(y.shape, dtype=torch.float64, generator=g)
    (y * weights).sum().backward()
    (reference * weights).sum().backward()
    for mine, theirs in zip((out, x, a, b), leaves):
        torch.testing.assert_close(mine.grad, theirs.grad)


def test_keeps_the_shared_input_once_not_a_dropped_copy_per_layer():
    """Three updates reading one x (as q, k, v do) keep x itself: no (N, in) tensor per layer."""
    x = torch.randn(64, 32, requires_grad=True)
    weights = [(torch.randn(4, 32, requires_grad=True), torch.randn(16, 4, requires_grad=True)) for _ in range(3)]
    kept = []

    def pack(t):
        kept.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        for a, b in weights:
            LoRAUpdate.apply(torch.zeros(64, 16), x, a, b, 2.0, 0.1)
    big = {t.data_ptr() for t in kept if t.shape == x.shape}
    assert big == {x.data_ptr()}
