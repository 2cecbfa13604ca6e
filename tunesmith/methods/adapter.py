"""Bottleneck adapters: a small trained MLP after the attention and the MLP of every block.

Houlsby et al. 2019, "Parameter-Efficient Transfer Learning for NLP", arXiv:1902.00751, Section 2.1
and Figure 2. Each sublayer's output h (before it joins the residual stream) passes through

    h' = h + W_up f(W_down h + b_down) + b_up      W_down: (m, d), W_up: (d, m), m = method.adapter_size << d

with f a nonlinearity (GELU here). W_up and b_up start at zero, so every adapter starts as the
identity and the model starts exactly at the base model (the paper's near-identity init).
Parameters: 2 m d + m + d per adapter, two adapters per block.

Unlike LoRA the adapter is not linear, so it cannot be folded into the weights: it costs extra
compute at inference and `tunesmith merge` refuses it.

Where: the sublayers are the children of each block (the largest nn.ModuleList) named like an
attention (self_attn, attn, attention) or a feed-forward (mlp, feed_forward, ffn). The adapter is
registered as `<sublayer>.adapter` and applied by a forward hook, so the base model's own keys
do not change. A sublayer that returns a tuple (attention: output, weights) is adapted on its first
element.

There is no PEFT format for these adapters: the artifact is tunesmith's own (the adapters' tensors
under the model's keys, e.g. model.layers.0.mlp.adapter.down.weight, and the adapter size).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from tunesmith.config import MethodConfig
from tunesmith.errors import UserError
from tunesmith.files import load_state_strict, read_safetensors
from tunesmith.methods.artifact import WEIGHTS_NAME, read_artifact_config, write_artifact
from tunesmith.methods.registry import Method

SUBLAYER_NAMES = ("self_attn", "attn", "attention", "mlp", "feed_forward", "ffn")


class BottleneckAdapter(nn.Module):
    """h -> h + up(gelu(down(h))), with `up` zero-initialised."""

    def __init__(self, dim: int, size: int, device=None, dtype=None):
        super().__init__()
        self.down = nn.Linear(dim, size, device=device, dtype=dtype)  # (m, d): nn.Linear's default init
        self.up = nn.Linear(size, dim, device=device, dtype=dtype)  # (d, m): zero, so h' = h at start
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)
        self.act = nn.GELU()
        self.disabled = False

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if self.disabled:
            return h
        return h + self.up(self.act(self.down(h.to(self.down.weight.dtype)))).to(h.dtype)


def _adapt_output(module: nn.Module, args, output):
    """Forward hook: run the sublayer's output (or its first element) through its adapter."""
    if isinstance(output, tuple):
        return (module.adapter(output[0]), *output[1:])
    return module.adapter(output)


def _hidden_size(model: nn.Module, block: nn.Module) -> int:
    size = getattr(getattr(model, "config", None), "hidden_size", None)
    if size:
        return size
    first = next((m for m in block.modules() if isinstance(m, nn.Linear)), None)
    if first is None:
        raise UserError("Cannot tell this model's hidden size for the adapters (no config.hidden_size).")
    return first.in_features


def find_sublayers(model: nn.Module) -> list[str]:
    """Full names of the attention and feed-forward sublayers of every block."""
    from tunesmith.methods.freeze import find_blocks

    list_name, blocks = find_blocks(model)
    names = [f"{list_name}.{i}.{child}" for i, block in enumerate(blocks)
             for child, _ in block.named_children() if child in SUBLAYER_NAMES]
    if not names:
        children = ", ".join(n for n, _ in blocks[0].named_children())
        raise UserError(f"method.name=adapter found no attention or MLP sublayer in {list_name}.0 (children: "
                        f"{children}); it looks for children named {', '.join(SUBLAYER_NAMES)}.")
    return names


def apply_adapters(model: nn.Module, cfg: MethodConfig) -> list[str]:
    """Freeze the model and add a bottleneck adapter after every attention and MLP sublayer."""
    if any(isinstance(m, BottleneckAdapter) for m in model.modules()):
        raise UserError("This model already has bottleneck adapters; apply them to a fresh base model.")
    names = find_sublayers(model)
    modules = dict(model.named_modules())
    from tunesmith.methods.freeze import find_blocks

    dim = _hidden_size(model, find_blocks(model)[1][0])
    for p in model.parameters():
        p.requires_grad_(False)
    ref = next(model.parameters())
    for name in names:
        sub = modules[name]
        sub.add_module("adapter", BottleneckAdapter(dim, cfg.adapter_size, device=ref.device, dtype=ref.dtype))
        sub.register_forward_hook(_adapt_output)
    return names


def adapter_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every bottleneck adapter's parameters under the model's keys."""
    return {f"{n}.{k}": p for n, m in model.named_modules() if isinstance(m, BottleneckAdapter)
            for k, p in m.named_parameters()}


def save_adapters(model: nn.Module, out_dir: Path, cfg: MethodConfig, base_model_name_or_path: str) -> None:
    tensors = adapter_tensors(model)
    if not tensors:
        raise ValueError("save_adapters: the model has no bottleneck adapters")
    write_artifact(out_dir, "adapter", base_model_name_or_path, {"adapter_size": cfg.adapter_size}, tensors)


def load_adapters(model: nn.Module, folder: Path) -> MethodConfig:
    meta = read_artifact_config(folder, "adapter")
    cfg = MethodConfig(name="adapter", adapter_size=meta["adapter_size"])
    path = Path(folder) / WEIGHTS_NAME
    state = read_safetensors(path, "the weights of bottleneck adapters")
    apply_adapters(model, cfg)
    load_state_strict(adapter_tensors(model), state, path, what="this model's bottleneck adapters")
    return cfg


METHOD = Method(
    name="adapter",
    apply=apply_adapters, save=save_adapters, load=load_adapters, merge=None,
    describe=lambda cfg: f"size={cfg.adapter_size}",
)
