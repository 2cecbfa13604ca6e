"""`tunesmith serve`: the real server (uvicorn on a free port, in a thread) over a tiny Llama and adapters made
here, driven with the official `openai` client; greedy answers checked token for token against tunesmith's own
generate path with each adapter alone (fp32)."""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request

import pytest
import torch

from conftest import build_tiny_model, build_tiny_tokenizer

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")

KEY = "sk-test-key"
MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]


def make_adapter(base_dir, out_dir, method: str, seed: int, **options) -> None:
    """`method` applied to the tiny model with every adapter tensor random and nonzero, saved as tunesmith saves."""
    from tunesmith.config import MethodConfig
    from tunesmith.methods.inject import trainable_parameters
    from tunesmith.methods.registry import get_method

    model = build_tiny_model()
    cfg = MethodConfig(name=method, dropout=0.0, **options)
    get_method(method).apply(model, cfg)
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in trainable_parameters(model):
            p.normal_(0.0, 0.5)
    get_method(method).save(model, out_dir, cfg, str(base_dir))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    base = root / "tiny"
    model = build_tiny_model()
    model.config.max_position_embeddings = 2048  # room for a long stream to be cut short
    model.save_pretrained(base)
    build_tiny_tokenizer().save_pretrained(base)
    make_adapter(base, root / "alpha", "lora", 1, r=4, alpha=8)
    make_adapter(base, root / "beta", "dora", 2, r=2, alpha=4, target_modules=["q_proj", "v_proj", "down_proj"])
    make_adapter(base, root / "gamma", "adapter", 3, adapter_size=8)  # bottleneck: a child module and a hook
    return {"base": base, "alpha": root / "alpha", "beta": root / "beta", "gamma": root / "gamma"}


class Server:
    def __init__(self, files):
        from tunesmith.commands.serve import ServeConfig, build_server

        o = ServeConfig(base=str(files["base"]), name="tiny", port=0, max_loaded_adapters=2, max_queue=2,
                        api_key=KEY, adapter=[f"alpha={files['alpha']}", f"beta={files['beta']}"])
        self.app, self.engine = build_server(o, {"alpha": str(files["alpha"]), "beta": str(files["beta"])}, KEY)
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=0, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        wait_for(lambda: self.server.started, 20)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"

    def client(self, key=KEY, max_retries=0, **kw):
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=max_retries, timeout=30, **kw)

    def raw(self, method: str, path: str, body: bytes | dict | None = None, key: str | None = KEY):
        """(status, json, headers) of a plain HTTP request."""
        data = json.dumps(body).encode() if isinstance(body, dict) else body
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json",
                                              **({"Authorization": f"Bearer {key}"} if key else {})})
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return r.status, json.loads(r.read()), r.headers
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read()), e.headers

    def wait_idle(self):
        wait_for(lambda: self.engine.idle, 20)

    def close(self):
        self.server.should_exit = True
        self.thread.join(10)
        self.engine.close()
        self.engine.compute.close()


def wait_for(condition, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


@pytest.fixture(scope="module")
def server(files):
    s = Server(files)
    yield s
    s.close()


@pytest.fixture(scope="module")
def reference(files):
    """Greedy answers of tunesmith's own generate path (load_for_inference + generate), each adapter alone."""
    from tunesmith.commands.infer import load_for_inference
    from tunesmith.evaluate.generate import generate, render_prompt

    cache = {}

    def answer(adapter: str | None, max_tokens: int = 24, messages=MESSAGES) -> str:
        key = (adapter, max_tokens, json.dumps(messages))
        if key not in cache:
            model, tok = load_for_inference(str(files["base"]), str(files[adapter]) if adapter else None, "none")
            cache[key] = generate(model, tok, [render_prompt(tok, messages)], max_tokens)[0]
        return cache[key]

    return answer


def chat(client, model: str, max_tokens: int = 24, **kw):
    return client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=max_tokens, temperature=0, **kw)


def ensure_loaded(server, files, *names):
    loaded = {m["id"] for m in server.raw("GET", "/v1/models")[1]["data"]}
    for name in names:
        if name not in loaded:
            assert server.raw("POST", "/v1/adapters", {"name": name, "path": str(files[name])})[0] == 200


def test_models_lists_the_base_and_each_adapter_with_its_parent(server):
    models = {m.id: m for m in server.client().models.list().data}
    assert set(models) == {"tiny", "alpha", "beta"}
    assert models["alpha"].parent == "tiny" and models["beta"].parent == "tiny"
    assert getattr(models["tiny"], "parent", None) is None


def test_each_adapter_answers_as_generate_does_with_it_alone(server, files, reference):
    ensure_loaded(server, files, "alpha", "beta")
    client = server.client(max_retries=5)  # a request of an earlier test may still hold a queue slot: 429, retry
    answers = {}

    def ask(model):
        answers[model] = chat(client, model)

    threads = [threading.Thread(target=ask, args=(m,)) for m in ("tiny", "alpha", "beta")]  # all three at once
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for model, adapter in (("tiny", None), ("alpha", "alpha"), ("beta", "beta")):
        r = answers[model]
        assert r.choices[0].message.content.strip() == reference(adapter), model
        assert r.model == model and r.choices[0].finish_reason in ("length", "stop")
        assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    texts = {answers[m].choices[0].message.content for m in answers}
    assert len(texts) == 3  # the adapters change the answer, so the check above tells them apart


def test_completions_and_usage(server, files):
    tok = build_tiny_tokenizer()
    r = server.client().completions.create(model="tiny", prompt="hello world", max_tokens=8, temperature=0)
    assert r.object == "text_completion" and r.choices[0].text
    assert r.usage.prompt_tokens == len(tok("hello world")["input_ids"])
    assert r.usage.completion_tokens == 8 or r.choices[0].finish_reason == "stop"
    ids = tok("hello world")["input_ids"]
    same = server.client().completions.create(model="tiny", prompt=ids, max_tokens=8, temperature=0)
    assert same.choices[0].text == r.choices[0].text  # token ids in, the same answer


def test_streaming_equals_the_whole_answer_and_ends_with_usage(server, files):
    client = server.client()
    whole = chat(client, "alpha")
    chunks = list(chat(client, "alpha", stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == \
        [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    stream = client.completions.create(model="tiny", prompt="hello", max_tokens=6, temperature=0, stream=True)
    streamed = "".join(c.choices[0].text for c in stream if c.choices)
    assert streamed == client.completions.create(model="tiny", prompt="hello", max_tokens=6, temperature=0) \
        .choices[0].text


def test_raw_stream_is_server_sent_events_ending_in_done(server):
    req = urllib.request.Request(server.url + "/v1/completions", method="POST", data=json.dumps(
        {"model": "tiny", "prompt": "hi", "max_tokens": 3, "temperature": 0, "stream": True}).encode(),
        headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.read().decode().split("\n") if line]
    assert all(line.startswith("data: ") for line in lines) and lines[-1] == "data: [DONE]"


def test_stop_sequences_cut_the_text_before_them(server):
    client = server.client()
    full = chat(client, "beta", max_tokens=24).choices[0].message.content
    stop = full.strip()[4:7]
    assert len(stop) == 3
    cut = full[: full.find(stop)]
    r = chat(client, "beta", max_tokens=24, stop=[stop, "never-there"])
    assert r.choices[0].message.content == cut and r.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].delta.content or "" for c in chat(client, "beta", stream=True, stop=stop))
    assert streamed == cut


def test_seeded_sampling_repeats_and_seeds_differ(server):
    client = server.client()

    def sample(seed):
        return client.completions.create(model="alpha", prompt="The quick", max_tokens=12, temperature=1.5,
                                         top_p=0.9, seed=seed).choices[0].text

    assert sample(7) == sample(7)
    assert len({sample(s) for s in range(4)}) > 1


def test_errors_have_openai_shape(server):
    client = server.client()
    with pytest.raises(openai.NotFoundError) as e:
        chat(client, "nope")
    assert e.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=MESSAGES, temperature=5)
    assert e.value.status_code == 400 and e.value.param == "temperature"
    with pytest.raises(openai.BadRequestError) as e:
        chat(client, "tiny", max_tokens=100_000)
    assert e.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="tiny", messages=[])
    with pytest.raises(openai.BadRequestError) as e:
        chat(client, "tiny", n=2)
    assert e.value.param == "n"
    status, body, _ = server.raw("POST", "/v1/chat/completions", b'{"model": "tiny", "messages": [')
    assert status == 400 and set(body["error"]) == {"message", "type", "param", "code"}
    assert server.raw("POST", "/v1/completions", b"[1, 2]")[0] == 400
    status, body, _ = server.raw("GET", "/v1/nowhere")
    assert status == 404 and "error" in body
    assert server.raw("POST", "/v1/adapters", {"name": "x", "path": "/does/not/exist"})[0] == 400
    assert chat(client, "tiny", max_tokens=2).choices[0].message.content is not None  # still serving


def test_api_key_is_required(server):
    status, body, _ = server.raw("GET", "/v1/models", key=None)
    assert status == 401 and body["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        server.client(key="wrong").models.list()


def test_full_queue_answers_429_with_retry_after(server):
    client = server.client()
    results = []

    def ask():
        try:
            results.append(client.completions.create(model="tiny", prompt="hi", max_tokens=2, temperature=0))
        except openai.RateLimitError as e:
            results.append(e)

    server.wait_idle()
    batch = server.engine.max_batch_size
    server.engine.max_batch_size = 1  # one request in flight, so the others stay in the queue
    try:
        with server.engine.lock:  # the worker waits at its first step: one request taken, max_queue=2 waiting
            threads = [threading.Thread(target=ask) for _ in range(5)]
            for t in threads:
                t.start()
            wait_for(lambda: len(results) >= 2, 20)
            time.sleep(0.2)
        for t in threads:
            t.join(30)
    finally:
        server.engine.max_batch_size = batch
    refused = [r for r in results if isinstance(r, openai.RateLimitError)]
    assert len(results) == 5 and 2 <= len(refused) <= 3
    assert all(r.response.headers["retry-after"] == "1" for r in refused)
    assert all(r.choices[0].text is not None for r in results if not isinstance(r, Exception))


def test_disconnect_mid_stream_frees_the_slot(server):
    server.wait_idle()
    before = dict(server.engine.stats)
    stream = server.client().completions.create(model="tiny", prompt="hi", max_tokens=2000, temperature=0, stream=True)
    next(iter(stream))
    stream.close()
    server.wait_idle()
    assert server.engine.stats["cancelled"] == before["cancelled"] + 1
    assert server.engine.stats["tokens"] - before["tokens"] < 2000


def test_unload_during_a_stream_is_409_then_unload_and_reload(server, files, reference):
    ensure_loaded(server, files, "alpha", "beta")
    server.wait_idle()
    stream = server.client().completions.create(model="beta", prompt="hi", max_tokens=2000, temperature=0, stream=True)
    next(iter(stream))
    status, body, _ = server.raw("DELETE", "/v1/adapters/beta")
    assert status == 409 and body["error"]["code"] == "adapter_busy"
    stream.close()
    server.wait_idle()
    assert server.raw("DELETE", "/v1/adapters/beta")[:2] == (200, {"object": "adapter", "name": "beta",
                                                                   "deleted": True})
    assert "beta" not in {m.id for m in server.client().models.list().data}
    with pytest.raises(openai.NotFoundError):
        chat(server.client(), "beta")
    assert server.raw("DELETE", "/v1/adapters/beta")[0] == 404
    status, body, _ = server.raw("POST", "/v1/adapters", {"name": "beta", "path": str(files["beta"])})
    assert status == 200 and body["parent"] == "tiny" and body["method"] == "dora"
    from safetensors.torch import load_file

    size = sum(t.numel() for t in load_file(files["beta"] / "adapter_model.safetensors").values())
    assert body["parameters"] == size  # loading adds the adapter's own tensors, nothing of the base
    assert chat(server.client(), "beta").choices[0].message.content.strip() == reference("beta")
    assert server.raw("POST", "/v1/adapters", {"name": "beta", "path": str(files["beta"])})[0] == 409


def test_loading_past_the_limit_evicts_the_least_recently_used(server, files, reference):
    ensure_loaded(server, files, "alpha", "beta")
    client = server.client()
    chat(client, "beta", max_tokens=1)
    chat(client, "alpha", max_tokens=1)  # beta is now the least recently used
    status, body, _ = server.raw("POST", "/v1/adapters", {"name": "gamma", "path": str(files["gamma"])})
    assert status == 200 and body["evicted"] == ["beta"] and body["method"] == "adapter"
    assert {m.id for m in client.models.list().data} == {"tiny", "alpha", "gamma"}
    assert chat(client, "gamma").choices[0].message.content.strip() == reference("gamma")
    assert chat(client, "tiny").choices[0].message.content.strip() == reference(None)  # the hook is gone again
    server.raw("DELETE", "/v1/adapters/gamma")
    ensure_loaded(server, files, "beta")


def test_base_changing_artifacts_are_refused(server, tmp_path):
    from tunesmith.methods.artifact import write_artifact

    write_artifact(tmp_path, "freeze", "tiny", {"trainable_blocks": 1, "trainable_modules": []}, {})
    status, body, _ = server.raw("POST", "/v1/adapters", {"name": "frozen", "path": str(tmp_path)})
    assert status == 400 and "own --base" in body["error"]["message"]


def test_other_host_without_key_is_refused_before_loading(monkeypatch, capsys):
    from tunesmith.cli import main

    monkeypatch.delenv("TUNESMITH_API_KEY", raising=False)
    assert main(["serve", "--host", "0.0.0.0", "--base", "/nowhere"]) == 2
    assert "API key" in capsys.readouterr().err


def test_adapters_come_from_flags_or_a_mapping_in_the_file(tmp_path):
    from tunesmith.cli import build_parser
    from tunesmith.commands.options import resolve_options
    from tunesmith.commands.serve import parse_adapters

    args = build_parser().parse_args(["serve", "--adapter", "a=x", "--adapter", "b=y"])
    assert parse_adapters(resolve_options(args).adapter) == {"a": "x", "b": "y"}
    path = tmp_path / "serve.yaml"
    path.write_text("serve:\n  adapter: {math: runs/math/adapter}\n  port: 9000\n")
    o = resolve_options(build_parser().parse_args(["serve", "--config", str(path)]))
    assert parse_adapters(o.adapter) == {"math": "runs/math/adapter"} and o.port == 9000
