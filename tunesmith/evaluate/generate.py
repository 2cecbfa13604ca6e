"""Generation for evaluation and the `generate`/`chat` commands: greedy, or sampled (eval.temperature).

Prompts are rendered with the model's chat template and left-padded, so a batch of prompts of
different lengths ends at the same position and generation continues for all of them at once.
Sampled answers start from torch.manual_seed(seed): the same seed, batch size and device give the
same answers.
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
             progress: bool = False, desc: str = "generate", temperature: float = 0.0, top_p: float = 1.0,
             seed: int = 0) -> list[str]:
    """Completions of `prompts` (already rendered text), without the prompt: greedy at temperature 0, else
    sampled at that temperature from the top_p nucleus. Sampling leaves torch's random state as it found it."""
    device = next(model.parameters()).device
    if temperature <= 0:
        return _generate(model, tokenizer, prompts, max_new_tokens, batch_size, progress, desc, {"do_sample": False})
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": 0}  # no top-k cut
        return _generate(model, tokenizer, prompts, max_new_tokens, batch_size, progress, desc, sampling)


def _generate(model, tokenizer, prompts, max_new_tokens, batch_size, progress, desc, sampling: dict) -> list[str]:
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
                **sampling,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
            new = out[:, enc["input_ids"].shape[1]:]  # (B, new tokens)
            outputs += tokenizer.batch_decode(new, skip_special_tokens=True)
    finally:
        tokenizer.padding_side = side
    return [o.strip() for o in outputs]
