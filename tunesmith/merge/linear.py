"""Linear merge: the weighted average of the models ("model soups").

    W = sum_i w_i W_i / sum_i w_i          (normalize: true, the default)
    W = sum_i w_i W_i                      (normalize: false)

Wortsman et al. 2022, "Model soups: averaging weights of multiple fine-tuned models improves
accuracy without increasing inference time", arXiv:2203.05482 (uniform soup, Section 3). There is
no base model: when base_model is set, it is one more input and needs a weight like the others.
Computed in fp32 (fp64 for fp64 inputs), accumulated in input order, then cast back, as mergekit.
"""

from __future__ import annotations

import torch

from tunesmith.merge.registry import MergeMethod, Param


def linear(base, tensors: list[torch.Tensor], shared: dict, per_model: list[dict]) -> torch.Tensor:
    first = tensors[0]
    dtype = torch.float64 if first.dtype == torch.float64 else torch.float32
    weights = torch.tensor([p["weight"] for p in per_model], dtype=dtype)
    result = tensors[0].to(dtype) * weights[0]  # w_0 W_0 (a pass saved over zeros and one more addcmul)
    for tensor, w in zip(tensors[1:], weights[1:]):
        result.addcmul_(tensor, w)
    if shared["normalize"]:
        result.div_(weights.sum())
    return result.to(first.dtype)


LINEAR = MergeMethod(
    name="linear", merge=linear, base="none",
    params={"weight": Param(float, per_model=True), "normalize": Param(bool, True)},
    paper="arXiv:2203.05482", elementwise=True,
)
