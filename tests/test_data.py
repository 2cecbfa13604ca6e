"""The data pipeline: readers, formats and validation, label masks, splits, batches, the demo task."""

from __future__ import annotations

import csv
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from conftest import build_tiny_tokenizer
from tunesmith.config import DataConfig
from tunesmith.data.dataset import collate, epoch_order, prepare_datasets, split_rows
from tunesmith.data.demo import canonical, prompt_messages, reference_answer, score, write_demo
from tunesmith.data.formats import detect_format, validate_rows
from tunesmith.data.readers import Row, read_rows
from tunesmith.data.tokenize import IGNORE, encode_row, to_messages
from tunesmith.errors import UserError

PC_ROWS = [{"prompt": 'say "hi", please', "completion": "hi"}, {"prompt": "007", "completion": "bond"}]
CHAT = [
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4"},
    {"role": "user", "content": "As JSON?"},
    {"role": "assistant", "content": '{"answer": 4}'},
]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def rows_of(*fields_list):
    return [Row(f, i) for i, f in enumerate(fields_list, start=1)]


def labelled_runs(tokenizer, example) -> list[str]:
    """The decoded text of each contiguous run of labelled tokens."""
    runs, current = [], []
    for token, label in zip(example["input_ids"], example["labels"]):
        if label != IGNORE:
            assert label == token
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    runs += [current] if current else []
    return [tokenizer.decode(run) for run in runs]


# --- readers -----------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", ["jsonl", "json-array", "json-lines", "csv", "parquet"])
def test_reader_round_trip(tmp_path, suffix):
    if suffix == "jsonl":
        path = tmp_path / "d.jsonl"
        path.write_text(json.dumps(PC_ROWS[0]) + "\n\n" + json.dumps(PC_ROWS[1]) + "\n")
        expected = ["line 1", "line 3"]  # the blank line is skipped but still counted
    elif suffix == "json-array":
        path = tmp_path / "d.json"
        path.write_text(json.dumps(PC_ROWS, indent=2))
        expected = ["row 1", "row 2"]
    elif suffix == "json-lines":
        path = write_jsonl(tmp_path / "d.json", PC_ROWS)
        expected = ["line 1", "line 2"]
    elif suffix == "csv":
        path = tmp_path / "d.csv"
        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, ["prompt", "completion"])
            writer.writeheader()
            writer.writerows(PC_ROWS)
        expected = ["line 2", "line 3"]
    else:
        path = tmp_path / "d.parquet"
        pq.write_table(pa.Table.from_pylist(PC_ROWS), path)
        expected = ["row 1", "row 2"]
    rows = read_rows(path)
    assert [r.fields for r in rows] == PC_ROWS  # CSV keeps "007" a string
    assert [r.location for r in rows] == expected


def test_csv_line_numbers_survive_multiline_cells(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text('text\n"two\nlines"\nnext\n')
    rows = read_rows(path)
    assert [r.fields["text"] for r in rows] == ["two\nlines", "next"]
    assert [r.line for r in rows] == [2, 4]


def test_jsonl_keeps_unicode_line_separators_inside_strings(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"text": "a\u2028b\x85c"}, ensure_ascii=False) + "\n", encoding="utf-8")
    assert read_rows(path)[0].fields == {"text": "a\u2028b\x85c"}


@pytest.mark.parametrize(
    "name, content, needles",
    [
        ("bad.jsonl", '{"text": "a"}\n{"text": "b"}\n{oops\n', ["bad.jsonl", "line 3", "not valid JSON"]),
        ("bad.json", '[\n{"text": "a"},\n{"text": }\n]', ["bad.json", "line 3", "not valid JSON"]),
        ("list.jsonl", '{"text": "a"}\n[1, 2]\n', ["list.jsonl", "line 2", "JSON object", "array"]),
        ("arr.json", '[{"text": "a"}, "b"]', ["arr.json", "row 2", "a string"]),
        ("empty.jsonl", "\n\n", ["empty.jsonl", "no rows"]),
        ("header.csv", "text\n", ["header.csv", "no rows"]),
        ("ragged.csv", "a,b\n1,2\n3\n", ["ragged.csv", "line 3", "1 cells"]),
        ("data.txt", "hello", ["data.txt", "unknown extension", ".jsonl"]),
    ],
)
def test_reader_errors_name_file_and_line(tmp_path, name, content, needles):
    (tmp_path / name).write_text(content)
    with pytest.raises(UserError) as e:
        read_rows(tmp_path / name)
    for needle in needles:
        assert needle in str(e.value)


def test_reader_errors_for_missing_binary_and_broken_files(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        read_rows(tmp_path / "nope.jsonl")
    (tmp_path / "latin1.jsonl").write_bytes(b'{"text": "caf\xe9"}\n')
    with pytest.raises(UserError, match="not UTF-8"):
        read_rows(tmp_path / "latin1.jsonl")
    (tmp_path / "broken.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(UserError, match="broken.parquet.*Parquet"):
        read_rows(tmp_path / "broken.parquet")


# --- formats -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fields, fmt",
    [
        ({"text": "x"}, "text"),
        ({"instruction": "x", "input": "", "output": "y"}, "alpaca"),
        ({"instruction": "x", "output": "y", "text": "z"}, "alpaca"),
        ({"prompt": "x", "completion": "y"}, "prompt_completion"),
        ({"messages": CHAT, "text": "z"}, "messages"),
    ],
)
def test_detect_format(fields, fmt):
    assert detect_format(rows_of(fields), "d.jsonl") == fmt


def test_detect_format_lists_known_formats_and_seen_fields():
    with pytest.raises(UserError) as e:
        detect_format(rows_of({"question": "q", "answer": "a"}), "d.jsonl")
    message = str(e.value)
    assert "d.jsonl line 1" in message and "answer, question" in message
    for fmt in ("text", "alpaca", "prompt_completion", "messages"):
        assert fmt in message


def test_valid_rows_pass():
    validate_rows(rows_of({"instruction": "x", "output": "y"}, {"instruction": "x", "input": None, "output": "y"}),
                  "alpaca", "d.jsonl")
    validate_rows(rows_of({"messages": [{"role": "system", "content": ""}] + CHAT}), "messages", "d.jsonl")


@pytest.mark.parametrize(
    "fmt, fields, problem",
    [
        ("alpaca", {"instruction": "x", "output": 42}, 'field "output" must be a non-empty string (got 42)'),
        ("alpaca", {"instruction": "x"}, 'missing field "output"'),
        ("alpaca", {"instruction": "x", "input": 3, "output": "y"}, 'field "input" must be a string (got 3)'),
        ("text", {"text": "  "}, 'field "text" must be a non-empty string (got "  ")'),
        ("prompt_completion", {"prompt": "x", "completion": ""}, 'field "completion" must be a non-empty string'),
        ("messages", {"messages": "hi"}, 'field "messages" must be a non-empty list'),
        ("messages", {"messages": [{"role": "bot", "content": "x"}]},
         'messages[0]: field "role" must be one of system, user, assistant (got "bot")'),
        ("messages", {"messages": [{"role": "user", "content": ["x"]}]},
         'messages[0]: field "content" must be a string (got ["x"])'),
        ("messages", {"messages": CHAT[:1]}, "messages: no assistant message"),
        ("messages", {"messages": CHAT[1:]}, "messages: an assistant message comes before any user message"),
        ("messages", {"messages": CHAT[:2] + [{"role": "system", "content": "x"}]},
         "messages[2]: a system message may only come first"),
        ("messages", {"messages": [CHAT[0], {"role": "assistant", "content": " "}]},
         "messages[1]: an assistant message must not be empty"),
    ],
)
def test_invalid_rows_name_file_line_and_field(fmt, fields, problem):
    rows = rows_of({"text": "ok"}, fields) if fmt == "text" else [Row(fields, 7)]
    with pytest.raises(UserError) as e:
        validate_rows(rows, fmt, "data/train.jsonl")
    line = 2 if fmt == "text" else 7
    assert f"data/train.jsonl line {line}: {problem}" in str(e.value)


def test_validation_collects_at_most_five_problems():
    rows = rows_of(*[{"text": i} for i in range(8)])
    with pytest.raises(UserError) as e:
        validate_rows(rows, "text", "d.jsonl")
    message = str(e.value)
    assert message.startswith("8 malformed text row(s) in d.jsonl")
    assert "d.jsonl line 5:" in message and "d.jsonl line 6:" not in message
    assert "... and 3 more problem(s)" in message


# --- tokenize: golden label masks on the tiny ChatML tokenizer ----------------------------------


@pytest.mark.parametrize("system", [None, "Answer briefly."])
def test_golden_mask_multi_turn(tiny_tokenizer, system):
    messages = ([{"role": "system", "content": system}] if system else []) + CHAT
    example = encode_row({"messages": messages}, "messages", tiny_tokenizer, 512)
    assert labelled_runs(tiny_tokenizer, example) == ["4<|im_end|>", '{"answer": 4}<|im_end|>']
    text = tiny_tokenizer.decode(example["input_ids"])
    assert text == tiny_tokenizer.apply_chat_template(messages, tokenize=False)
    assert (system or "You are a tiny test model.") in text  # the template's default system turn, unlabelled
    assert example["truncated"] is False


def test_no_extra_bos(tiny_tokenizer):
    example = encode_row({"messages": CHAT}, "messages", tiny_tokenizer, 512)
    bos = tiny_tokenizer.bos_token_id  # <|im_start|>, which the template writes itself
    assert example["input_ids"][0] == bos and example["input_ids"][1] != bos
    assert example["input_ids"].count(bos) == 5  # default system + 4 turns


def test_alpaca_and_prompt_completion_become_conversations(tiny_tokenizer):
    alpaca = {"instruction": "Translate", "input": "chat", "output": "cat"}
    assert to_messages(alpaca, "alpaca")[0] == {"role": "user", "content": "Translate\n\nchat"}
    assert to_messages(dict(alpaca, input=""), "alpaca")[0]["content"] == "Translate"
    example = encode_row(alpaca, "alpaca", tiny_tokenizer, 512)
    assert labelled_runs(tiny_tokenizer, example) == ["cat<|im_end|>"]
    example = encode_row({"prompt": "2+2?", "completion": " 4"}, "prompt_completion", tiny_tokenizer, 512)
    assert labelled_runs(tiny_tokenizer, example) == [" 4<|im_end|>"]


def test_system_prompt_added_only_when_missing(tiny_tokenizer):
    assert to_messages({"messages": CHAT}, "messages", "Be exact.")[0] == {"role": "system", "content": "Be exact."}
    own = [{"role": "system", "content": "Mine."}] + CHAT
    assert to_messages({"messages": own}, "messages", "Be exact.")[0]["content"] == "Mine."
    example = encode_row({"prompt": "q", "completion": "a"}, "prompt_completion", tiny_tokenizer, 512,
                         system_prompt="Be exact.")
    text = tiny_tokenizer.decode(example["input_ids"])
    assert "Be exact." in text and "tiny test model" not in text


def test_train_on_prompt_labels_everything(tiny_tokenizer):
    example = encode_row({"messages": CHAT}, "messages", tiny_tokenizer, 512, train_on_prompt=True)
    assert example["labels"] == example["input_ids"]


def test_text_rows_train_on_every_token_and_end_with_eos(tiny_tokenizer):
    example = encode_row({"text": "hello world"}, "text", tiny_tokenizer, 512)
    assert example["labels"] == example["input_ids"]
    assert example["input_ids"][-1] == tiny_tokenizer.eos_token_id
    assert tiny_tokenizer.decode(example["input_ids"][:-1]) == "hello world"


def test_truncation_is_flagged(tiny_tokenizer):
    full = encode_row({"messages": CHAT}, "messages", tiny_tokenizer, 512)
    cut = encode_row({"messages": CHAT}, "messages", tiny_tokenizer, 10)
    assert cut["truncated"] is True and len(cut["input_ids"]) == len(cut["labels"]) == 10
    assert cut["input_ids"] == full["input_ids"][:10] and cut["labels"] == full["labels"][:10]


def test_instruction_data_needs_a_chat_template():
    tokenizer = build_tiny_tokenizer(chat_template=None)
    with pytest.raises(UserError, match="no chat template"):
        encode_row({"prompt": "q", "completion": "a"}, "prompt_completion", tokenizer, 64)
    assert encode_row({"text": "plain"}, "text", tokenizer, 64)["labels"]


def test_template_that_rewrites_turns_is_refused():
    # Closes only the very last turn with a marker, so a prefix does not render as a prefix.
    template = ("{% for m in messages %}{{ m['role'] + ': ' + m['content'] }}"
                "{% if loop.last %}<|im_end|>{% else %}\n{% endif %}{% endfor %}")
    with pytest.raises(UserError, match="turn boundaries cannot be found"):
        encode_row({"messages": CHAT}, "messages", build_tiny_tokenizer(template), 512)


def test_tokenizer_without_offsets_gives_the_same_mask(tiny_tokenizer):
    class WithoutOffsets:
        """The tiny tokenizer pretending to be a slow one (no offset mapping)."""

        is_fast = False

        def __getattr__(self, name):
            return getattr(tiny_tokenizer, name)

        def __call__(self, *args, **kwargs):
            return tiny_tokenizer(*args, **kwargs)

    example = encode_row({"messages": CHAT}, "messages", WithoutOffsets(), 512)
    assert labelled_runs(tiny_tokenizer, example) == ["4<|im_end|>", '{"answer": 4}<|im_end|>']


# --- dataset: split, encode, drop, batch --------------------------------------------------------


def numbered_chats(n):
    return [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
            for i in range(n)]


def answers(tokenizer, examples):
    return sorted("".join(labelled_runs(tokenizer, e)) for e in examples)


def test_seeded_split_is_deterministic_and_disjoint(tmp_path, tiny_tokenizer):
    path = write_jsonl(tmp_path / "train.jsonl", numbered_chats(40))
    cfg = DataConfig(train=str(path), val_split=0.25)
    a, b = prepare_datasets(cfg, tiny_tokenizer, seed=1), prepare_datasets(cfg, tiny_tokenizer, seed=1)
    c = prepare_datasets(cfg, tiny_tokenizer, seed=2)
    assert a.train == b.train and a.validation == b.validation
    assert len(a.train) == 30 and len(a.validation) == 10 and a.format == "messages"
    train, val = answers(tiny_tokenizer, a.train), answers(tiny_tokenizer, a.validation)
    assert not set(train) & set(val)
    assert sorted(train + val) == sorted(f"a{i}<|im_end|>" for i in range(40))
    assert answers(tiny_tokenizer, c.validation) != val
    assert a.stats == {"rows": 40, "truncated": 0, "dropped": 0}
    assert "40 read" in a.describe() and "30 train / 10 validation" in a.describe()


def test_split_edge_cases():
    rows = rows_of(*numbered_chats(3))
    assert [len(part) for part in split_rows(rows, 0.0, 0)] == [3, 0]
    assert [len(part) for part in split_rows(rows, 0.01, 0)] == [2, 1]  # asked for some: at least one
    assert [len(part) for part in split_rows(rows[:1], 0.5, 0)] == [1, 0]  # never the only row


def test_validation_file_is_used_instead_of_a_split(tmp_path, tiny_tokenizer):
    train = write_jsonl(tmp_path / "train.jsonl", numbered_chats(5))
    val = write_jsonl(tmp_path / "val.jsonl", numbered_chats(2))
    prepared = prepare_datasets(DataConfig(train=str(train), validation=str(val)), tiny_tokenizer, seed=0)
    assert len(prepared.train) == 5 and len(prepared.validation) == 2 and prepared.stats["rows"] == 7


def test_truncated_and_dropped_rows_are_counted(tmp_path, tiny_tokenizer):
    long_prompt = {"messages": [{"role": "user", "content": "word " * 200}, {"role": "assistant", "content": "a"}]}
    path = write_jsonl(tmp_path / "train.jsonl", [long_prompt] + numbered_chats(3))
    cfg = DataConfig(train=str(path), val_split=0.0, max_seq_len=64)  # a short chat is 50 tokens
    prepared = prepare_datasets(cfg, tiny_tokenizer, seed=0)
    assert prepared.stats == {"rows": 4, "truncated": 1, "dropped": 1}
    assert len(prepared.train) == 3
    assert all(any(label != IGNORE for label in e["labels"][1:]) for e in prepared.train)


def test_every_row_dropped_is_an_error(tmp_path, tiny_tokenizer):
    path = write_jsonl(tmp_path / "train.jsonl", numbered_chats(3))
    with pytest.raises(UserError, match="max_seq_len=8"):
        prepare_datasets(DataConfig(train=str(path), max_seq_len=8), tiny_tokenizer, seed=0)


def test_row_errors_during_encoding_name_file_and_line(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", numbered_chats(3))
    with pytest.raises(UserError, match=r"train\.jsonl line 1: The tokenizer has no chat template"):
        prepare_datasets(DataConfig(train=str(path)), build_tiny_tokenizer(chat_template=None), seed=0)


def test_explicit_format_is_validated(tmp_path, tiny_tokenizer):
    path = write_jsonl(tmp_path / "train.jsonl", numbered_chats(3))
    with pytest.raises(UserError, match='line 1: missing field "instruction"'):
        prepare_datasets(DataConfig(train=str(path), format="alpaca"), tiny_tokenizer, seed=0)


def test_collate_pads_right():
    examples = [{"input_ids": [5, 6, 7], "labels": [IGNORE, 6, 7]}, {"input_ids": [8], "labels": [8]}]
    batch = collate(examples, pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[IGNORE, 6, 7], [8, IGNORE, IGNORE]]
    assert all(t.dtype == torch.long for t in batch.values())


def test_epoch_order_is_a_seeded_permutation():
    assert sorted(epoch_order(10, seed=3, epoch=0)) == list(range(10))
    assert epoch_order(10, 3, 1) == epoch_order(10, 3, 1)
    assert epoch_order(10, 3, 0) != epoch_order(10, 3, 1)
    assert epoch_order(10, 3, 0) != epoch_order(10, 4, 0)


# --- the demo task ------------------------------------------------------------------------------


def user_prompts(path):
    return {json.loads(line)["messages"][0]["content"] for line in path.read_text().splitlines()}


@pytest.mark.parametrize("variant", ["easy", "hard"])
def test_demo_is_seeded_and_splits_share_no_prompt(tmp_path, variant):
    a = write_demo(tmp_path / "a", seed=5, n_train=200, n_validation=30, n_test=30, variant=variant)
    b = write_demo(tmp_path / "b", seed=5, n_train=200, n_validation=30, n_test=30, variant=variant)
    c = write_demo(tmp_path / "c", seed=6, n_train=200, n_validation=30, n_test=30, variant=variant)
    assert a["train"].read_text() == b["train"].read_text() and a["test"].read_text() == b["test"].read_text()
    assert a["train"].read_text() != c["train"].read_text()
    train, val, test = (user_prompts(a[s]) for s in ("train", "validation", "test"))
    assert (len(train), len(val), len(test)) == (200, 30, 30)
    assert not (test & train) and not (test & val) and not (val & train)
    for path in (a["train"], a["validation"], a["test"]):  # the preference files: test_preference_data.py
        rows = read_rows(path)
        assert detect_format(rows, path) == "messages"
        validate_rows(rows, "messages", path)
        for row in rows:
            answer = reference_answer(row.fields)
            assert canonical(json.loads(answer)) == answer  # one line, canonical spacing and key order


def test_demo_answers_use_a_fixed_key_order(tmp_path):
    paths = write_demo(tmp_path, n_train=40, n_validation=0, n_test=0)
    keys = {tuple(json.loads(reference_answer(r.fields))) for r in read_rows(paths["train"])}
    assert keys == {("name", "age", "city"), ("product", "quantity", "price")}


def test_demo_unknown_variant():
    with pytest.raises(UserError, match="easy, hard"):
        write_demo("unused", variant="medium")


def test_prompt_messages_and_reference_answer():
    fields = {"messages": [{"role": "system", "content": "s"}] + CHAT}
    assert prompt_messages(fields) == fields["messages"][:4]
    assert reference_answer(fields) == '{"answer": 4}'


def test_score_hand_made_cases():
    ref = '{"name": "Ada", "age": 36, "city": "London"}'
    predictions = [ref, f"  {ref}\n", '{"name": "Ada", "age": 37, "city": "London"}', "Ada, 36, London", "[1, 2]"]
    scores = score(predictions, [ref] * 5)
    assert scores["exact_match"] == pytest.approx(40.0)
    assert scores["valid_json"] == pytest.approx(60.0)
    assert scores["field_accuracy"] == pytest.approx(100 * 8 / 15)


def test_score_nested_fields_and_json_types():
    ref = '{"name": "Ada", "address": {"city": "Oslo", "zip": null}, "items": [{"n": 1}], "vip": true}'
    pred = '{"vip": 1, "items": [{"n": 1.0}], "address": {"city": "Oslo"}, "name": "Ada"}'
    scores = score([pred], [ref])
    assert scores == {"exact_match": 0.0, "valid_json": 100.0, "field_accuracy": pytest.approx(60.0)}
    assert score(["no"], ["plain text answer"]) == {"exact_match": 0.0, "valid_json": 0.0}
    assert score([], []) == {"exact_match": 0.0, "valid_json": 0.0}
    with pytest.raises(ValueError):
        score(["a"], [])
