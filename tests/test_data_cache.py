"""data.cache: the second prepare_datasets with the same inputs reads Arrow from disk and tokenises nothing."""

from __future__ import annotations

import json

import pytest

from conftest import build_tiny_tokenizer
from tunesmith.config import DataConfig
from tunesmith.data.dataset import prepare_datasets


def chats(n: int, answer: str = "a") -> list[dict]:
    rows = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"{answer}{i}"}]}
            for i in range(n)]
    # one row cut short (truncated) and one with no answer left within max_seq_len (dropped)
    rows.append({"messages": [{"role": "user", "content": "word " * 200}, {"role": "assistant", "content": "x"}]})
    rows.append({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "word " * 200}]})
    return rows


def write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture
def cache_root(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    monkeypatch.setenv("TUNESMITH_DATA_CACHE", str(root))
    return root


@pytest.fixture
def counted_encode(monkeypatch):
    """Counts encode_row calls (through the sft objective, which encodes these rows); `calls.forbid = True` makes
    any further call fail the test."""
    from tunesmith.objectives import sft

    real = sft.encode_row

    class Calls:
        n, forbid = 0, False

    def encode(*args, **kwargs):
        if Calls.forbid:
            raise AssertionError("tokenised although the cache holds these examples")
        Calls.n += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(sft, "encode_row", encode)
    return Calls


def test_second_run_reads_the_cache_without_tokenising(tmp_path, cache_root, counted_encode):
    tokenizer = build_tiny_tokenizer()
    cfg = DataConfig(train=str(write(tmp_path / "train.jsonl", chats(20))), val_split=0.2, max_seq_len=64)
    first = prepare_datasets(cfg, tokenizer, seed=3)
    assert counted_encode.n == 22 and first.stats == {"rows": 22, "truncated": 2, "dropped": 1}
    counted_encode.forbid = True
    second = prepare_datasets(cfg, build_tiny_tokenizer(), seed=3)  # a fresh, equal tokenizer hits too
    assert second.train == first.train and second.validation == first.validation
    assert second.format == first.format and second.stats == first.stats
    assert all(type(v) is int for e in second.train for v in e["input_ids"] + e["labels"])
    entries = list(cache_root.iterdir())
    assert len(entries) == 1 and not entries[0].name.startswith(".")  # no temporary folder left
    assert (entries[0] / "train").is_dir() and (entries[0] / "meta.json").is_file()


@pytest.mark.parametrize("change", ["file", "max_seq_len", "chat_template", "seed", "train_on_prompt"])
def test_any_changed_input_misses(tmp_path, cache_root, counted_encode, change):
    path = write(tmp_path / "train.jsonl", chats(6))
    cfg = DataConfig(train=str(path), val_split=0.2, max_seq_len=64)
    prepare_datasets(cfg, build_tiny_tokenizer(), seed=0)
    before = counted_encode.n
    tokenizer, seed = build_tiny_tokenizer(), 0
    if change == "file":
        write(path, chats(6, answer="b"))
    elif change == "max_seq_len":
        cfg = DataConfig(train=str(path), val_split=0.2, max_seq_len=65)
    elif change == "chat_template":
        tokenizer.chat_template = tokenizer.chat_template.replace("tiny test model", "small test model")
    elif change == "seed":
        seed = 1  # the held-out rows change with the seed
    else:
        cfg = DataConfig(train=str(path), val_split=0.2, max_seq_len=64, train_on_prompt=True)
    prepare_datasets(cfg, tokenizer, seed=seed)
    assert counted_encode.n == 2 * before  # tokenised again
    assert len(list(cache_root.iterdir())) == 2


def test_cache_off_writes_nothing(tmp_path, cache_root, counted_encode):
    cfg = DataConfig(train=str(write(tmp_path / "train.jsonl", chats(4))), cache=False, max_seq_len=64)
    prepare_datasets(cfg, build_tiny_tokenizer(), seed=0)
    prepare_datasets(cfg, build_tiny_tokenizer(), seed=0)
    assert counted_encode.n == 12 and not cache_root.exists()


def test_damaged_entry_is_a_miss(tmp_path, cache_root, counted_encode):
    cfg = DataConfig(train=str(write(tmp_path / "train.jsonl", chats(4))), val_split=0.0, max_seq_len=64)
    first = prepare_datasets(cfg, build_tiny_tokenizer(), seed=0)
    (entry,) = cache_root.iterdir()
    for arrow in (entry / "train").glob("*.arrow"):
        arrow.write_bytes(b"not arrow")
    again = prepare_datasets(cfg, build_tiny_tokenizer(), seed=0)
    assert again.train == first.train and counted_encode.n == 12
    counted_encode.forbid = True  # the damaged entry was replaced by a good one
    assert prepare_datasets(cfg, build_tiny_tokenizer(), seed=0).train == first.train


def test_errors_are_not_cached(tmp_path, cache_root):
    from tunesmith.errors import UserError

    cfg = DataConfig(train=str(write(tmp_path / "train.jsonl", chats(2))), max_seq_len=8)
    for _ in range(2):
        with pytest.raises(UserError, match="max_seq_len=8"):
            prepare_datasets(cfg, build_tiny_tokenizer(), seed=0)
    assert not cache_root.exists() or not list(cache_root.iterdir())
