"""Sampling inside training: G completions per prompt, batched, with a KV cache, seeded per row.

    prefill   the N prompts, left-padded to one length L (attention mask 0 on the padding,
              position ids from the cumulative mask: p = cumsum(mask) - 1), ONCE each:
              logits (N, V) at the last position, cache (N, heads, L, d) per layer
    share     cache.batch_repeat_interleave(G): rows i*G .. i*G+G-1 are prompt i's samples, B = N*G
    decode    next = pick(logits) for every unfinished row; feed it with mask 1 and position p+1;
              a row ends on any id of stop_ids (kept in its output) or at max_new_tokens; finished
              rows leave the batch (cache.batch_select_indices), the loop ends when none is left

    pick      temperature 0: argmax. Else the same warpers as transformers' generate, in its order:
              scores = logits / temperature
              top_k > 0: keep the k largest scores (TopKLogitsWarper; ties at the k-th: exactly k here)
              top_p < 1: over p = softmax(scores) sorted descending, keep a token while the mass before
                         it is below top_p (TopPLogitsWarper: the fewest tokens reaching top_p, at least 1)
              then one draw by inverse CDF: token = the first index whose cumulative kept mass exceeds
              u * (total kept mass), u ~ U[0, 1) (cumulative sums in float64, so rounding cannot pick a
              token of zero mass)

Seeding: row j of prompt i takes its uniforms u_1 .. u_max_new_tokens from its own torch.Generator (CPU)
seeded with (seeds[i] * 1_000_003 + j) mod 2**64, drawn once at the start (one small op per row per call,
none per step). A completion is thus a function of (model, prompt, seeds[i], j, cfg) alone: the same in any
batch, in any order, with any other prompts, and on any device up to the model's own numerics. The caller
derives seeds[i] from (train.seed, step, prompt), so a resumed run draws the same completions.

Why this shape: TRL's GRPO generates each of the G samples of a prompt as a separate row of
`model.generate`, prefilling the same prompt G times, and keeps finished rows in the batch (fed padding)
until the longest one ends. Here each prompt is prefilled once and finished rows stop costing compute.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

SEED_STRIDE = 1_000_003  # row j of prompt i: seeds[i] * SEED_STRIDE + j (rows < SEED_STRIDE never collide)

# Tokens that end a turn or a document when a tokenizer also uses them as padding (SmolLM2, Qwen, Llama 3).
_END_TOKEN_TEXTS = {"<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end_of_text|>", "<end_of_turn>", "</s>",
                    "<|end|>", "<eos>"}


@dataclass
class SamplingConfig:
    max_new_tokens: int = 64
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    stop_ids: tuple[int, ...] = ()  # every end token of the model's generation config (end_token_ids)


@dataclass
class Completion:
    prompt_index: int  # which prompt of the call
    token_ids: list[int]  # the sampled tokens, including the stop token if one was drawn
    finished: bool  # True: ended on a stop id; False: cut at max_new_tokens (truncated)


def sample(model, prompts: list[list[int]], num_generations: int, cfg: SamplingConfig, seeds: list[int],
           pad_id: int, progress=None) -> list[list[Completion]]:
    """For each prompt i, num_generations completions, drawn with generators seeded from seeds[i]
    (the caller derives seeds[i] from (train.seed, step, prompt identity)); row j of prompt i is
    fully determined by (seeds[i], j) and the model, independent of batch composition.

    `progress(n)`, if given, is called after each decode step with the n tokens that step produced.
    Runs under torch.no_grad() in eval mode and restores the model's train/eval mode."""
    import torch

    _check(prompts, num_generations, cfg, seeds)
    if not prompts:
        return []
    if cfg.max_new_tokens == 0:
        return [[Completion(i, [], False) for _ in range(num_generations)] for i in range(len(prompts))]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            rows = _decode(model, prompts, num_generations, cfg, seeds, pad_id, progress)
    finally:
        model.train(was_training)
    stops = set(cfg.stop_ids)
    g = num_generations
    return [[Completion(i, rows[i * g + j], bool(rows[i * g + j]) and rows[i * g + j][-1] in stops)
             for j in range(g)] for i in range(len(prompts))]


def end_token_ids(model, tokenizer) -> tuple[int, ...]:
    """All end tokens from the model's generation_config (eos_token_id may be a list) plus the tokenizer's eos.

    The model config's eos, and the pad token when its text is an end-of-turn or end-of-text token (SmolLM2
    pads with <|im_end|>), count too: a model trained to end there must stop there. Sorted, without repeats."""
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), getattr(model, "config", None)):
        ids |= _as_ids(getattr(source, "eos_token_id", None))
    if tokenizer is not None:
        ids |= _as_ids(tokenizer.eos_token_id)
        if tokenizer.pad_token_id is not None and tokenizer.pad_token in _END_TOKEN_TEXTS:
            ids.add(int(tokenizer.pad_token_id))
    return tuple(sorted(ids))


def _as_ids(value) -> set[int]:
    if value is None:
        return set()
    return {int(v) for v in value} if isinstance(value, (list, tuple, set)) else {int(value)}


def _check(prompts, num_generations: int, cfg: SamplingConfig, seeds) -> None:
    """Caller bugs, said plainly (the user's values are validated by the objective's config)."""
    if len(seeds) != len(prompts):
        raise ValueError(f"sample: {len(seeds)} seeds for {len(prompts)} prompts; one seed per prompt")
    if num_generations < 1 or cfg.max_new_tokens < 0 or cfg.temperature < 0 or cfg.top_k < 0:
        raise ValueError(f"sample: num_generations must be >= 1 and max_new_tokens, temperature, top_k >= 0; "
                         f"got {num_generations}, {cfg}")
    if not 0 < cfg.top_p <= 1:
        raise ValueError(f"sample: top_p must be in (0, 1], got {cfg.top_p}")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("sample: every prompt needs at least one token")


def _decode(model, prompts, g: int, cfg: SamplingConfig, seeds, pad_id: int, progress,
            record=None) -> list[list[int]]:
    """The token ids of the N*G rows (row i*G + j: prompt i, sample j); see the module docstring.
    `record(rows, logits)`, for tests: each step's logits (b, V) and the rows they belong to."""
    import torch

    device = next(model.parameters()).device
    logits, cache, cache_arg, mask, next_pos = _prefill(model, prompts, g, pad_id, device)
    uniforms = None if cfg.temperature <= 0 else _uniforms(seeds, g, cfg.max_new_tokens).to(device)  # (B, T)
    active = torch.arange(len(prompts) * g, device=device)  # the original row of each batch row
    active_rows = active.tolist()
    outputs: list[list[int]] = [[] for _ in active_rows]
    stops = set(cfg.stop_ids)
    for step in range(cfg.max_new_tokens):
        if record is not None:
            record(list(active_rows), logits)
        tokens = pick(logits, cfg, None if uniforms is None else uniforms[active, step])  # (b,)
        drawn = tokens.tolist()  # the one host sync of a step
        for row, token in zip(active_rows, drawn):
            outputs[row].append(token)
        if progress is not None:
            progress(len(drawn))
        going = [k for k, token in enumerate(drawn) if token not in stops]
        if step + 1 == cfg.max_new_tokens or not going:
            break
        if len(going) < len(drawn):  # drop the finished rows from the batch and the cache
            keep = torch.tensor(going, device=device)
            cache.batch_select_indices(keep)
            active, mask, next_pos, tokens = active[keep], mask[keep], next_pos[keep], tokens[keep]
            active_rows = [active_rows[k] for k in going]
        mask = torch.cat([mask, mask.new_ones(len(going), 1)], dim=1)  # (b, L + step + 1)
        out = model(input_ids=tokens[:, None], attention_mask=mask, position_ids=next_pos[:, None],
                    use_cache=True, **{cache_arg: cache})
        cache = out[cache_arg]
        logits = out.logits[:, -1].float()
        next_pos = next_pos + 1
    return outputs


def _prefill(model, prompts, g: int, pad_id: int, device):
    """Run the N prompts once, left-padded, and share each one's cache with its G rows. Returns the last logits
    (N*G, V), the cache, its keyword, the attention mask (N*G, L) and each row's next position (N*G,)."""
    import torch

    lengths = [len(p) for p in prompts]
    width = max(lengths)
    ids = torch.tensor([[pad_id] * (width - n) + list(p) for p, n in zip(prompts, lengths)], device=device)
    mask = (torch.arange(width, device=device) >= width - torch.tensor(lengths, device=device)[:, None]).long()
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # (N, L): 0 .. n-1 on each prompt's own tokens
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                **_last_logits_only(model))
    cache_arg = "cache" if "cache" in out else "past_key_values"  # transformers 5 renamed it, in and out
    cache = out[cache_arg]
    cache.batch_repeat_interleave(g)  # (N, ...) -> (N*G, ...): every sample reads its prompt's one prefill
    logits = out.logits[:, -1].float().repeat_interleave(g, dim=0)  # (B, V)
    next_pos = torch.tensor(lengths, device=device).repeat_interleave(g)  # (B,) position of the next token
    return logits, cache, cache_arg, mask.repeat_interleave(g, dim=0), next_pos


def _last_logits_only(model) -> dict:
    """`logits_to_keep=1` where the forward takes it: the prefill computes logits (N, 1, V), not (N, L, V)."""
    forward = getattr(model, "_orig_mod", model).forward  # through torch.compile's wrapper
    return {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(forward).parameters else {}


def _uniforms(seeds, g: int, steps: int):
    """(N*G, steps) float64 uniforms in [0, 1): row i*G + j from its own generator, seeded from (seeds[i], j)."""
    import torch

    rows = []
    for seed in seeds:
        for j in range(g):
            generator = torch.Generator().manual_seed((int(seed) * SEED_STRIDE + j) % 2**64)
            rows.append(torch.rand(steps, generator=generator, dtype=torch.float64))
    return torch.stack(rows)


def pick(logits, cfg: SamplingConfig, u):
    """The next token of each row (b,) from logits (b, V): argmax at temperature 0, else the inverse-CDF draw
    with uniforms u (b,) from the temperature / top-k / top-p distribution of the module docstring."""
    import torch

    if cfg.temperature <= 0:
        return logits.argmax(dim=-1)
    scores = logits / cfg.temperature
    order = None
    if cfg.top_k > 0 and cfg.top_k < scores.shape[-1]:
        scores, order = scores.topk(cfg.top_k, dim=-1)  # (b, k), descending
    elif cfg.top_p < 1:
        scores, order = scores.sort(dim=-1, descending=True)  # (b, V)
    probs = torch.softmax(scores, dim=-1)
    if cfg.top_p < 1:
        before = probs.cumsum(dim=-1) - probs  # mass of the more likely tokens
        probs = probs.masked_fill(before >= cfg.top_p, 0.0)
    cdf = probs.double().cumsum(dim=-1)  # (b, n)
    target = (u.to(cdf.device, torch.float64) * cdf[:, -1]).unsqueeze(-1)  # (b, 1), in [0, total)
    index = torch.searchsorted(cdf, target, right=True).clamp(max=cdf.shape[-1] - 1)  # first cdf > target
    return index.squeeze(-1) if order is None else order.gather(-1, index).squeeze(-1)
