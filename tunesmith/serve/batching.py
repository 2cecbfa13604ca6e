"""Continuous batching: requests join the running batch at the next decode step and leave when they finish.

The engine's compute thread owns the model (compute.py; engine.py's interface: `submit(request) ->
stream`). Each turn of its loop is one step (after the jobs handed in with Engine.call):

    admit     take queued requests while fewer than max_batch_size are in flight (the rest wait in the
              queue, which answers 429 when full)
    sweep     cancelled requests (a client went away) leave at once, freeing their slot
    prefill   at most prefill_chunk prompt tokens: the next chunk of the oldest prompt longer than that
              (into the request's own KV cache), or else as many whole waiting prompts as fit, in one
              left-padded forward. After a prompt's last token the first token is picked and the request
              joins the batch. A long prompt is read over several steps, so the running streams get a
              token at every step meanwhile
    decode    one forward over every running sequence, one new token each; finished ones leave

The running batch shares one KV cache, left-padded: row i holds its L_i tokens in the last L_i of
L columns, and the attention mask (B, L) is 0 on the padding. Each row's own position goes in
position_ids, so a row computes what it computes alone (rotary embeddings see positions 0..L_i-1;
padded keys get exactly zero attention weight):

    decode:  ids (B, 1) = each row's last token;  positions (B, 1) = L_i;  mask (B, L + 1)
             logits, cache = model(ids, mask, positions, cache)          the cache grows to L + 1
    prefill: prompts left-padded to the longest, P; mask (n, P); positions = cumsum(mask) - 1
    join:    prefilled rows (n, H, P, D) become rows B..B+n-1, their last column at the batch's last
             (the batch widens to max(L, P))
    leave:   the last rows move into the holes; columns that are padding in every row are dropped

The cache is written in place (kv_batch.py): a decode step writes its one new column into buffers with
room to spare, where transformers' own cache would copy the whole cache to append it.

Rows use different adapters in the same forward: mixed.py routes row i through its own adapter.
Sampling is per request (pick(): greedy, or temperature and top_p with the request's own seeded
generator), and so are stop strings and max_tokens. Greedy answers equal the serial engine's
(tests/test_serve_batching.py); a sampled answer with a seed repeats when the same request runs alone.

`static=True` makes it static batching (for bench/serve.py): new requests are admitted only when the
batch is empty, and decoding starts once every admitted prompt is read.
"""

from __future__ import annotations

import inspect
import logging
import queue
from collections import deque
from dataclasses import dataclass

from tunesmith.serve.engine import Engine, Finish, Piece, RequestStream, TextAssembler, failed, pick

log = logging.getLogger(__name__)


@dataclass(eq=False)  # compared and hashed by identity
class Sequence:
    """One request in flight."""

    stream: RequestStream
    text: TextAssembler
    generator: object = None  # torch.Generator when sampling
    read: int = 0  # prompt tokens prefilled so far
    cache: object = None  # its own KV cache while prefilling
    length: int = 0  # tokens in its KV cache (its next position)
    generated: int = 0
    token: int = -1  # the last token picked: the next input
    reason: str | None = None  # why it ended (stop | length | cancelled)
    ended: bool = False  # its Finish is sent

    @property
    def request(self):
        return self.stream.request


class BatchingEngine(Engine):
    """Continuous batching over mixed-adapter batches; see the module docstring."""

    def __init__(self, model, tokenizer, registry, max_queue: int = 64, max_batch_size: int = 32,
                 prefill_chunk: int = 512, static: bool = False, compute=None):
        import torch

        from tunesmith.serve.mixed import MixedAdapters

        super().__init__(model, tokenizer, registry, max_queue, compute)
        self.max_batch_size, self.prefill_chunk, self.static = max_batch_size, prefill_chunk, static
        self.device = next(model.parameters()).device
        self.mixer = MixedAdapters(registry)
        with self.lock:
            registry.activate(None)
            self.mixer.install()
            registry.mixer = self.mixer
        self.keep_last = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters \
            else {}
        self.prefilling: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # row i of the batch cache
        self.cache = None
        self.mask = None  # (B, L) long: 1 where a row has a token
        self._current: list[Sequence] = []  # prefilled this step, neither finished nor in the batch yet
        self._torch = torch
        self._check_cache()

    # -- the loop ---------------------------------------------------------------------------------------------
    def _work(self) -> None:
        torch = self._torch
        while self._admit():
            self._sweep()
            try:
                with self.lock, torch.no_grad():
                    self._prefill()
                    if not (self.static and self.prefilling):
                        self._decode()
            except Exception as e:  # a bug or a device error: every request in flight answers it; keep serving
                for seq in dict.fromkeys([*self.prefilling, *self.running, *self._current]):
                    if not seq.ended:
                        seq.ended = True
                        self._end(seq.stream, failed(e, len(seq.request.prompt_ids), seq.generated))
                self.prefilling.clear()
                self._reset()
            self._current = []
        for seq in [*self.prefilling, *self.running]:  # closing
            seq.stream.cancel()
            seq.ended = True
            self._end(seq.stream, Finish("cancelled", len(seq.request.prompt_ids), seq.generated))

    def _admit(self) -> bool:
        """Move queued requests in while there is room (blocking when nothing is in flight); False on close."""
        self.compute.run_pending()  # jobs handed in (Engine.call: adapter loads) run between two steps
        in_flight = len(self.prefilling) + len(self.running)
        if self.static and in_flight:
            return True
        if not in_flight:
            stream = self._next(block=True)
            if stream is None:
                return False
            self.prefilling.append(self._start(stream))
            in_flight = 1
        while in_flight < self.max_batch_size:
            try:
                stream = self._next(block=False)
            except queue.Empty:
                break
            if stream is None:
                return False
            self.prefilling.append(self._start(stream))
            in_flight += 1
        return True

    def _start(self, stream: RequestStream) -> Sequence:
        req, torch = stream.request, self._torch
        generator = None
        if req.temperature > 0:
            generator = torch.Generator(device=self.device)
            generator.manual_seed(req.seed if req.seed is not None else int(torch.randint(2**62, (1,)).item()))
        return Sequence(stream, TextAssembler(self.tokenizer, req.stop), generator)

    def _sweep(self) -> None:
        """Cancelled requests leave now."""
        for seq in [s for s in self.prefilling if s.stream.cancelled.is_set()]:
            self.prefilling.remove(seq)
            self._finish(seq, "cancelled")
        gone = [i for i, s in enumerate(self.running) if s.stream.cancelled.is_set()]
        if gone:
            for i in gone:
                self._finish(self.running[i], "cancelled")
            self._leave(gone)

    # -- prefill and decode -----------------------------------------------------------------------------------
    def _prefill(self) -> None:
        """At most prefill_chunk prompt tokens: the next chunk of a long prompt, or several short prompts whole."""
        if not self.prefilling:
            return
        head = self.prefilling[0]
        if head.read or len(head.request.prompt_ids) > self.prefill_chunk:
            self._prefill_chunk(head)
            return
        group, budget = [], self.prefill_chunk
        for seq in self.prefilling:
            n = len(seq.request.prompt_ids)
            if seq.read or n > budget:
                break
            group.append(seq)
            budget -= n
        self._prefill_group(group)

    def _prefill_chunk(self, seq: Sequence) -> None:
        """One chunk of a long prompt into the request's own cache; after the last, the first token and the join."""
        torch, prompt = self._torch, seq.request.prompt_ids
        chunk = prompt[seq.read: seq.read + self.prefill_chunk]
        self.mixer.route([seq.request.adapter], self.device)
        out = self.model(input_ids=torch.tensor([chunk], device=self.device), use_cache=True,
                         **{self.cache_arg: seq.cache}, **self.keep_last)
        seq.cache = self._cache_of(out)
        seq.read += len(chunk)
        if seq.read == len(prompt):
            self._current.append(self.prefilling.popleft())
            self._first_tokens([seq], out.logits[:, -1], seq.cache, torch.ones(1, len(prompt), dtype=torch.long,
                                                                                    device=self.device))
            seq.cache = None

    def _prefill_group(self, group: list[Sequence]) -> None:
        """Whole short prompts in one forward, left-padded to the longest (mask 0 on the padding, each row's own
        positions 0..P_i-1), as one block of rows for the batch."""
        torch = self._torch
        width = max(len(s.request.prompt_ids) for s in group)
        ids = torch.zeros(len(group), width, dtype=torch.long)
        mask = torch.zeros(len(group), width, dtype=torch.long)
        for i, seq in enumerate(group):
            prompt = seq.request.prompt_ids
            ids[i, width - len(prompt):] = torch.tensor(prompt)
            mask[i, width - len(prompt):] = 1
        positions = (mask.cumsum(1) - 1).clamp(min=0)  # (n, W): 0 at the first real token of each row
        ids, mask, positions = ids.to(self.device), mask.to(self.device), positions.to(self.device)
        self.mixer.route([s.request.adapter for s in group], self.device)
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                         **{self.cache_arg: None}, **self.keep_last)
        for _ in group:
            self._current.append(self.prefilling.popleft())
        self._first_tokens(group, out.logits[:, -1], self._cache_of(out), mask)

    def _first_tokens(self, seqs: list[Sequence], logits, cache, mask) -> None:
        """Each prefilled request's first token; those not finished by it join the batch (rows of cache, mask)."""
        stay = []
        for i, (seq, token) in enumerate(zip(seqs, self._picks(logits, seqs))):
            seq.length = len(seq.request.prompt_ids)
            if self._emit(seq, token):
                self._finish(seq, seq.reason)
            else:
                stay.append(i)
        if stay:
            self._join([seqs[i] for i in stay], cache, mask, stay)

    def _decode(self) -> None:
        """One token for every running sequence, in one forward."""
        if not self.running:
            return
        torch, rows = self._torch, self.running
        ids = torch.tensor([[s.token] for s in rows], device=self.device)  # (B, 1)
        positions = torch.tensor([[s.length] for s in rows], device=self.device)  # (B, 1): each row's own
        self.mask = torch.cat([self.mask, self.mask.new_ones(len(rows), 1)], dim=1)  # (B, L + 1)
        self.mixer.route([s.request.adapter for s in rows], self.device)
        out = self.model(input_ids=ids, attention_mask=self.mask, position_ids=positions, use_cache=True,
                         **{self.cache_arg: self.cache}, **self.keep_last)
        self.cache = self._cache_of(out)
        done = []
        for i, (seq, token) in enumerate(zip(rows, self._picks(out.logits[:, -1], rows))):
            seq.length += 1
            if self._emit(seq, token):
                done.append(i)
                self._finish(seq, seq.reason)
        if done:
            self._leave(done)

    def _picks(self, logits, seqs: list[Sequence]) -> list[int]:
        """The next token of each row (B, V): greedy rows with one argmax for all, sampled ones with pick()."""
        greedy = logits.argmax(-1).tolist()
        return [greedy[i] if s.request.temperature <= 0 else
                pick(logits[i], s.request.temperature, s.request.top_p, s.generator) for i, s in enumerate(seqs)]

    def _emit(self, seq: Sequence, token: int) -> bool:
        """Hand a picked token to the request's stream; True when the request is over (seq.reason says why)."""
        seq.generated += 1
        self.stats["tokens"] += 1
        if token in self.eos_ids:
            seq.reason = "stop"
            return True
        piece, stopped = seq.text.add(token)
        if piece:
            seq.stream.push(Piece(piece, [token]))
        if stopped:
            seq.reason = "stop"
        elif seq.generated >= seq.request.max_tokens:
            seq.reason = "length"
        seq.token = token
        return seq.reason is not None

    def _finish(self, seq: Sequence, reason: str) -> None:
        if reason != "cancelled" and (rest := seq.text.flush()):
            seq.stream.push(Piece(rest, []))
        seq.cache, seq.ended = None, True
        self._end(seq.stream, Finish(reason, len(seq.request.prompt_ids), seq.generated))

    # -- the batch's KV cache -----------------------------------------------------------------------------------
    def _cache_of(self, out):
        return out[self.cache_arg] if self.cache_arg in out else out.past_key_values

    def _join(self, seqs: list[Sequence], cache, mask, rows: list[int]) -> None:
        """Add prefilled sequences (rows `rows` of `cache` and `mask`) as the last rows of the batch, their last
        column at the batch's last column (kv_batch.py writes them into the batch's buffers)."""
        from tunesmith.serve.kv_batch import SlotLayer

        torch = self._torch
        pairs = kv_tensors(cache)
        if len(rows) < mask.shape[0]:
            index = torch.tensor(rows, device=self.device)
            mask = mask.index_select(0, index)
            pairs = [(k.index_select(0, index), v.index_select(0, index)) for k, v in pairs]
        if self.cache is None:
            cache.layers = [SlotLayer(k, v, self.max_batch_size) for k, v in pairs]
            self.cache, self.mask, self.running = cache, mask, list(seqs)
            return
        for layer, (k, v) in zip(self.cache.layers, pairs):
            layer.append_rows(k, v)
        width = max(self.mask.shape[1], mask.shape[1])
        self.mask = torch.cat([left_pad(self.mask, width, dim=1), left_pad(mask, width, dim=1)])
        self.running += seqs

    def _leave(self, rows: list[int]) -> None:
        """Drop these rows of the batch (the last rows move into their places); then the columns that are
        padding in every remaining row."""
        from tunesmith.serve.kv_batch import swap_remove

        order, moves = swap_remove(len(self.running), rows)
        self.running = [self.running[i] for i in order]
        if not order:
            self._reset()
            return
        mask = self.mask[order]
        first = int(mask.any(0).nonzero()[0])  # the first column some row uses
        self.mask = mask[:, first:]
        for layer in self.cache.layers:
            layer.move_rows(moves, len(order))
            layer.drop_columns(first)

    def _check_cache(self) -> None:
        """The model's KV cache must be a plain per-layer (B, H, L, D) cache (no sliding window): UserError if not."""
        from tunesmith.errors import UserError

        with self.lock, self._torch.no_grad():
            out = self.model(input_ids=self._torch.tensor([[0]], device=self.device), use_cache=True,
                             **{self.cache_arg: None})
        cache = self._cache_of(out)
        layers = getattr(cache, "layers", None)
        if layers is None or any(type(x).__name__ != "DynamicLayer" for x in layers):
            raise UserError(f"This model's KV cache ({type(cache).__name__}) cannot be batched by tunesmith serve "
                            "yet; serve it with --engine serial.")

    def _reset(self) -> None:
        self.running, self.cache, self.mask = [], None, None


def left_pad(t, width: int, dim: int = 2):
    """t with zeros put before it along `dim` up to `width` (the KV layout (B, H, L, D) pads dim 2)."""
    missing = width - t.shape[dim]
    if missing == 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    import torch

    return torch.cat([t.new_zeros(shape), t], dim=dim)


def kv_tensors(cache) -> list[tuple]:
    """[(keys, values)] per layer, each (B, H, L, D), of a transformers DynamicCache."""
    return [(layer.keys, layer.values) for layer in cache.layers]
