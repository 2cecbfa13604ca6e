"""LoRA on an embedding table: a frozen nn.Embedding plus a trainable low-rank update of its rows.

The same tensors and math as PEFT's `lora.Embedding` (peft/tuners/lora/layer.py), so the adapter loads in peft.
For a table E0 (num, dim) and token ids x:

    h = E0[x] + s * A^T[x] B^T        A (r, num), B (dim, r), s = alpha / r  (alpha / sqrt(r) with rsLoRA)

so the table's update is dE = s (B A)^T, shape (num, dim): token t's row moves by s B A[:, t], A[:, t] being a
free r-vector per token and B a map from r to dim shared by all tokens. Training looks up r numbers per token;
nothing of size (num, dim) is built until merging.

Initialisation (PEFT's, the transpose of the linear layer's): A = 0, B ~ N(0, 1), so dE = 0 and the model starts
equal to its base. Only tokens that occur in training get gradients in A.

Why: LoRA on the linear layers leaves every token embedding frozen, so words whose sub-word pieces the base model
never learned (an in-house jargon, new product names) can only be reinterpreted by the layers above them. Full
fine-tuning moves those rows; this moves them with r * (num + dim) parameters (docs/embeddings.md: the demo).

No dropout is applied (PEFT applies none to embedding lookups), and LoRA+ (method.lora_plus_ratio) leaves A and B
at the base learning rate (its faster rate is for the zero-initialised B of a linear layer). Saved as
base_model.model.<path>.lora_embedding_A (r, num) and .lora_embedding_B (dim, r), no ".weight" suffix (io.py).
Only a plain nn.Embedding is adapted: a subclass may scale or change its lookup (Gemma's scaled embeddings), which
this forward would skip.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class LoRAEmbedding(nn.Module):
    """`h = E0[x] + s * A^T[x] B^T` around a frozen nn.Embedding; see the module docstring. Owns the base's
    `weight` (the same Parameter), so the base checkpoint's key `<path>.weight` is unchanged."""

    def __init__(self, base: nn.Embedding, r: int, alpha: float, rslora: bool = False):
        if r < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {r}")
        super().__init__()
        self.num_embeddings, self.embedding_dim = base.num_embeddings, base.embedding_dim
        self.padding_idx, self.max_norm, self.norm_type = base.padding_idx, base.max_norm, base.norm_type
        self.scale_grad_by_freq, self.sparse = base.scale_grad_by_freq, base.sparse
        self.weight = base.weight
        self.weight.requires_grad_(False)
        self.r, self.alpha, self.rslora = r, alpha, rslora
        self.scaling = alpha / math.sqrt(r) if rslora else alpha / r
        kw = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_embedding_A = nn.Parameter(torch.zeros(r, self.num_embeddings, **kw))  # A: (r, num)
        self.lora_embedding_B = nn.Parameter(torch.empty(self.embedding_dim, r, **kw))  # B: (dim, r)
        nn.init.normal_(self.lora_embedding_B)
        self.merged = False
        self.disabled = False

    def _lookup(self, x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        return F.embedding(x, table, self.padding_idx, self.max_norm, self.norm_type, self.scale_grad_by_freq,
                           self.sparse)

    def _update(self, x: torch.Tensor) -> torch.Tensor:
        """s * A^T[x] B^T: (..., r) rows of A^T looked up, then mapped to (..., dim)."""
        return (self._lookup(x, self.lora_embedding_A.T) @ self.lora_embedding_B.T) * self.scaling

    def delta_weight(self) -> torch.Tensor:
        """dE = s (B A)^T, shape (num, dim), in the table's dtype (multiplied in fp32)."""
        delta = self.lora_embedding_B.float() @ self.lora_embedding_A.float()  # (dim, r) @ (r, num)
        return (delta.T * self.scaling).to(self.weight.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self._lookup(x, self.weight)
        if self.merged:  # the update lives in the table; take it back out only if adapters are off
            return out - self._update(x).to(out.dtype) if self.disabled else out
        if self.disabled:
            return out
        return out + self._update(x).to(out.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        """E <- E0 + dE. Harmless when already merged."""
        if not self.merged:
            self.weight.add_(self.delta_weight())
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """E <- E - dE, back to E0 (up to rounding). Harmless when not merged."""
        if self.merged:
            self.weight.sub_(self.delta_weight())
            self.merged = False

    def to_embedding(self) -> nn.Embedding:
        """A plain nn.Embedding holding E0 + dE (merges this module in place; no copy of the table)."""
        self.merge()
        plain = nn.Embedding(self.num_embeddings, self.embedding_dim, self.padding_idx, self.max_norm, self.norm_type,
                             self.scale_grad_by_freq, self.sparse, device="meta")
        plain.weight = self.weight
        return plain

    def extra_repr(self) -> str:
        return (f"{self.num_embeddings}, {self.embedding_dim}, r={self.r}, alpha={self.alpha}, rslora={self.rslora}, "
                f"merged={self.merged}, disabled={self.disabled}")
