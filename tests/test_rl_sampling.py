"""The RL sampler (tunesmith/rl/sampling.py): logits of a padded, cache-sharing batch equal each prompt run alone;
greedy equals transformers' generate; samples depend only on (prompt, seed, row); stops, truncation, progress."""

from __future__ import annotations

import pytest
import torch
from conftest import build_tiny_model, build_tiny_tokenizer, lora_model

from tunesmith.rl.sampling import SamplingConfig, _decode, end_token_ids, pick, sample

PAD = 2
PROMPTS = [[5, 6, 7], [10, 11, 2, 13, 2, 15, 16], [20], [30, 31, 32, 33]]  # PAD inside a prompt: kept


@pytest.fixture(scope="module")
def model():
    """The tiny Llama with an untied head and weights x8: sharp, varied next-token distributions (the plain tiny
    model mostly repeats its last token, which would make greedy comparisons trivial)."""
    m = build_tiny_model(tie=False)
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() == 2:
                p.mul_(8)
    return m


def reference_generate(model, prompts, max_new_tokens, stop_ids, pad=PAD):
    """transformers' greedy generate on the left-padded batch, each row cut after its first stop id."""
    width = max(map(len, prompts))
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=max_new_tokens,
                             pad_token_id=pad, eos_token_id=list(stop_ids) or None)
    rows = []
    for row in out[:, width:].tolist():
        cut = next((k + 1 for k, t in enumerate(row) if t in stop_ids), len(row))
        rows.append(row[:cut])
    return rows


def tokens(result):
    return [[c.token_ids for c in group] for group in result]


def test_batched_logits_equal_each_prompt_alone(model):
    """Left padding, shared prefill cache and dropped rows: every step's logits of every row equal the row's
    whole sequence (prompt + completion) run alone without a cache, within 1e-5."""
    cfg = SamplingConfig(max_new_tokens=6, temperature=1.0, stop_ids=tuple(range(0, 320, 3)))  # rows end early
    seen: dict[int, list[torch.Tensor]] = {}

    def record(rows, logits):
        for k, row in enumerate(rows):
            seen.setdefault(row, []).append(logits[k].clone())

    with torch.no_grad():
        rows = _decode(model, PROMPTS, 2, cfg, [1, 2, 3, 4], PAD, None, record=record)
        lengths = [len(r) for r in rows]
        assert min(lengths) < max(lengths)  # some rows left the batch before others
        for row, completion in enumerate(rows):
            prompt = PROMPTS[row // 2]
            full = model(torch.tensor([prompt + completion])).logits[0]  # (T, V)
            alone = full[len(prompt) - 1: len(prompt) - 1 + len(completion)]
            assert len(seen[row]) == len(completion)
            torch.testing.assert_close(torch.stack(seen[row]), alone, atol=1e-5, rtol=0)


def test_greedy_equals_transformers_generate(model):
    """Temperature 0 reproduces generate(do_sample=False) token for token, with stops in some rows."""
    free = sample(model, PROMPTS, 1, SamplingConfig(max_new_tokens=10, temperature=0), [0] * 4, PAD)
    # stop on the 4th greedy token of row 0 and the 2nd of row 2: those rows end early, the others run on
    stop_ids = (free[0][0].token_ids[3], free[2][0].token_ids[1])
    cfg = SamplingConfig(max_new_tokens=10, temperature=0, stop_ids=stop_ids)
    got = sample(model, PROMPTS, 1, cfg, [0] * 4, PAD)
    expected = reference_generate(model, PROMPTS, 10, stop_ids)
    assert [g[0].token_ids for g in got] == expected
    assert [g[0].finished for g in got] == [len(e) < 10 or e[-1] in stop_ids for e in expected]
    assert got[0][0].finished and len(got[0][0].token_ids) <= 4


def test_top_k_1_and_tiny_top_p_are_greedy(model):
    greedy = tokens(sample(model, PROMPTS, 1, SamplingConfig(max_new_tokens=8, temperature=0), [0] * 4, PAD))
    for cfg in (SamplingConfig(max_new_tokens=8, temperature=1.0, top_k=1),
                SamplingConfig(max_new_tokens=8, temperature=1.5, top_p=1e-6)):
        got = tokens(sample(model, PROMPTS, 3, cfg, [7, 8, 9, 10], PAD))
        assert got == [[g[0]] * 3 for g in greedy]


def test_samples_independent_of_batch_and_order(model):
    """Row j of prompt i depends on (prompt, seeds[i], j) only: alone, inside a batch, reordered, the same."""
    cfg = SamplingConfig(max_new_tokens=8, temperature=1.0)
    batch = tokens(sample(model, PROMPTS, 3, cfg, [11, 12, 13, 14], PAD))
    alone = tokens(sample(model, [PROMPTS[1]], 3, cfg, [12], PAD))
    reordered = tokens(sample(model, PROMPTS[::-1], 3, cfg, [14, 13, 12, 11], PAD))
    assert alone[0] == batch[1]
    assert reordered[::-1] == batch
    assert len({tuple(t) for t in batch[1]}) == 3  # the G rows differ from each other
    other_seed = tokens(sample(model, [PROMPTS[1]], 3, cfg, [99], PAD))
    assert other_seed[0] != batch[1]


def test_pick_matches_transformers_warpers():
    """Over a fine grid of uniforms, pick's token frequencies equal the probabilities after transformers'
    temperature, top-k and top-p warpers (so the kept set and the renormalised mass are theirs)."""
    from transformers.generation.logits_process import (TemperatureLogitsWarper, TopKLogitsWarper,
                                                        TopPLogitsWarper)

    logits = torch.randn(1, 40, generator=torch.Generator().manual_seed(3)) * 2
    n = 20_000
    u = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    for temperature, top_k, top_p in ((0.7, 0, 1.0), (1.0, 5, 1.0), (1.3, 0, 0.6), (0.9, 12, 0.8)):
        cfg = SamplingConfig(temperature=temperature, top_k=top_k, top_p=top_p)
        scores = TemperatureLogitsWarper(temperature)(None, logits.clone())
        if top_k:
            scores = TopKLogitsWarper(top_k)(None, scores)
        if top_p < 1:
            scores = TopPLogitsWarper(top_p)(None, scores)
        expected = torch.softmax(scores, dim=-1)[0].double()
        drawn = pick(logits.expand(n, -1), cfg, u)
        freq = torch.bincount(drawn, minlength=40).double() / n
        assert ((freq > 0) == (expected > 0)).all()
        torch.testing.assert_close(freq, expected, atol=2 / n, rtol=0)


def test_stops_truncation_and_progress(model):
    """Rows end on any stop id (kept, finished) or at max_new_tokens (not finished); progress counts every
    token once; the loop ends as soon as every row has finished."""
    calls: list[int] = []
    stop_ids = tuple(range(0, 320, 4))  # a quarter of the vocabulary: rows end within a few tokens
    cfg = SamplingConfig(max_new_tokens=40, temperature=1.0, stop_ids=stop_ids)
    result = sample(model, PROMPTS, 4, cfg, [1, 2, 3, 4], PAD, progress=calls.append)
    flat = [c for group in result for c in group]
    assert [c.prompt_index for c in flat] == [i for i in range(4) for _ in range(4)]
    for c in flat:
        assert all(t not in stop_ids for t in c.token_ids[:-1])
        assert c.finished == (c.token_ids[-1] in stop_ids)
        assert c.finished or len(c.token_ids) == 40
    assert sum(calls) == sum(len(c.token_ids) for c in flat)
    assert len(calls) == max(len(c.token_ids) for c in flat) < 40  # stopped early, nothing after the last row
    assert calls == sorted(calls, reverse=True)  # finished rows left the batch
    short = sample(model, PROMPTS[:1], 2, SamplingConfig(max_new_tokens=3, temperature=1.0), [5], PAD)
    assert all(len(c.token_ids) == 3 and not c.finished for c in short[0])


def test_lora_model_and_train_mode_restored():
    """Through a tunesmith LoRA model (B made non-zero, so the adapter changes the output): greedy equals
    generate, and a model in train mode is back in train mode afterwards."""
    model, _ = lora_model()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))) * 0.5)
    model.train()
    got = sample(model, PROMPTS, 1, SamplingConfig(max_new_tokens=6, temperature=0), [0] * 4, PAD)
    assert model.training
    model.eval()
    assert [g[0].token_ids for g in got] == reference_generate(model, PROMPTS, 6, ())
    base = build_tiny_model()
    assert [g[0].token_ids for g in got] != reference_generate(base, PROMPTS, 6, ())


def test_end_token_ids_and_arguments():
    model = build_tiny_model()
    model.generation_config.eos_token_id = [2, 7]
    tok = build_tiny_tokenizer()  # eos and pad: <|im_end|>
    assert end_token_ids(model, tok) == tuple(sorted({2, 7, tok.eos_token_id, tok.pad_token_id}))
    with pytest.raises(ValueError, match="seeds"):
        sample(model, PROMPTS, 2, SamplingConfig(), [1], PAD)
    empty = sample(model, PROMPTS[:2], 2, SamplingConfig(max_new_tokens=0), [1, 2], PAD)
    assert [[c.token_ids for c in g] for g in empty] == [[[], []], [[], []]]


@pytest.mark.integration
def test_default_model_greedy_and_end_of_turn():
    """SmolLM2 (pad = eos = <|im_end|>, also a token inside chat prompts): on two chat prompts of different
    lengths, every greedy token is the argmax of the prompt and completion run alone, and rows end on <|im_end|>."""
    from tunesmith.config import ModelConfig
    from tunesmith.models.loading import load_model_and_tokenizer

    model, tok = load_model_and_tokenizer(ModelConfig())
    stops = end_token_ids(model, tok)
    assert tok.convert_tokens_to_ids("<|im_end|>") in stops
    questions = ["What is 2+3? Answer with a number.", "Name a color, one word."]
    prompts = [list(tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                            tokenize=True, return_dict=True)["input_ids"]) for q in questions]
    assert len(set(map(len, prompts))) == 2 and all(tok.pad_token_id in p for p in prompts)
    got = sample(model, prompts, 1, SamplingConfig(max_new_tokens=12, temperature=0, stop_ids=stops), [0, 0],
                 tok.pad_token_id)
    for prompt, (completion,) in zip(prompts, got):
        with torch.no_grad():
            alone = model(torch.tensor([prompt + completion.token_ids])).logits[0, len(prompt) - 1:-1]
        assert alone.argmax(-1).tolist() == completion.token_ids
    assert any(c.finished and c.token_ids[-1] in stops for (c,) in got)
