"""train.gradient_checkpointing: the same gradients, far fewer activations kept for backward."""

from __future__ import annotations

import json

import torch

from conftest import build_tiny_model
from test_loop import examples, run_config
from tunesmith.config import MethodConfig, TrainConfig
from tunesmith.data.dataset import collate
from tunesmith.methods.freeze import find_blocks
from tunesmith.methods.inject import apply_lora
from tunesmith.objectives.lm import token_loss_sum
from tunesmith.train.loop import train, train_step
from tunesmith.train.optim import build_optimizer
from tunesmith.train.recompute import disable_checkpointing, enable_checkpointing


def lora_model():
    """LoRA with dropout on a frozen base, B random (not zero) so every adapter weight gets a gradient."""
    model = build_tiny_model()
    torch.manual_seed(0)
    apply_lora(model, MethodConfig(r=4, dropout=0.1))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    return model.train()


def step(model) -> tuple[dict[str, torch.Tensor], int]:
    """Gradients of one training step, and the bytes autograd saved for backward during it."""
    saved = [0]

    def pack(t):
        saved[0] += t.numel() * t.element_size()
        return t

    opt = build_optimizer([p for p in model.parameters() if p.requires_grad], TrainConfig())
    torch.manual_seed(7)  # the same dropout masks in both runs
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        train_step(model, opt, [collate(examples(6), 2)], 0, token_loss_sum)
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, saved[0]


def test_same_gradients_fewer_saved_activations():
    plain, plain_bytes = step(lora_model())
    model = lora_model()
    enable_checkpointing(model)
    layers = find_blocks(model)[1]
    assert all(layer.gradient_checkpointing for layer in layers)
    # our loss calls model.base_model directly: the layers checkpoint there too (fewer tensors saved)
    recomputed, recomputed_bytes = step(model)
    assert recomputed.keys() == plain.keys() and len(plain) == 28  # every LoRA A and B, no base weight
    for name in plain:
        assert plain[name].abs().sum() > 0, name
        assert torch.allclose(plain[name], recomputed[name], atol=1e-6, rtol=1e-5), name
    assert recomputed_bytes < 0.4 * plain_bytes
    disable_checkpointing(model)
    assert not any(layer.gradient_checkpointing for layer in layers)
    assert not getattr(model, "_require_grads_hooks", None)  # no hook left on the embeddings
    assert step(model)[1] == plain_bytes


def test_loop_trains_alike_and_switches_it_off_after(tmp_path):
    rows = examples(12)
    runs = {}
    for on in (False, True):
        model, flags = build_tiny_model(), []

        def loss_fn(m, batch):
            flags.append(find_blocks(m)[1][0].gradient_checkpointing)
            return token_loss_sum(m, batch)

        run_dir = tmp_path / str(on)
        train(model, rows, [], run_config(run_dir, max_steps=3, batch_size=4, lr=1e-2, gradient_checkpointing=on),
              run_dir, pad_id=2, loss_fn=loss_fn)
        assert flags == [on] * 3
        assert not any(layer.gradient_checkpointing for layer in find_blocks(model)[1])  # off again after training
        runs[on] = model, [json.loads(l)["loss"] for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert torch.allclose(torch.tensor(runs[True][1]), torch.tensor(runs[False][1]), atol=1e-6)
    for (name, a), b in zip(runs[False][0].named_parameters(), runs[True][0].parameters()):
        assert torch.allclose(a, b, atol=1e-6), name


def test_auto_is_on_over_a_quantized_base_only():
    """The default (auto) checkpoints a QLoRA run, whose point is memory, and nothing else; an explicit
    setting wins either way."""
    from tunesmith.config import Config
    from tunesmith.train.recompute import wants_checkpointing

    def resolved(quantization: str, setting) -> bool:
        return wants_checkpointing(Config(model={"quantization": quantization},
                                          train={"gradient_checkpointing": setting}))

    assert Config().train.gradient_checkpointing == "auto"
    assert [resolved(q, "auto") for q in ("none", "nf4", "fp4", "int8")] == [False, True, True, True]
    assert resolved("nf4", False) is False and resolved("none", True) is True
