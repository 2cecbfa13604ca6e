"""`tunesmith generate --server URL` and `tunesmith chat --server URL` (tunesmith/serve/client.py) against a server
started here on a free port: the same answers as loading the model and adapter locally."""

from __future__ import annotations

import pytest

from test_serve import KEY, MESSAGES, Server, make_adapter

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from conftest import build_tiny_model, build_tiny_tokenizer

    root = tmp_path_factory.mktemp("client")
    build_tiny_model().save_pretrained(root / "tiny")
    build_tiny_tokenizer().save_pretrained(root / "tiny")
    make_adapter(root / "tiny", root / "alpha", "lora", 1, r=4, alpha=8)
    make_adapter(root / "tiny", root / "beta", "dora", 2, r=2, alpha=4)
    files = {"base": root / "tiny", "alpha": root / "alpha", "beta": root / "beta"}
    server = Server(files)
    yield server, files
    server.close()


def local(files, adapter):
    from tunesmith.commands.infer import generate_one

    return generate_one(str(files["base"]), str(files[adapter]) if adapter else None, MESSAGES[0]["content"], 12,
                        None, "none")


def test_generate_with_server_answers_as_the_local_model(served, capsys, monkeypatch):
    from tunesmith.cli import main

    server, files = served
    monkeypatch.setenv("TUNESMITH_API_KEY", KEY)
    for adapter in (None, "alpha"):
        flags = ["--adapter", adapter] if adapter else ["--model", "tiny"]
        assert main(["generate", "--server", server.url, *flags, "--max-new-tokens", "12",
                     MESSAGES[0]["content"]]) == 0
        assert capsys.readouterr().out.strip() == local(files, adapter), adapter
    assert local(files, None) != local(files, "alpha")  # so the two checks tell base and adapter apart


def test_chat_with_server_streams_each_turn(served, capsys, monkeypatch):
    from tunesmith.cli import main

    server, files = served
    monkeypatch.setenv("TUNESMITH_API_KEY", KEY)
    lines = iter([MESSAGES[0]["content"], ""])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    assert main(["chat", "--server", server.url + "/v1", "--adapter", "beta", "--max-new-tokens", "12"]) == 0
    assert f"model> {local(files, 'beta')}" in capsys.readouterr().out


def test_server_errors_are_user_errors(served, capsys, monkeypatch):
    from tunesmith.cli import main

    server, _ = served
    monkeypatch.setenv("TUNESMITH_API_KEY", KEY)
    assert main(["generate", "--server", server.url, "--model", "nope", "hi"]) == 2
    assert "nope" in capsys.readouterr().err
    monkeypatch.setenv("TUNESMITH_API_KEY", "wrong")
    assert main(["generate", "--server", server.url, "--model", "tiny", "hi"]) == 2
    assert "401" in capsys.readouterr().err
    assert main(["generate", "--server", "http://127.0.0.1:9", "hi"]) == 2
    assert "cannot reach" in capsys.readouterr().err
