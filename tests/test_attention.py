"""Per-sample attention for packed rows (tunesmith/models/attention.py) against transformers' masked SDPA."""

from __future__ import annotations

import torch
from conftest import build_tiny_model, ids
from test_packing import sample_examples

from tunesmith.data.dataset import collate
from tunesmith.data.packing import collate_packed
from tunesmith.methods.inject import apply_lora
from tunesmith.config import MethodConfig
from tunesmith.models.attention import NAME, restore_attention, sample_starts, use_varlen_attention
from tunesmith.objectives.lm import token_loss_sum


def loss_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    loss, n = token_loss_sum(model, batch)
    (loss / n).backward()
    return loss.detach(), {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


def test_sample_starts_finds_every_restart():
    position_ids = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3], [0, 1, 2, 3, 4, 5, 0, 1, 2]])
    assert sample_starts(position_ids) == [[0, 3, 5, 9], [0, 6, 9]]


def test_packed_loss_and_gradients_match_the_masked_kernel():
    """Same loss and gradients (LoRA and base model alike) as SDPA with transformers' block-diagonal mask."""
    model = build_tiny_model()
    apply_lora(model, MethodConfig(r=4, dropout=0.0))
    for p in model.parameters():
        p.requires_grad_(True)  # every weight's gradient is compared, not only the adapter's
    model.train()
    batch = collate_packed(sample_examples(seed=2, n=8), pad_id=2, row_len=48)
    assert batch["input_ids"].shape[0] > 1  # several rows, several samples per row
    masked_loss, masked_grads = loss_and_grads(model, batch)
    before = use_varlen_attention(model)
    assert model.config._attn_implementation == NAME
    varlen_loss, varlen_grads = loss_and_grads(model, batch)
    assert torch.allclose(masked_loss, varlen_loss, rtol=1e-5)
    for name, grad in masked_grads.items():
        assert torch.allclose(grad, varlen_grads[name], atol=1e-5, rtol=1e-4), name
    restore_attention(model, before)
    assert model.config._attn_implementation == before


def test_unpacked_batches_and_generation_are_unchanged():
    """Padded batches and cached generation go to transformers' SDPA as before."""
    model = build_tiny_model()
    padded = collate(sample_examples(seed=3, n=4), pad_id=2)
    with torch.no_grad():
        reference = token_loss_sum(model, padded)[0]
        expected = model.generate(ids(), max_new_tokens=5, do_sample=False)
        use_varlen_attention(model)
        assert torch.equal(token_loss_sum(model, padded)[0], reference)
        assert torch.equal(model.generate(ids(), max_new_tokens=5, do_sample=False), expected)
