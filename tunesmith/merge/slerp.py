"""SLERP: spherical linear interpolation between the base and one other model, tensor by tensor.

    v0 = base tensor, v1 = other tensor, both flattened;  cos theta = <v0/|v0|, v1/|v1|>  (clamped to [-1, 1])
    W = sin((1 - t) theta) / sin theta * v0 + sin(t theta) / sin theta * v1
    W = (1 - t) v0 + t v1                     when |cos theta| > 0.9995 (nearly collinear: plain lerp)

Shoemake 1985, "Animating rotation with quaternion curves", SIGGRAPH '85 (the slerp formula);
applied to weights as mergekit's `slerp` does. t = 0 gives the base, t = 1 the other model; t is
a shared parameter, usually a gradient over the layers with filters per tensor kind, e.g.
    t: [{filter: self_attn, value: [0, 0.5, 0.3, 0.7, 1]}, {filter: mlp, value: [1, 0.5, 0.7, 0.3, 0]}, {value: 0.5}]
Norms under 1e-8 count as 1. Work is in fp32 (fp64 inputs stay fp64), in chunks of about 2^20
entries summed as mergekit sums them, and the result keeps the base's dtype.
"""

from __future__ import annotations

import torch

from tunesmith.merge.registry import MergeMethod, Param

CHUNK = 1024 * 1024
DOT_THRESHOLD = 0.9995


def slerp_tensors(t: float, v0: torch.Tensor, v1: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    dtype = torch.float64 if v0.dtype == torch.float64 else torch.float32
    a, b = v0.reshape(1, -1), v1.reshape(1, -1)  # (1, n): mergekit's batch axis of one tensor
    t = torch.tensor([[t]], dtype=dtype)
    if not a.shape[1]:
        return ((1 - t) * a + t * b).reshape(v0.shape).to(v0.dtype)
    chunks = [slice(s, s + CHUNK) for s in range(0, a.shape[1], CHUNK)]
    # the norm of per-chunk norms, as mergekit computes it
    norm_a = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(a[:, c].to(dtype), dim=1, keepdim=True)
                                                   for c in chunks]), dim=0)
    norm_b = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(b[:, c].to(dtype), dim=1, keepdim=True)
                                                   for c in chunks]), dim=0)
    norm_a = torch.where(norm_a > eps, norm_a, 1)
    norm_b = torch.where(norm_b > eps, norm_b, 1)
    dot = torch.stack([((a[:, c].to(dtype) / norm_a) * (b[:, c].to(dtype) / norm_b)).sum(dim=1, keepdim=True)
                       for c in chunks]).sum(dim=0).clamp(-1, 1)
    linear = dot.abs() > DOT_THRESHOLD
    theta = torch.acos(torch.where(linear, 0, dot))
    sin_theta = torch.sin(theta)
    coef_a = torch.where(linear, 1 - t, torch.sin((1 - t) * theta) / sin_theta)
    coef_b = torch.where(linear, t, torch.sin(t * theta) / sin_theta)
    result = torch.empty_like(a)
    for c in chunks:
        result[:, c] = coef_a * a[:, c].to(dtype) + coef_b * b[:, c].to(dtype)
    return result.reshape(v0.shape)


def slerp(base, tensors, shared, per_model):
    return slerp_tensors(shared["t"], base, tensors[0])


SLERP = MergeMethod(name="slerp", merge=slerp, base="required", min_inputs=2, max_inputs=2,
                    params={"t": Param(float)}, paper="Shoemake 1985")
