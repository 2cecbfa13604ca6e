"""The HTTP side of `tunesmith serve`: the OpenAI routes, adapter routes, server-sent events, errors.

    GET    /v1/models              the base and every loaded adapter (`parent`: the base's id)
    POST   /v1/chat/completions    messages rendered with the tokenizer's chat template
    POST   /v1/completions         a text prompt (or token ids) continued
    GET    /v1/adapters            the loaded adapters, with their size
    POST   /v1/adapters            {"name", "path"}: load an adapter onto the shared base
    DELETE /v1/adapters/{name}     unload it (409 while requests use it)

Streams are server-sent events: `data: <chunk json>` per piece of text, a last chunk with the
finish_reason, one with usage when `stream_options.include_usage`, then `data: [DONE]`.

No request can crash the server or make it print a traceback: every route runs inside GuardedRoute,
which turns ServeError into its status and OpenAI's error body, and anything unexpected into a 500
with the same shape and one log line; a failure inside a stream becomes an error event.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi.routing import APIRoute
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from tunesmith.serve import protocol as p
from tunesmith.serve.engine import Finish, GenRequest, Piece
from tunesmith.serve.errors import BadRequest, ServeError, ServerFault, Unauthorized, error_body

log = logging.getLogger(__name__)


def error_response(e: ServeError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


def _unexpected(e: Exception) -> JSONResponse:
    log.error("request failed: %s: %s", type(e).__name__, e, exc_info=log.isEnabledFor(logging.DEBUG))
    return error_response(ServerFault(f"Internal error ({type(e).__name__}); the server keeps serving."))


class GuardedRoute(APIRoute):
    """A route whose every failure is answered in OpenAI's error shape (see the module docstring)."""

    def get_route_handler(self):
        handler = super().get_route_handler()

        async def guarded(request: Request):
            try:
                return await handler(request)
            except ServeError as e:
                return error_response(e)
            except RequestValidationError as e:
                return error_response(_validation_error(e.errors()))
            except StarletteHTTPException as e:
                return JSONResponse(error_body(str(e.detail), "invalid_request_error"), status_code=e.status_code)
            except Exception as e:  # noqa: BLE001 - a bug: answered and logged, never fatal
                return _unexpected(e)

        return guarded


def _validation_error(errors) -> BadRequest:
    first = errors[0] if errors else {}
    loc = ".".join(str(x) for x in first.get("loc", ()) if x not in ("body",))
    return BadRequest(f"Invalid request: {loc or 'body'}: {first.get('msg', 'invalid value')}", param=loc or None,
                      code="invalid_value")


async def read_body(request: Request, model: type[BaseModel]):
    """The JSON body validated as `model`; 400 for malformed JSON or a bad field (named in `param`)."""
    raw = await request.body()
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise BadRequest(f"The body is not valid JSON: {e}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise BadRequest("The body must be a JSON object.", code="invalid_json")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise _validation_error(e.errors()) from None


def create_app(engine, registry, base_name: str, base_path: str | None = None, api_key: str | None = None) -> FastAPI:
    """The app over a started engine and its adapter registry; with `api_key`, every route needs it."""
    app = FastAPI(title="tunesmith", docs_url=None, redoc_url=None, openapi_url=None)
    router = APIRouter(route_class=GuardedRoute, dependencies=[Depends(key_check(api_key))])
    tokenizer = engine.tokenizer
    created = p.now()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, e):  # unknown paths and methods, outside any route
        return JSONResponse(error_body(str(e.detail), "invalid_request_error"), status_code=e.status_code)

    @router.get("/v1/models")
    async def models():
        cards = [p.ModelCard(id=base_name, created=created, root=base_path or base_name)]
        cards += [p.ModelCard(id=a.name, created=a.created, root=a.path, parent=base_name) for a in registry.models()]
        return p.ModelList(data=cards).model_dump()

    @router.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await read_body(request, p.ChatRequest)
        adapter = registry.resolve(body.model)
        _refuse_unsupported(body)
        try:
            from tunesmith.evaluate.generate import render_prompt

            prompt = render_prompt(tokenizer, body.conversation())
        except Exception as e:  # noqa: BLE001 - a template error is about these messages
            raise BadRequest(f"The messages cannot be rendered with the chat template: {e}", param="messages") from None
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        stream = engine.submit(_gen_request(engine, body, ids, adapter))
        rid, model = p.new_id("chatcmpl"), body.model
        if body.stream:
            return _sse(_chat_events(stream, rid, model, body.include_usage))
        text, finish = await _collect(stream)
        choice = p.ChatChoice(message=p.AssistantMessage(content=text), finish_reason=finish.reason)
        answer = p.ChatCompletion(id=rid, created=p.now(), model=model, choices=[choice], usage=_usage(finish))
        return answer.model_dump()

    @router.post("/v1/completions")
    async def completions(request: Request):
        body = await read_body(request, p.CompletionRequest)
        adapter = registry.resolve(body.model)
        _refuse_unsupported(body)
        ids = _prompt_ids(tokenizer, body.single_prompt(), engine)
        stream = engine.submit(_gen_request(engine, body, ids, adapter))
        rid, model = p.new_id("cmpl"), body.model
        if body.stream:
            return _sse(_completion_events(stream, rid, model, body.include_usage))
        text, finish = await _collect(stream)
        choice = p.TextChoice(text=text, finish_reason=finish.reason)
        return p.Completion(id=rid, created=p.now(), model=model, choices=[choice], usage=_usage(finish)).model_dump()

    add_adapter_routes(router, engine, registry, base_name)
    app.include_router(router)
    return app


def key_check(api_key: str | None):
    """The dependency every route runs: 401 unless the request carries `Authorization: Bearer <api_key>`."""

    async def check_key(request: Request) -> None:
        if api_key is None:
            return
        header = request.headers.get("authorization", "")
        token = header[7:] if header.lower().startswith("bearer ") else ""
        if not hmac.compare_digest(token.encode(), api_key.encode()):
            raise Unauthorized("Missing or wrong API key: send `Authorization: Bearer <key>`.")

    return check_key


def add_adapter_routes(router: APIRouter, engine, registry, base_name: str) -> None:
    """GET, POST and DELETE /v1/adapters: list, load and unload adapters at run time (loads and unloads run on the
    engine's compute thread, between two of its steps)."""

    @router.get("/v1/adapters")
    async def adapters():
        return {"object": "list", "data": [{"object": "adapter", **a.describe(), "in_flight": registry.busy(a.name)}
                                           for a in registry.models()]}

    @router.post("/v1/adapters")
    async def load_adapter(request: Request):
        body = await read_body(request, p.AdapterLoad)
        adapter, evicted = await asyncio.to_thread(engine.call, registry.load, body.name, body.path)
        log.info("loaded adapter %s from %s (%s, %.1f MB)%s", adapter.name, adapter.path, adapter.method,
                 adapter.bytes / 1e6, f"; evicted {', '.join(evicted)}" if evicted else "")
        return {"object": "adapter", **adapter.describe(), "parent": base_name, "evicted": evicted}

    @router.delete("/v1/adapters/{name}")
    async def unload_adapter(name: str):
        adapter = await asyncio.to_thread(engine.call, registry.unload, name)
        log.info("unloaded adapter %s", name)
        return {"object": "adapter", "name": adapter.name, "deleted": True}


def _refuse_unsupported(body: p.Request) -> None:
    field = body.unsupported()
    if field is not None:
        raise BadRequest(f"{field}={getattr(body, field)!r} is not supported by this server yet.", param=field,
                         code="unsupported_parameter")


def _prompt_ids(tokenizer, prompt: str | list[int], engine) -> list[int]:
    if isinstance(prompt, str):
        ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    else:
        vocab = len(tokenizer)
        if any(not 0 <= t < vocab for t in prompt):
            raise BadRequest(f"Prompt token ids must lie in [0, {vocab}).", param="prompt")
        ids = list(prompt)
    if not ids:
        raise BadRequest("The prompt is empty.", param="prompt")
    return ids


def _gen_request(engine, body: p.Request, ids: list[int], adapter: str | None) -> GenRequest:
    """The engine's request; 400 context_length_exceeded when prompt + max_tokens pass the model's context."""
    limit, budget = engine.context_length, body.budget()
    wanted = budget if budget is not None else max(limit - len(ids), 1)
    if len(ids) + wanted > limit:
        raise BadRequest(f"This model's maximum context length is {limit} tokens. However, you requested "
                         f"{len(ids) + wanted} tokens ({len(ids)} in the prompt, {wanted} in the completion). "
                         "Please reduce the prompt or max_tokens.", param="messages" if hasattr(body, "messages")
                         else "prompt", code="context_length_exceeded")
    return GenRequest(ids, adapter, wanted, body.temperature, body.top_p, list(body.stop), body.seed)


def _usage(finish: Finish) -> p.Usage:
    return p.Usage(prompt_tokens=finish.prompt_tokens, completion_tokens=finish.completion_tokens,
                   total_tokens=finish.prompt_tokens + finish.completion_tokens)


async def _collect(stream) -> tuple[str, Finish]:
    """The whole text and the Finish of a non-streamed request; the request is cancelled if the handler is."""
    parts, finish = [], None
    try:
        async for item in stream:
            if isinstance(item, Piece):
                parts.append(item.text)
            else:
                finish = item
    finally:
        if finish is None:
            stream.cancel()
    if finish.reason == "error":
        raise ServerFault(f"Generation failed: {finish.error}")
    return "".join(parts), finish


def _sse(events) -> StreamingResponse:
    return StreamingResponse(events, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _data(obj) -> str:
    return f"data: {json.dumps(obj.model_dump() if isinstance(obj, BaseModel) else obj)}\n\n"


async def _events(stream, first, piece, last, usage_chunk, include_usage: bool):
    """The SSE body of a stream: `first` (or nothing), a chunk per Piece, `last(reason)`, usage, [DONE].
    A client that disconnects closes this generator, which cancels the request (its slot is freed)."""
    try:
        if first is not None:
            yield _data(first)
        async for item in stream:
            if isinstance(item, Piece):
                yield _data(piece(item.text))
                continue
            if item.reason == "error":
                yield _data(ServerFault(f"Generation failed: {item.error}").body())
            else:
                yield _data(last(item.reason))
                if include_usage:
                    yield _data(usage_chunk(_usage(item)))
            yield "data: [DONE]\n\n"
    except Exception as e:  # noqa: BLE001 - inside a started response: an error event, one log line
        log.error("stream failed: %s: %s", type(e).__name__, e)
        yield _data(ServerFault(f"Internal error ({type(e).__name__}).").body())
        yield "data: [DONE]\n\n"
    finally:
        stream.cancel()  # harmless once finished


def _chat_events(stream, rid: str, model: str, include_usage: bool):
    def chunk(delta: p.Delta, reason: str | None = None) -> p.ChatChunk:
        return p.ChatChunk(id=rid, created=p.now(), model=model, choices=[p.ChunkChoice(delta=delta,
                                                                                        finish_reason=reason)])

    return _events(stream, chunk(p.Delta(role="assistant", content="")), lambda t: chunk(p.Delta(content=t)),
                   lambda r: chunk(p.Delta(), r),
                   lambda u: p.ChatChunk(id=rid, created=p.now(), model=model, choices=[], usage=u), include_usage)


def _completion_events(stream, rid: str, model: str, include_usage: bool):
    def chunk(text: str, reason: str | None = None) -> p.Completion:
        return p.Completion(id=rid, created=p.now(), model=model, choices=[p.TextChoice(text=text,
                                                                                          finish_reason=reason)])

    return _events(stream, None, chunk, lambda r: chunk("", r),
                   lambda u: p.Completion(id=rid, created=p.now(), model=model, choices=[], usage=u), include_usage)
