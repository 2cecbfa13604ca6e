"""torch.compile for the decoder layers (train.compile).

Compiling fuses a layer's small elementwise operations (RMSNorm, RoPE, SiLU, residual adds)
into fewer kernels, which saves memory traffic and kernel launches: on a GPU that is often a
clear gain, on a CPU much less (docs/training.md has what it measured here).

The same dropout masks are drawn as without compiling, so the results do not change.

Each decoder layer is compiled on its own, in place (`nn.Module.compile`), rather than the
whole model: every layer has the same code, so the compiled graph is reused by all of them;
parameter names stay as they are, so checkpoints and adapters are unchanged; and the loss's
head-only-at-labelled-positions code (objectives/lm.py) stays eager. `dynamic=True` marks
sequence length and batch size as symbolic, so micro-batches of new lengths reuse the graph
instead of recompiling every step. The first steps pay the compile time (tens of seconds).
"""

from __future__ import annotations

import logging
import os
import shutil

from torch import nn

from tunesmith.errors import UserError

log = logging.getLogger(__name__)


def compile_layers(model: nn.Module) -> int:
    """Compile each decoder layer in place; returns how many."""
    import torch._inductor.config

    from tunesmith.methods.freeze import find_blocks

    on_cpu = next(model.parameters()).device.type == "cpu"
    if on_cpu and not any(shutil.which(c) for c in (os.environ.get("CXX", "c++"), "g++", "clang++")):
        raise UserError("train.compile on the CPU builds C++ kernels, but no C++ compiler (c++, g++, clang++ or $CXX) "
                        "is on PATH; install one or set train.compile=false.")
    # Compiled random ops would otherwise use inductor's own generator, so dropout masks (and from
    # them the weights) would differ from an eager run. Drawing from torch's generator keeps
    # train.compile a matter of speed only.
    torch._inductor.config.fallback_random = True
    name, blocks = find_blocks(model)
    for block in blocks:
        block.compile(dynamic=True)
    log.info("torch.compile: %d layers of %s (compiled on their first steps)", len(blocks), name)
    return len(blocks)


def uncompile_layers(model: nn.Module) -> None:
    """Back to eager after training: generation calls the layers with a KV cache, which would compile
    new graphs for nothing. `nn.Module.compile` keeps the compiled call here; clearing it undoes it."""
    from tunesmith.methods.freeze import find_blocks

    for block in find_blocks(model)[1]:
        block._compiled_call_impl = None
