"""Talking to a running OpenAI-compatible server (`tunesmith serve`, or any other) from `generate` and `chat`.

Standard library only (urllib), so the runtime needs nothing new: one POST to `<url>/v1/chat/completions`,
greedy (temperature 0) as the local path, streamed as server-sent events (`data: {chunk}` lines, then
`data: [DONE]`) when the caller wants the text as it comes. The API key, if the server wants one, comes
from $TUNESMITH_API_KEY (the variable `tunesmith serve` reads too).
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from typing import Iterator

from tunesmith.errors import UserError

API_KEY_ENV = "TUNESMITH_API_KEY"


def chat_completion(url: str, model: str, messages: list[dict], max_tokens: int, stream: bool = False,
                    timeout: float = 600.0) -> Iterator[str]:
    """The answer's text pieces (one piece when not streamed). UserError when the server cannot be reached or
    answers with an error (its OpenAI-shaped message is shown)."""
    body = {"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0, "stream": stream}
    request = urllib.request.Request(_endpoint(url), data=json.dumps(body).encode(), method="POST",
                                     headers=_headers())
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as e:
        raise UserError(f"--server {url}: HTTP {e.code}: {_message(e.read())}") from None
    except (urllib.error.URLError, OSError) as e:
        raise UserError(f"--server {url}: cannot reach it ({getattr(e, 'reason', e)}); is `tunesmith serve` "
                        "running there?") from None
    with response:
        if not stream:
            answer = json.loads(response.read())
            yield answer["choices"][0]["message"]["content"] or ""
            return
        for line in response:
            line = line.decode("utf-8").strip()
            if not line.startswith("data: "):
                continue
            data = line[len("data: "):]
            if data == "[DONE]":
                return
            chunk = json.loads(data)
            if "error" in chunk:
                raise UserError(f"--server {url}: {chunk['error'].get('message')}")
            for choice in chunk.get("choices") or []:
                if (piece := (choice.get("delta") or {}).get("content")):
                    yield piece


def _endpoint(url: str) -> str:
    """<url>/v1/chat/completions, for a URL given with or without its /v1."""
    base = url.rstrip("/")
    return f"{base}/chat/completions" if base.endswith("/v1") else f"{base}/v1/chat/completions"


def _headers() -> dict[str, str]:
    headers = {"Content-Type": "application/json"}
    if key := os.environ.get(API_KEY_ENV):
        headers["Authorization"] = f"Bearer {key}"
    return headers


def _message(raw: bytes) -> str:
    try:
        return json.loads(raw)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return raw.decode("utf-8", "replace")[:500]
