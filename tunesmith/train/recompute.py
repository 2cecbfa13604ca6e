"""Activation (gradient) checkpointing: keep each decoder layer's input, recompute the rest in backward.

Backward needs the activations of the forward pass. Kept, they cost per layer a multiple of
batch x sequence x hidden (more for the MLP and the attention scores); at long sequences they,
not the weights, fill the memory. With checkpointing each decoder layer saves only its input
and runs its forward a second time during backward: activation memory falls to about one
layer's worth plus the layer inputs, for roughly one more forward pass of compute (~30% more
time per step). Worth it when a batch or sequence length does not fit otherwise, not on a
small model that fits anyway.

transformers implements it on the decoder layers themselves (GradientCheckpointingLayer), so it
applies wherever the layers run, also when our loss calls `model.base_model` directly
(objectives/lm.py). We use torch's non-reentrant checkpoint: it works when no input requires a
gradient (a frozen base under adapters) and under DDP and FSDP2, and it replays dropout with the
same random mask, so the gradients are those of the plain forward.
"""

from __future__ import annotations

import logging

from torch import nn

from tunesmith.errors import UserError

log = logging.getLogger(__name__)

NON_REENTRANT = {"use_reentrant": False}


def wants_checkpointing(cfg) -> bool:
    """train.gradient_checkpointing resolved: auto means on over a quantized base (QLoRA trades speed for
    memory throughout: docs/qlora.md measures it), off otherwise."""
    setting = cfg.train.gradient_checkpointing
    return cfg.model.quantization != "none" if setting == "auto" else bool(setting)


def enable_checkpointing(model: nn.Module) -> None:
    """Checkpoint every decoder layer of a transformers model, non-reentrant."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise UserError(f"train.gradient_checkpointing: {type(model).__name__} does not support activation "
                        "checkpointing; set train.gradient_checkpointing=false.")
    if hasattr(model, "activation_checkpointing_enable"):  # transformers 5 renamed it
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=NON_REENTRANT)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=NON_REENTRANT)
    # transformers also hooks the input embeddings so their output requires a gradient, which only
    # the reentrant checkpoint needs. With a frozen base that hook makes backward compute a gradient
    # down to the embeddings that nothing uses, so it goes.
    _remove_input_grad_hook(model)
    log.info("activation checkpointing: decoder layers recompute their activations in backward")


def disable_checkpointing(model: nn.Module) -> None:
    """Undo enable_checkpointing, so the model runs as loaded (generation, saving) after training."""
    if hasattr(model, "activation_checkpointing_disable"):
        model.activation_checkpointing_disable()
    else:
        model.gradient_checkpointing_disable()
    _remove_input_grad_hook(model)


def _remove_input_grad_hook(model: nn.Module) -> None:
    if getattr(model, "_require_grads_hook", None) is not None or getattr(model, "_require_grads_hooks", None):
        model.disable_input_require_grads()
