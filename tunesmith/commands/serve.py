"""`tunesmith serve`: the base model and its adapters behind an OpenAI-compatible HTTP API (docs/serving.md)."""

from __future__ import annotations

import argparse
import logging
import os
from typing import Literal

from pydantic import Field, field_validator

from tunesmith.commands.options import add_section_options, resolve_options
from tunesmith.config import DEFAULT_MODEL, Section
from tunesmith.errors import UserError

log = logging.getLogger(__name__)

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
API_KEY_ENV = "TUNESMITH_API_KEY"


class ServeConfig(Section):
    """`tunesmith serve` (file section `serve:`)."""

    base: str = Field(DEFAULT_MODEL, description="Base model: built-in name, folder or .gguf.")
    adapter: list[str] = Field([], description="An adapter to serve, NAME=PATH (repeatable); requests pick it by "
                               "NAME as their model. In the file: a list of NAME=PATH or a mapping NAME: PATH.")
    name: str | None = Field(None, description="The id the base answers to; unset: --base as given.")
    host: str = Field("127.0.0.1", description="Address to bind; other than localhost only with an API key.")
    port: int = Field(8000, ge=0, le=65535, description="Port to listen on.")
    max_loaded_adapters: int = Field(8, ge=1, description="Adapters held in memory at most; loading one more "
                                     "evicts the least recently used idle one.")
    max_queue: int = Field(64, ge=1, description="Requests waiting at most; more are answered 429 with Retry-After.")
    api_key: str | None = Field(None, description=f"Require `Authorization: Bearer KEY` on every request (or set "
                                f"${API_KEY_ENV}).")
    engine: Literal["batching", "serial"] = Field("batching", description="batching: continuous batching, rows "
                                                  "with different adapters in one forward (docs/serving.md); "
                                                  "serial: one request at a time.")
    max_batch_size: int = Field(32, ge=1, description="Sequences decoded together at most (batching engine); "
                                "more wait in the queue.")
    prefill_chunk: int = Field(512, ge=1, description="Prompt tokens read per step (batching engine), so that a "
                               "long prompt does not stall running streams.")
    quantization: Literal["none", "nf4", "fp4", "int8"] = Field("none", description="Base quantization: none, nf4, "
                              "fp4 or int8 (QLoRA adapters were trained on a quantized base).")

    @field_validator("adapter", mode="before")
    @classmethod
    def _mapping(cls, v):
        if isinstance(v, dict):  # serve: {adapter: {math: runs/math/adapter}}
            return [f"{k}={p}" for k, p in v.items()]
        return [v] if isinstance(v, str) else v


def register(subparsers) -> None:
    p = subparsers.add_parser("serve", help="serve the base model and adapters over an OpenAI-compatible API",
                              description="Serve a base model and several adapters on it from one copy of the "
                              "weights: /v1/models, /v1/chat/completions, /v1/completions (streaming too) and "
                              "/v1/adapters to load and unload adapters at run time. docs/serving.md.")
    add_section_options(p, "serve", ServeConfig)
    p.set_defaults(run=_run)


def _run(args: argparse.Namespace) -> None:
    o: ServeConfig = resolve_options(args)
    serve(o)


def parse_adapters(specs: list[str]) -> dict[str, str]:
    """NAME=PATH items -> {name: path}; a malformed or repeated name is a UserError."""
    out: dict[str, str] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise UserError(f"--adapter {spec!r}: give NAME=PATH, e.g. --adapter math=runs/math/adapter.")
        if name in out:
            raise UserError(f"--adapter {name!r} is given twice; each adapter needs its own name.")
        out[name] = path
    return out


def check_options(o: ServeConfig) -> tuple[dict[str, str], str | None]:
    """(adapters, API key) after the checks that need nothing loaded: NAME=PATH items, their count against
    max_loaded_adapters, and no address other than localhost without an API key."""
    adapters = parse_adapters(o.adapter)
    if len(adapters) > o.max_loaded_adapters:
        raise UserError(f"{len(adapters)} adapters are given but --max-loaded-adapters is {o.max_loaded_adapters}: "
                        "raise it, or load the others later through POST /v1/adapters.")
    key = o.api_key or os.environ.get(API_KEY_ENV) or None
    if key is None and o.host not in LOCAL_HOSTS:
        raise UserError(f"--host {o.host} would expose the server to the network without an API key: give "
                        f"--api-key KEY (or set ${API_KEY_ENV}), or keep --host 127.0.0.1.")
    return adapters, key


def build_server(o: ServeConfig, adapters: dict[str, str], key: str | None):
    """(app, engine): the base loaded, the adapters on it, the engine's worker started; all of it on the
    engine's compute thread, the one thread of the server that computes (serve/compute.py says why)."""
    from tunesmith.serve.app import create_app
    from tunesmith.serve.compute import ComputeThread

    compute = ComputeThread()
    try:
        engine, base_name = compute.call(_load_engine, o, adapters, compute)
    except BaseException:
        compute.close()
        raise
    engine.start()
    return create_app(engine, engine.registry, base_name, o.base, key), engine


def _load_engine(o: ServeConfig, adapters: dict[str, str], compute):
    """(engine, base name), built on the compute thread."""
    from tunesmith.config import ModelConfig
    from tunesmith.models.loading import load_model_and_tokenizer
    from tunesmith.serve.adapters import AdapterRegistry
    from tunesmith.serve.engine import SerialEngine
    from tunesmith.serve.errors import ServeError

    model, tokenizer = load_model_and_tokenizer(ModelConfig(name_or_path=o.base, quantization=o.quantization))
    model.requires_grad_(False)
    base_name = o.name or o.base
    registry = AdapterRegistry(model, base_name, o.max_loaded_adapters)
    for name, path in adapters.items():
        try:
            adapter, _ = registry.load(name, path)
        except ServeError as e:
            raise UserError(f"--adapter {name}={path}: {e.message}") from None
        log.info("adapter %s: %s from %s, %s parameters (%.1f MB)", name, adapter.method, path,
                 f"{adapter.parameters:,}", adapter.bytes / 1e6)
    if o.engine == "serial":
        return SerialEngine(model, tokenizer, registry, o.max_queue, compute=compute), base_name
    from tunesmith.serve.batching import BatchingEngine

    return BatchingEngine(model, tokenizer, registry, o.max_queue, o.max_batch_size, o.prefill_chunk,
                          compute=compute), base_name


def serve(o: ServeConfig) -> None:
    adapters, key = check_options(o)
    try:
        import uvicorn
    except ImportError:
        raise UserError("tunesmith serve needs fastapi and uvicorn: pip install fastapi uvicorn") from None
    app, engine = build_server(o, adapters, key)
    log.info("serving %s%s on http://%s:%d/v1 %s", o.name or o.base,
             f" and {', '.join(adapters)}" if adapters else "", o.host, o.port,
             "(API key required)" if key else "(no API key: localhost only)")
    try:
        uvicorn.run(app, host=o.host, port=o.port, log_level="info")
    finally:
        engine.close()
        engine.compute.close()
