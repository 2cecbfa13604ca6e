"""A weighted sum of DoRA (and LoRA, VeRA) weight changes, written exactly as one DoRA adapter.

Input i changes a layer by dW_i = diag(k_i) (W0 + s_i B_i A_i) - W0, with k_i = m_i / ||W0 + s_i B_i A_i||_c
for DoRA (Liu et al. 2024, Eq. 5) and k_i = 1 for LoRA and VeRA (then dW_i = s_i B_i A_i). The exact
methods (linear, task_arithmetic) ask for W0 + sum_i c_i dW_i, and collecting the W0 terms,

    W0 + sum_i c_i dW_i = diag(D) W0 + sum_i c_i diag(k_i) s_i B_i A_i,     D = 1 + sum_i c_i (k_i - 1)   (out,)
                        = diag(D) (W0 + B A),
    A = [A_1; A_2; ...]  (r_total, in),
    B = [diag(c_1 k_1 s_1 / D) B_1, diag(c_2 k_2 s_2 / D) B_2, ...]  (out, r_total)

a row scaling of a low-rank change of W0: DoRA's form with scale 1 (alpha = r = r_total) and
magnitude m = D ||W0 + B A||_c, since m (W0 + B A) / ||W0 + B A||_c is then diag(D) (W0 + B A).
So a DoRA magnitude over a sum of changes is defined, and exact, as long as no row has D = 0: such
a row of the merged weight has no W0 component, hence no magnitude/direction split of the form
m (W0 + low rank) / norm, and the merge is refused naming the layer and the row. (D < 0 is a
negative magnitude, which DoRA's forward takes as written.)

Everything is computed in fp64 from the fp32 inputs and W0; the factors are saved in fp32, and m is
taken from the saved fp32 factors so that a loader's ||W0 + B A||_c matches it.
"""

from __future__ import annotations

import torch

from tunesmith.errors import UserError

MIN_ROW_SCALE = 1e-6  # |D| below this: the merged row has (numerically) no W0 component


def dora_factors(inputs, coefficients: list[float], name: str, w0: torch.Tensor):
    """(A, B, m, target dW) of one layer: the exact DoRA form of W0 + sum_i c_i dW_i (module docstring)."""
    out_f, in_f = w0.shape
    w0 = w0.double()
    row_scale = torch.ones(out_f, dtype=torch.float64)  # D
    a_blocks, b_blocks, target = [], [], torch.zeros_like(w0)
    for x, c in zip(inputs, coefficients):
        if name not in x.layers:
            a_blocks.append(torch.zeros(x.r, in_f, dtype=torch.float64))
            b_blocks.append(torch.zeros(out_f, x.r, dtype=torch.float64))
            continue
        a, b = x.layers[name]
        k = x.row_factor(name, w0)
        k = torch.ones(out_f, dtype=torch.float64) if k is None else k
        row_scale += c * (k - 1)
        a_blocks.append(a.double())
        b_blocks.append((c * x.scale * k)[:, None] * b.double())  # divided by D below
        low = x.low_rank(name)  # s_i B_i A_i
        target += c * (k[:, None] * (w0 + low) - w0)  # c_i dW_i (k_i = 1: c_i s_i B_i A_i)
    small = (row_scale.abs() < MIN_ROW_SCALE).nonzero().flatten()
    if small.numel():
        raise UserError(f"Layer {name}, row {small[0].item()}: the merged weight keeps no part of the base weight W0 "
                        f"there (D = 1 + sum_i c_i (k_i - 1) = {row_scale[small[0]].item():.2e}, with k_i = m_i / "
                        "||W0 + s_i B_i A_i|| of each DoRA input), so it has no DoRA form m (W0 + BA) / ||W0 + BA||; "
                        "change the weights, or give `rank` to write the merged change as a LoRA adapter by SVD.")
    a = torch.cat(a_blocks, dim=0).float()
    b = (torch.cat(b_blocks, dim=1) / row_scale[:, None]).float()
    m = row_scale * torch.linalg.norm(w0 + b.double() @ a.double(), dim=1)
    return a, b, m.float(), target


def dora_delta(a: torch.Tensor, b: torch.Tensor, m: torch.Tensor, w0: torch.Tensor) -> torch.Tensor:
    """The change a saved DoRA layer with scale 1 makes: m (W0 + B A) / ||W0 + B A||_c - W0, in fp64."""
    w0 = w0.double()
    direction = w0 + b.double() @ a.double()
    return (m.double() / torch.linalg.norm(direction, dim=1))[:, None] * direction - w0
