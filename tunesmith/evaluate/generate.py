"""Greedy generation for evaluation and the `generate`/`chat` commands.

Prompts are rendered with the model's chat template and left-padded, so a batch of prompts of
different lengths ends at the same position and generation continues for all of them at once.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm


def render_prompt(tokenizer, messages: list[dict]) -> str:
    """The chat-template text that asks the model for the next assistant turn."""
    if tokenizer.chat_template:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return "\n".join(m["content"] for m in messages)  # plain LM: continue the text


@torch.no_grad()
def generate(model, tokenizer, prompts: list[str], max_new_tokens: int = 128, batch_size: int = 16,
             progress: bool = False, desc: str = "generate") -> list[str]:
    """Greedy completions of `prompts` (already rendered text), without the prompt."""
    device = next(model.parameters()).device
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    outputs: list[str] = []
    starts = range(0, len(prompts), batch_size)
    try:
        for start in tqdm(starts, desc=desc, unit="batch", disable=not progress, dynamic_ncols=True):
            enc = tokenizer(prompts[start : start + batch_size], return_tensors="pt", padding=True,
                            add_special_tokens=False).to(device)
            out = model.generate(
                **enc,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
            new = out[:, enc["input_ids"].shape[1]:]  # (B, new tokens)
            outputs += tokenizer.batch_decode(new, skip_special_tokens=True)
    finally:
        tokenizer.padding_side = side
    return [o.strip() for o in outputs]
