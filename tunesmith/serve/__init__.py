"""`tunesmith serve`: one base model and many adapters behind an OpenAI-compatible HTTP API (docs/serving.md).

    protocol.py   the request and response bodies of the OpenAI API subset served (pydantic)
    adapters.py   the adapter registry: name -> adapter loaded on the shared base, LRU-bounded
    engine.py     the engine interface (submit a request, get a stream of text pieces) and the serial engine
    batching.py   the continuous-batching engine (the default): requests join and leave a running batch
    mixed.py      mixed-adapter forwards: each row of a batch through its own adapter
    client.py     `generate` and `chat --server URL`: asking a running server
    errors.py     errors with an HTTP status and OpenAI's error shape
    app.py        the FastAPI app: routes, server-sent events, API key, exception handlers
"""
