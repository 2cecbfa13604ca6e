"""The engine: requests in, streams of text pieces out; one worker thread owns the model.

The interface the HTTP layer sees, and which every engine keeps (this serial one, and the
continuous-batching, mixed-adapter one of batching.py, the default):

    stream = engine.submit(GenRequest)   # admitted or refused at once: QueueFull (429) when the queue is full
    async for item in stream:            # Piece(text, token_ids) ... then one Finish(reason, usage)
        ...
    stream.cancel()                      # the client went away: the worker stops at its next step

`submit` is called on the event loop's thread; items are handed back with
`loop.call_soon_threadsafe`, so the worker never blocks on a slow client. The adapter of a request is
acquired from the registry when it is admitted and released by the worker when it ends (finished,
stopped, cancelled or failed), so an adapter is never unloaded under a running request.

SerialEngine runs one request at a time, token by token with a KV cache:

    prefill:  logits, cache = model(prompt_ids)                     # (1, T, V)
    decode:   next = pick(logits[-1]); logits, cache = model([next], cache)   until a stop

    pick:     greedy argmax at temperature 0; else p = softmax(logits / T), cut to the top_p nucleus
              (the fewest most likely tokens whose mass reaches top_p, as transformers' TopPLogitsWarper),
              renormalised, and one token drawn with the request's own torch.Generator (seed, or a random one)

Each step takes the model lock and activates the request's adapter (registry.activate, a no-op when it
is already active). The worker is a ComputeThread (compute.py), the one thread of the server that
computes: other threads hand it work with `engine.call(fn, ...)` (loading an adapter), which it runs
between two steps. A request stops at an end-of-sequence token (finish_reason "stop"), at a stop string
(the text is cut before it; "stop"), or at max_tokens ("length"). The stream's text is held back while
it could still be the start of a stop string.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from dataclasses import dataclass, field

from tunesmith.serve.errors import QueueFull

log = logging.getLogger(__name__)

WAKE = object()  # put in the request queue to wake an idle worker for a job handed in (Engine.call)


@dataclass
class GenRequest:
    prompt_ids: list[int]
    adapter: str | None = None  # None: the base model
    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None


@dataclass
class Piece:
    text: str
    token_ids: list[int]


@dataclass
class Finish:
    reason: str  # stop | length | cancelled | error
    prompt_tokens: int
    completion_tokens: int
    error: str | None = None


class RequestStream:
    """The async iterator of one request's Pieces and its Finish; written by the worker, read on the loop."""

    def __init__(self, request: GenRequest, loop: asyncio.AbstractEventLoop):
        self.request, self._loop = request, loop
        self._items: asyncio.Queue = asyncio.Queue()
        self.cancelled = threading.Event()

    def cancel(self) -> None:
        self.cancelled.set()

    def push(self, item: Piece | Finish) -> None:
        """From the worker thread."""
        try:
            self._loop.call_soon_threadsafe(self._items.put_nowait, item)
        except RuntimeError:  # the event loop is closed: the server is shutting down, nobody reads this
            self.cancel()

    def __aiter__(self):
        return self

    async def __anext__(self) -> Piece | Finish:
        if getattr(self, "_done", False):
            raise StopAsyncIteration
        item = await self._items.get()
        self._done = isinstance(item, Finish)
        return item


class Engine:
    """What app.py needs of an engine; see the module docstring.

    `compute`: the ComputeThread its loop runs on (a new one when None). For full speed on a CPU, load the model
    and build the engine on that thread too (compute.call), as `tunesmith serve` does: a thread that computed
    beside it slows every operator of it (compute.py)."""

    def __init__(self, model, tokenizer, registry, max_queue: int = 64, compute=None):
        from tunesmith.serve.compute import ComputeThread

        self.model, self.tokenizer, self.registry = model, tokenizer, registry
        self._own_compute = compute is None
        self.compute = compute or ComputeThread()  # the thread the worker loop runs on (compute.py)
        self.lock = registry.lock  # the model lock: forward passes and adapter changes
        self.queue: queue.Queue[RequestStream | None] = queue.Queue(maxsize=max_queue)
        self.stats = {"requests": 0, "finished": 0, "cancelled": 0, "errors": 0, "tokens": 0}
        self.context_length = context_length(model)
        self.eos_ids = eos_token_ids(model, tokenizer)
        self.cache_arg = cache_argument(model)
        self._loop = None  # the worker loop's Future while it runs
        self._pending, self._pending_lock = 0, threading.Lock()  # admitted and not yet finished

    def submit(self, request: GenRequest) -> RequestStream:
        """Admit a request (on the event loop's thread). QueueFull when the queue is full."""
        stream = RequestStream(request, asyncio.get_running_loop())
        self.registry.acquire(request.adapter)
        try:
            self.queue.put_nowait(stream)
        except queue.Full:
            self.registry.release(request.adapter)
            raise QueueFull(f"The server's queue is full ({self.queue.maxsize} requests waiting); retry shortly.") \
                from None
        with self._pending_lock:
            self._pending += 1
        self.stats["requests"] += 1
        return stream

    def start(self) -> None:
        """Run the worker loop on the compute thread."""
        self.compute.add_waker(self._wake)
        self._loop = self.compute.submit(self._work)

    def close(self, timeout: float = 5.0) -> None:
        if self._loop is not None:
            self.queue.put(None)
            try:
                self._loop.result(timeout)
            finally:
                self.compute.remove_waker(self._wake)
                self._loop = None
        if self._own_compute:
            self.compute.close(timeout)

    def call(self, fn, *args, **kwargs):
        """fn(*args, **kwargs) on the worker's thread, between two steps (from any other thread; blocks)."""
        return self.compute.call(fn, *args, **kwargs)

    def _wake(self) -> None:
        try:
            self.queue.put_nowait(WAKE)
        except queue.Full:  # a full queue: the worker is busy and runs the job at its next step anyway
            pass

    def _next(self, block: bool):
        """The next queued request (None: close), after running the jobs handed in; queue.Empty when not blocking
        and nothing is queued."""
        while True:
            self.compute.run_pending()
            item = self.queue.get() if block else self.queue.get_nowait()
            if item is not WAKE:
                return item

    @property
    def idle(self) -> bool:
        """No request waiting or running."""
        return self._pending == 0

    def _work(self) -> None:
        while (stream := self._next(block=True)) is not None:
            try:
                finish = self.run(stream)
            except Exception as e:  # a bug or a device error: answer it, log one line, keep serving
                finish = failed(e, len(stream.request.prompt_ids))
            self._end(stream, finish)

    def _end(self, stream: RequestStream, finish: Finish) -> None:
        """A request is over: count it, release its adapter, send its Finish."""
        self.stats[{"cancelled": "cancelled", "error": "errors"}.get(finish.reason, "finished")] += 1
        self.registry.release(stream.request.adapter)
        stream.push(finish)
        with self._pending_lock:
            self._pending -= 1

    def run(self, stream: RequestStream) -> Finish:
        raise NotImplementedError


class SerialEngine(Engine):
    """One request at a time, token by token (see the module docstring)."""

    def run(self, stream: RequestStream) -> Finish:
        import torch

        req = stream.request
        device = next(self.model.parameters()).device
        generator = None
        if req.temperature > 0:
            generator = torch.Generator(device=device)
            generator.manual_seed(req.seed if req.seed is not None else int(torch.randint(2**62, (1,)).item()))
        text = TextAssembler(self.tokenizer, req.stop)
        ids = torch.tensor([req.prompt_ids], device=device)
        cache, n = None, 0
        reason = "length"
        while n < req.max_tokens:
            if stream.cancelled.is_set():
                reason = "cancelled"
                break
            self.compute.run_pending()  # adapter loads handed in meanwhile
            with self.lock, torch.no_grad():
                self.registry.activate(req.adapter)
                out = self.model(input_ids=ids, use_cache=True, **{self.cache_arg: cache})
            cache = out[self.cache_arg] if self.cache_arg in out else out.past_key_values
            token = pick(out.logits[0, -1], req.temperature, req.top_p, generator)
            n += 1
            self.stats["tokens"] += 1
            if token in self.eos_ids:
                reason = "stop"
                break
            piece, stopped = text.add(token)
            if piece:
                stream.push(Piece(piece, [token]))
            if stopped:
                reason = "stop"
                break
            ids = torch.tensor([[token]], device=device)
        if reason != "cancelled" and (rest := text.flush()):
            stream.push(Piece(rest, []))
        return Finish(reason, len(req.prompt_ids), n)


def failed(e: Exception, prompt_tokens: int, completion_tokens: int = 0) -> Finish:
    """The Finish of a request that a bug or a device error ended; one log line, the server keeps serving."""
    log.error("generation failed: %s: %s", type(e).__name__, e, exc_info=log.isEnabledFor(logging.DEBUG))
    return Finish("error", prompt_tokens, completion_tokens, f"{type(e).__name__}: {e}")


def pick(logits, temperature: float, top_p: float, generator) -> int:
    """The next token from one row of logits (V,): argmax, or a draw from the top_p nucleus at `temperature`."""
    import torch

    if temperature <= 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        # keep a token while the mass before it is below top_p: the smallest set reaching top_p (at least one)
        keep = (sorted_p.cumsum(0) - sorted_p) < top_p
        probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_p[keep])
    return int(torch.multinomial(probs, 1, generator=generator))


class TextAssembler:
    """Token ids -> text pieces, cut at the first stop string and held back while one could be starting.

    The whole completion is decoded again at each token (a byte-level BPE splits characters over tokens,
    so a piece's text depends on its neighbours); text ending in U+FFFD (an incomplete UTF-8 sequence)
    waits for the next token."""

    def __init__(self, tokenizer, stops: list[str]):
        self.tokenizer, self.stops = tokenizer, [s for s in stops if s]
        self.ids: list[int] = []
        self.text, self.sent, self.stopped = "", 0, False

    def add(self, token: int) -> tuple[str, bool]:
        """(new text safe to send, whether a stop string was reached)."""
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return "", False
        self.text = text
        cut = self._first_stop(text)
        if cut >= 0:
            self.text, self.stopped = text[:cut], True
            return self._send(cut), True
        hold = max((k for s in self.stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        return self._send(len(text) - hold), False

    def flush(self) -> str:
        """The text held back, at the end (a trailing incomplete character included)."""
        if not self.stopped and self.ids:
            text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
            cut = self._first_stop(text)
            self.text = text[:cut] if cut >= 0 else text
        return self._send(len(self.text))

    def _first_stop(self, text: str) -> int:
        return min((i for s in self.stops if (i := text.find(s)) >= 0), default=-1)

    def _send(self, upto: int) -> str:
        piece = self.text[self.sent:upto] if upto > self.sent else ""
        self.sent = max(self.sent, upto)
        return piece


def cache_argument(model) -> str:
    """The forward's KV-cache keyword: `cache` in transformers >= 5.x, `past_key_values` before (and its output's)."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def context_length(model) -> int:
    config = getattr(model, "config", None)
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return 2048


def eos_token_ids(model, tokenizer) -> set[int]:
    """The tokenizer's end-of-sequence token and the model's generation config's (an int or a list)."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    gen = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids |= set(gen) if isinstance(gen, (list, tuple)) else ({gen} if gen is not None else set())
    return ids
