"""The server's one compute thread (tunesmith/serve/compute.py): jobs handed in from other threads run on it in
order, between the steps of a long job such as the engine's loop, which a waker interrupts when idle; `tunesmith
serve` loads the model, builds the engine and loads adapters (POST /v1/adapters) on that thread."""

from __future__ import annotations

import threading
import time

import pytest

from tunesmith.serve.compute import ComputeThread

from test_serve import wait_for


def test_call_runs_on_the_thread_and_its_exception_is_raised_to_the_caller():
    compute = ComputeThread()
    try:
        assert compute.call(lambda: threading.current_thread().name) == "tunesmith-compute"

        def fail():
            raise ValueError("boom")

        with pytest.raises(ValueError, match="boom"):
            compute.call(fail)
        assert compute.call(lambda a, b=0: a + b, 2, b=3) == 5  # the thread survives a failed job
        assert compute.call(compute.call, lambda: 7) == 7  # a call from the thread itself runs in place
    finally:
        compute.close()
    assert not compute._thread.is_alive()


def test_jobs_handed_in_run_between_the_steps_of_a_long_job_after_a_wake():
    compute = ComputeThread()
    log: list = []
    woken = threading.Event()
    compute.add_waker(woken.set)
    started = threading.Event()

    def long_job():  # the engine's loop in small: steps, and the jobs handed in between them
        started.set()
        for step in range(500):
            log.append(("step", step))
            compute.run_pending()
            if ("job", "tunesmith-compute") in log:
                return step
            time.sleep(0.002)
        return -1

    loop = compute.submit(long_job)
    started.wait(5)
    assert compute.call(lambda: log.append(("job", threading.current_thread().name)) or "done") == "done"
    last = loop.result(5)
    assert woken.is_set() and last >= 0
    job = log.index(("job", "tunesmith-compute"))
    assert log[job - 1][0] == "step" and log[-1] == ("job", "tunesmith-compute")  # between steps, on the thread
    compute.remove_waker(woken.set)
    compute.close()


def test_an_idle_engine_runs_a_job_at_once_and_a_busy_one_between_steps():
    from conftest import build_tiny_model, build_tiny_tokenizer
    from tunesmith.serve.adapters import AdapterRegistry
    from tunesmith.serve.batching import BatchingEngine
    from tunesmith.serve.engine import GenRequest

    import asyncio

    model = build_tiny_model().requires_grad_(False)
    engine = BatchingEngine(model, build_tiny_tokenizer(), AdapterRegistry(model, "base"))
    engine.eos_ids = set()
    engine.start()
    try:
        begin = time.monotonic()
        assert engine.call(lambda: threading.current_thread().name) == "tunesmith-compute"
        assert time.monotonic() - begin < 2.0  # woken from its wait for requests, not at a timeout

        async def run():
            stream = engine.submit(GenRequest(list(range(3, 10)), None, 200))
            await asyncio.sleep(0)
            tokens_seen = []
            async for item in stream:
                tokens_seen.append(item)
                if len(tokens_seen) == 3:  # the request is decoding now: the job runs between two of its steps
                    marks.append(await asyncio.to_thread(engine.call, lambda: engine.stats["tokens"]))
            return tokens_seen

        marks: list[int] = []
        items = asyncio.run(run())
        assert len(marks) == 1 and 3 <= marks[0] < 200  # it ran while the request was in flight
        assert items[-1].completion_tokens == 200  # and the request went on to its end
    finally:
        engine.close()


def test_serve_loads_the_model_and_adapters_on_the_compute_thread(monkeypatch, tmp_path):
    import tunesmith.models.loading as loading
    from test_serve import Server, make_adapter

    from conftest import build_tiny_model, build_tiny_tokenizer

    build_tiny_model().save_pretrained(tmp_path / "base")
    build_tiny_tokenizer().save_pretrained(tmp_path / "base")
    make_adapter(tmp_path / "base", tmp_path / "alpha", "lora", 1, r=4, alpha=8)
    make_adapter(tmp_path / "base", tmp_path / "beta", "lora", 2, r=4, alpha=8)
    threads: dict[str, str] = {}
    load = loading.load_model_and_tokenizer

    def recording_load(*args, **kwargs):
        threads["model"] = threading.current_thread().name
        return load(*args, **kwargs)

    monkeypatch.setattr(loading, "load_model_and_tokenizer", recording_load)
    server = Server({"base": tmp_path / "base", "alpha": tmp_path / "alpha", "beta": tmp_path / "beta"})
    try:
        registry = server.engine.registry
        registry_load = registry.load

        def recording_registry_load(*args):
            threads["adapter"] = threading.current_thread().name
            return registry_load(*args)

        registry.load = recording_registry_load
        server.raw("DELETE", "/v1/adapters/beta")
        status, _, _ = server.raw("POST", "/v1/adapters", {"name": "beta", "path": str(tmp_path / "beta")})
        assert status == 200
        assert threads == {"model": "tunesmith-compute", "adapter": "tunesmith-compute"}
        wait_for(lambda: server.engine.idle, 5)
    finally:
        server.close()
