"""How far one model's next-token distributions are from another's, on held-out text.

    KL(p || q) = sum_v p(v) (log p(v) - log q(v))      per token position, in nats, averaged over all
    top-1 agreement = share of positions where argmax p = argmax q

p is the reference (the adapter on its 4-bit base for a QLoRA merge; the source model for an
export). Used by `tunesmith merge` on QLoRA adapters and by bench/gguf_export.py.
"""

from __future__ import annotations

import torch

HELD_OUT_SEED = 4242  # a seed no demo split uses


def held_out_texts(tokenizer, n: int = 8, seed: int = HELD_OUT_SEED) -> list[str]:
    """Demo-task conversations, answers included, rendered with the chat template (plain text without one)."""
    from tunesmith.data.demo import demo_rows

    rows = demo_rows(n, seed=seed)
    if getattr(tokenizer, "chat_template", None):
        return [tokenizer.apply_chat_template(row["messages"], tokenize=False) for row in rows]
    return ["\n".join(m["content"] for m in row["messages"]) for row in rows]


@torch.no_grad()
def log_probs(model, tokenizer, texts: list[str]) -> list[torch.Tensor]:
    """Each text's (positions, vocabulary) next-token log-probabilities, float64 on the CPU."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        out = []
        for text in texts:
            ids = tokenizer(text, return_tensors="pt").input_ids.to(device)
            out.append(torch.log_softmax(model(ids).logits[0].double(), -1).cpu())
        return out
    finally:
        model.train(was_training)


def compare(reference: list[torch.Tensor], other: list[torch.Tensor]) -> dict[str, float]:
    """{"kl": mean KL(reference || other) per position, "top1": agreement of the most likely tokens}."""
    kl, agree, positions = 0.0, 0, 0
    for p, q in zip(reference, other):
        kl += float((p.exp() * (p - q)).sum())
        agree += int((p.argmax(-1) == q.argmax(-1)).sum())
        positions += p.shape[0]
    return {"kl": kl / positions, "top1": agree / positions}
