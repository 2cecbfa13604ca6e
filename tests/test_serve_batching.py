"""The continuous-batching engine (tunesmith/serve/batching.py) against the serial one: interleaved requests with
different adapters, prompt lengths, budgets and chunked prefill give the same greedy answers; requests join and
leave a running batch; a long prompt does not stall running streams; static batching admits only when empty."""

from __future__ import annotations

import asyncio
import time

import pytest
import torch

from conftest import build_tiny_model, build_tiny_tokenizer
from test_serve import make_adapter

ADAPTERS = {"lora": ("lora", {"r": 4, "alpha": 8}), "dora": ("dora", {"r": 2, "alpha": 4}),
            "vera": ("vera", {"r": 16}), "bottleneck": ("adapter", {"adapter_size": 8})}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("batching")
    build_tiny_model().save_pretrained(root / "base")
    build_tiny_tokenizer().save_pretrained(root / "base")
    for k, (name, (method, options)) in enumerate(ADAPTERS.items()):
        make_adapter(root / "base", root / name, method, 20 + k, **options)
    return root


def engine(folders, kind: str, **options):
    """A started engine of `kind` over the tiny base with every adapter of ADAPTERS loaded."""
    from tunesmith.config import ModelConfig
    from tunesmith.models.loading import load_model_and_tokenizer
    from tunesmith.serve.adapters import AdapterRegistry
    from tunesmith.serve.batching import BatchingEngine
    from tunesmith.serve.engine import SerialEngine

    model, tok = load_model_and_tokenizer(ModelConfig(name_or_path=str(folders / "base")))
    model.requires_grad_(False)
    registry = AdapterRegistry(model, "base", max_loaded=8)
    for name in ADAPTERS:
        registry.load(name, str(folders / name))
    e = SerialEngine(model, tok, registry) if kind == "serial" else BatchingEngine(model, tok, registry, **options)
    e.start()
    return e


def requests():
    """Six requests: every adapter and the base, prompts of 3 to 29 tokens, budgets of 5 to 24."""
    from tunesmith.serve.engine import GenRequest

    g = torch.Generator().manual_seed(3)
    adapters = [None, "lora", "dora", "vera", "bottleneck", "lora"]
    return [GenRequest(torch.randint(3, 320, (3 + 5 * i,), generator=g).tolist(), adapter, 5 + 4 * i)
            for i, adapter in enumerate(adapters)]


async def collect(stream):
    """(token ids, text, finish) of a stream."""
    from tunesmith.serve.engine import Finish

    ids, text = [], ""
    async for item in stream:
        if isinstance(item, Finish):
            return ids, text, item
        ids += item.token_ids
        text += item.text


async def interleaved(e, reqs):
    """Submit the first two, then each next one as soon as the one before it has sent its first piece."""
    tasks = []
    for i, req in enumerate(reqs):
        stream = e.submit(req)
        if i >= 1 and i < len(reqs) - 1:
            first = await stream.__anext__()  # it is running: the next request joins a running batch
            tasks.append(asyncio.ensure_future(_rest(first, stream)))
        else:
            tasks.append(asyncio.ensure_future(collect(stream)))
    return await asyncio.gather(*tasks)


async def _rest(first, stream):
    from tunesmith.serve.engine import Finish

    if isinstance(first, Finish):
        return [], "", first
    ids, text, finish = await collect(stream)
    return first.token_ids + ids, first.text + text, finish


def answers(e, reqs, run=interleaved):
    try:
        return asyncio.run(run(e, reqs))
    finally:
        e.close()


@pytest.fixture(scope="module")
def serial(folders):
    """The serial engine's answers to requests(), one at a time."""
    answered = answers(engine(folders, "serial"), requests())
    assert len({text for _, text, _ in answered}) == len(answered)  # every request answers differently
    return answered


async def at_once(e, reqs):
    return await asyncio.gather(*(collect(e.submit(r)) for r in reqs))


@pytest.mark.parametrize("run, options", [(interleaved, {"max_batch_size": 4, "prefill_chunk": 4}),
                                          (at_once, {"prefill_chunk": 64})], ids=["interleaved", "at-once"])
def test_batching_equals_serial(folders, serial, run, options):
    """Interleaved: joins at every step, 4 slots, prompts read 4 tokens a step. At once: the short prompts are read
    together in one left-padded forward."""
    reqs = requests()
    batched_engine = engine(folders, "batching", **options)
    groups, read = [], batched_engine._prefill_group
    batched_engine._prefill_group = lambda group: (groups.append(len(group)), read(group))[1]
    batched = answers(batched_engine, reqs, run)
    assert max(groups) > 1 if run is at_once else max(groups) == 1
    for i, ((ids, text, finish), (ids2, text2, finish2)) in enumerate(zip(serial, batched)):
        assert text2 == text and finish2.reason == finish.reason, i
        assert finish2.completion_tokens == finish.completion_tokens
        assert finish2.prompt_tokens == len(reqs[i].prompt_ids)
    assert batched_engine.stats["finished"] == len(reqs) and batched_engine.running == []


def test_requests_join_a_running_batch_and_long_prompts_do_not_stall_it(folders):
    from tunesmith.serve.engine import GenRequest

    e = engine(folders, "batching", prefill_chunk=4)
    log = []  # (request index, event) in the order the worker saw them
    emit = e._emit
    e._emit = lambda seq, token: (log.append((seq.request.seed, "token")), emit(seq, token))[1]

    async def run(e, _):
        long = e.submit(GenRequest([5, 6, 7], "lora", max_tokens=60, seed=0))
        await long.__anext__()
        log.append((1, "submitted"))
        late = e.submit(GenRequest(list(range(10, 50)), "dora", max_tokens=3, seed=1))  # 40 tokens: 10 chunks
        return await asyncio.gather(collect(long), collect(late))

    (_, _, long_finish), (_, _, late_finish) = answers(e, None, run)
    assert long_finish.completion_tokens == 60 and late_finish.completion_tokens == 3
    submitted = log.index((1, "submitted"))
    first_late = log.index((1, "token"))
    assert log[first_late:].count((1, "token")) == 3
    # the late prompt is read in 10 chunks; the running stream got a token at every one of those steps
    assert log[submitted:first_late].count((0, "token")) >= 9
    assert (0, "token") in log[log.index((1, "token"), first_late + 1):]  # the long one went on after it finished


def test_static_batching_admits_only_an_empty_batch(folders):
    from tunesmith.serve.engine import GenRequest

    e = engine(folders, "batching", static=True)
    forward = e.model.forward

    def slow_forward(*args, **kwargs):  # 20 tokens take at least 0.4 s: the first request still runs when checked
        time.sleep(0.02)
        return forward(*args, **kwargs)

    e.model.forward = slow_forward

    async def run(e, _):
        first = e.submit(GenRequest([5, 6, 7], None, max_tokens=20))
        await first.__anext__()
        second = e.submit(GenRequest([8, 9], "vera", max_tokens=2))
        await asyncio.sleep(0.05)
        waiting = e.queue.qsize()  # not admitted while the first runs
        return waiting, await collect(first), await collect(second)

    waiting, (_, _, a), (_, _, b) = answers(e, None, run)
    assert waiting == 1 and a.completion_tokens == 20 and b.completion_tokens == 2


def test_kv_helpers_pad_left_and_keep_rows():
    from tunesmith.serve.batching import left_pad

    t = torch.arange(6.0).view(1, 1, 3, 2)
    padded = left_pad(t, 5)
    assert padded.shape == (1, 1, 5, 2) and padded[0, 0, :2].eq(0).all() and torch.equal(padded[:, :, 2:], t)
    assert left_pad(t, 3) is t


def test_a_failed_step_answers_every_request_in_it_and_the_engine_keeps_serving(folders):
    from tunesmith.serve.engine import GenRequest

    e = engine(folders, "batching")
    forward, calls = e.model.forward, []

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("device lost")
        return forward(*args, **kwargs)

    e.model.forward = flaky

    async def run(e, _):
        first = await asyncio.gather(*(collect(e.submit(GenRequest([5, 6, 7], a, max_tokens=8)))
                                       for a in (None, "lora")))
        return first, await collect(e.submit(GenRequest([5, 6, 7], "dora", max_tokens=4)))

    first, (_, _, after) = answers(e, None, run)
    assert [f.reason for _, _, f in first] == ["error", "error"] and "device lost" in first[0][2].error
    assert after.reason == "length" and after.completion_tokens == 4 and e.stats["errors"] == 2


def test_a_model_with_sliding_window_layers_is_refused_with_the_serial_engine_named():
    """Its cache layers drop old columns, which the batch's in-place cache (kv_batch.py) does not do."""
    from transformers import MistralConfig, MistralForCausalLM

    from tunesmith.errors import UserError
    from tunesmith.serve.adapters import AdapterRegistry
    from tunesmith.serve.batching import BatchingEngine

    config = MistralConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, sliding_window=8, max_position_embeddings=64)
    model = MistralForCausalLM(config).eval().requires_grad_(False)
    with pytest.raises(UserError, match="--engine serial"):
        BatchingEngine(model, build_tiny_tokenizer(), AdapterRegistry(model, "base", max_loaded=1))
