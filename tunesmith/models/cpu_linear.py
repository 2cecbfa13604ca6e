"""fp32 linear layers through oneDNN instead of MKL on AMD CPUs, for no-grad paths (sampling inside RL).

PyTorch's CPU wheels compute an fp32 `F.linear` with MKL's sgemm, which on AMD processors runs far below
what the same cores reach through oneDNN (also in the wheel, behind `torch.ops.mkldnn._linear_pointwise`,
the op torch.compile emits for CPU linears). Measured on the 2-core AMD EPYC, 32 rows, fp32:

    (32, 576) @ (576, 1536)      MKL 378 us    oneDNN 173-199 us
    (32, 576) @ (576, 576)       MKL 132 us    oneDNN  80-89 us
    (32, 576) @ (576, 49152)     MKL 20.2 ms   oneDNN 7.7-8.3 ms      (the default model's head)

and the RL sampler (default model, LoRA folded, 4 prompts x 8 samples, 64 new tokens) went from 194-217 to
348-362 tokens/s. The two kernels sum in different orders, so outputs differ at rounding level (7e-5 on
values of about 25 above); each is deterministic, and the choice is made from the CPU's vendor, not from a
timing, so a resumed run on the same machine computes with the same kernel. On other CPUs (Intel, where MKL
is fast) nothing changes. TUNESMITH_CPU_LINEAR=mkl or =onednn forces the choice.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import torch
import torch.nn.functional as F


@functools.cache
def onednn_chosen() -> bool:
    """oneDNN for fp32 CPU linears: on an AMD CPU where torch has the op, or as TUNESMITH_CPU_LINEAR says."""
    forced = os.environ.get("TUNESMITH_CPU_LINEAR", "").strip().lower()
    available = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    if forced in ("mkl", "onednn"):
        return forced == "onednn" and available
    return available and cpu_vendor() == "AuthenticAMD"


def cpu_vendor() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("vendor_id"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def linear_kernel(weight: torch.Tensor):
    """f(x, weight, bias) -> x W^T + b for this weight: oneDNN's for an fp32 CPU weight where onednn_chosen(), else
    F.linear. No autograd through the oneDNN op: for no-grad use only."""
    if weight.device.type == "cpu" and weight.dtype == torch.float32 and onednn_chosen():
        return onednn_linear
    return F.linear


def onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear through oneDNN; the op takes 2-D input, so leading dimensions are flattened and restored."""
    if x.dtype != weight.dtype or (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)):
        return F.linear(x, weight, bias)
    flat = x.reshape(-1, x.shape[-1])
    out = torch.ops.mkldnn._linear_pointwise(flat, weight, bias, "none", [], "")
    return out.view(*x.shape[:-1], weight.shape[0])
