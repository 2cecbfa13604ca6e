"""Model Stock: average the fine-tunes, then pull the average toward the base by their agreement.

    tau_i = W_i - W_0 (i = 1..N, N >= 2);  cos theta = mean over pairs i < j of <tau_i, tau_j> / (|tau_i| |tau_j|)
    t = N cos theta / (1 + (N - 1) cos theta)
    W = t * mean_i W_i + (1 - t) * W_0

Jang et al. 2024, "Model Stock: All we need is just a few fine-tuned models", arXiv:2403.19522,
Eq. 5 (t from the angle between fine-tunes) and Eq. 6 (the interpolation). Per tensor by default;
filter_wise: true computes one angle and t per row (output filter). Where 1 + (N - 1) cos theta
is below 1e-6 in magnitude the update is undefined and the base is kept (mergekit's rule); norm
products are clamped at 1e-6 and cosines to [-1, 1].
"""

from __future__ import annotations

import torch

from tunesmith.merge.registry import MergeMethod, Param


def model_stock(base, tensors, shared, per_model):
    w0, ws = base, list(tensors)
    shape = w0.shape
    if shared["filter_wise"]:
        if w0.dim() == 1:
            w0, ws = w0.unsqueeze(0), [w.unsqueeze(0) for w in ws]
    else:
        w0, ws = w0.reshape(-1), [w.reshape(-1) for w in ws]
    offsets = [w - w0 for w in ws]
    cosines = []
    for i, a in enumerate(offsets):
        for b in offsets[i + 1:]:
            norms = torch.norm(a, dim=-1) * torch.norm(b, dim=-1)
            cosines.append(((a * b).sum(dim=-1) / norms.clamp(min=1e-6)).clamp(-1, 1))
    cos_theta = torch.stack(cosines).mean(dim=0).unsqueeze(-1)
    n = len(ws)
    denominator = 1 + (n - 1) * cos_theta
    singular = denominator.abs() < 1e-6
    safe = torch.where(singular, torch.ones_like(denominator), denominator)
    t = torch.where(singular, torch.zeros_like(cos_theta), (n * cos_theta) / safe)
    average = sum(ws) / n
    return (t * average + (1 - t) * w0).reshape(shape)


MODEL_STOCK = MergeMethod(name="model_stock", merge=model_stock, base="required", min_inputs=3,
                          params={"filter_wise": Param(bool, False)}, paper="arXiv:2403.19522")
