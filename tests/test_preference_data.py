"""Preference and unpaired data: formats and validation, encoding (shared prompt, answer-only labels,
truncation), the test-set cases, and the demo task's pairs with their plausible mistakes."""

from __future__ import annotations

import hashlib
import json
import random

import pytest

from conftest import build_tiny_tokenizer
from tunesmith.config import DataConfig
from tunesmith.data.demo import MISTAKES, canonical, demo_rows, mistake, parse_object, reference_answer, write_demo
from tunesmith.data.formats import detect_format, validate_rows
from tunesmith.data.preference import encode_pair, encode_unpaired
from tunesmith.data.readers import Row, read_rows
from tunesmith.data.tokenize import IGNORE, render, to_messages
from tunesmith.errors import UserError
from tunesmith.evaluate.task import test_cases as task_cases

EOT = "<|im_end|>"
PAIR = {"prompt": "Extract the name as JSON.\nText: Ada is 36.", "chosen": '{"name": "Ada"}',
        "rejected": 'Sure! {"name": "Ada"}'}
CONVERSATION = [{"role": "system", "content": "Answer in JSON."}, {"role": "user", "content": "Who?"},
                {"role": "assistant", "content": "Ada."}, {"role": "user", "content": PAIR["prompt"]}]


def assistant(text: str) -> list[dict]:
    return [{"role": "assistant", "content": text}]


def conversational(row: dict) -> dict:
    """A string-form row in TRL's conversational form."""
    out = {"prompt": [{"role": "user", "content": row["prompt"]}]}
    for name in ("chosen", "rejected", "completion"):
        if name in row:
            out[name] = assistant(row[name])
    return {**row, **out}


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def decode(tokenizer, ids) -> str:
    return tokenizer.decode(ids, clean_up_tokenization_spaces=False)


# --- formats ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("form", ["string", "conversational"])
def test_detects_preference_and_unpaired(form):
    pair = PAIR if form == "string" else conversational(PAIR)
    unpaired = {"prompt": PAIR["prompt"], "completion": PAIR["chosen"], "label": True}
    unpaired = unpaired if form == "string" else conversational(unpaired)
    assert detect_format([Row(pair, 1)], "p.jsonl") == "preference"
    assert detect_format([Row(unpaired, 1)], "u.jsonl") == "unpaired"
    validate_rows([Row(pair, 1)], "preference", "p.jsonl")
    validate_rows([Row(unpaired, 1), Row(dict(unpaired, label=False), 2)], "unpaired", "u.jsonl")


def test_detection_of_the_other_formats_is_unchanged():
    assert detect_format([Row({"prompt": "p", "completion": "c"}, 1)], "f") == "prompt_completion"
    assert detect_format([Row({"prompt": "p", "completion": "c", "chosen": "c"}, 1)], "f") == "prompt_completion"
    assert detect_format([Row({"messages": [], "chosen": "c", "rejected": "r", "prompt": "p"}, 1)], "f") == "messages"
    assert detect_format([Row({"instruction": "i", "output": "o", "prompt": "p", "completion": "c",
                               "label": True}, 1)], "f") == "alpaca"


def test_a_multi_turn_prompt_with_a_system_turn_is_valid():
    validate_rows([Row({"prompt": CONVERSATION, "chosen": assistant("a"), "rejected": "b"}, 1)], "preference", "f")


GOOD = {"preference": {"prompt": "p", "chosen": "a", "rejected": "b"},
        "unpaired": {"prompt": "p", "completion": "a", "label": False}}
BAD = [
    ("preference", {"rejected": None}, 'missing field "rejected"'),
    ("preference", {"prompt": ""}, 'field "prompt" must be a non-empty string'),
    ("preference", {"rejected": 5}, 'field "rejected" must be a non-empty string or a list'),
    ("preference", {"rejected": "a"}, 'fields "chosen" and "rejected" are the same answer'),
    ("preference", {"chosen": [{"role": "user", "content": "p"}] + assistant("a")},
     'chosen[0]: a user message; "chosen" holds only the answer'),
    ("preference", {"chosen": assistant("a") + assistant("c")}, 'field "chosen" must hold exactly one assistant'),
    ("preference", {"chosen": assistant(" ")}, "chosen[0]: an assistant message must not be empty"),
    ("preference", {"prompt": CONVERSATION[:3]}, "prompt: the last message must be the user message"),
    ("preference", {"prompt": [{"role": "robot", "content": "p"}]}, 'prompt[0]: field "role" must be one of'),
    ("preference", {"margin": "big"}, 'field "margin" must be a finite number when given (got "big")'),
    ("preference", {"margin": True}, 'field "margin" must be a finite number when given (got true)'),
    ("unpaired", {"label": "true"}, 'field "label" must be true or false (got "true")'),
    ("unpaired", {"label": 1}, 'field "label" must be true or false (got 1)'),
    ("unpaired", {"label": None}, 'missing field "label"'),
]


@pytest.mark.parametrize("fmt, change, problem", BAD)
def test_a_bad_row_names_the_file_the_line_and_the_field(tmp_path, fmt, change, problem):
    row = {k: v for k, v in {**GOOD[fmt], **change}.items() if v is not None}
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD[fmt], row])
    with pytest.raises(UserError) as e:
        validate_rows(read_rows(path), fmt, path)
    assert f"{path} line 2: {problem}" in str(e.value)


def test_config_accepts_the_new_formats():
    assert DataConfig(format="preference").format == "preference"
    assert DataConfig(format="unpaired").format == "unpaired"


# --- encoding ------------------------------------------------------------------------------------


@pytest.mark.parametrize("form", ["string", "conversational"])
def test_pair_shares_the_prompt_and_labels_only_the_answers(tiny_tokenizer, form):
    row = PAIR if form == "string" else conversational(PAIR)
    e = encode_pair(row, tiny_tokenizer, 512, None)
    assert set(e) == {"prompt_len", "chosen_ids", "chosen_labels", "rejected_ids", "rejected_labels", "margin",
                      "truncated"}
    assert e["margin"] == 0.0  # no margin field: none (the reward model reads it)
    n = e["prompt_len"]
    prompt_text = render(tiny_tokenizer, [{"role": "user", "content": PAIR["prompt"]}], add_generation_prompt=True)
    assert decode(tiny_tokenizer, e["chosen_ids"][:n]) == prompt_text
    assert e["chosen_ids"][:n] == e["rejected_ids"][:n]
    for side in ("chosen", "rejected"):
        ids, labels = e[f"{side}_ids"], e[f"{side}_labels"]
        assert len(ids) == len(labels) and labels[:n] == [IGNORE] * n and labels[n:] == ids[n:]
        assert IGNORE not in labels[n:]
        assert decode(tiny_tokenizer, labels[n:]) == PAIR[side] + EOT
        # pad token == end-of-turn token (as in SmolLM2): the end-of-turn token is labelled anyway.
        assert labels[-1] == tiny_tokenizer.pad_token_id == tiny_tokenizer.eos_token_id
    assert e["truncated"] is False
    assert e == encode_pair(conversational(PAIR) if form == "string" else PAIR, tiny_tokenizer, 512, None)


def test_pair_of_a_multi_turn_prompt_masks_its_earlier_answers(tiny_tokenizer):
    e = encode_pair({"prompt": CONVERSATION, "chosen": "yes", "rejected": "no"}, tiny_tokenizer, 512)
    n = e["prompt_len"]
    assert decode(tiny_tokenizer, e["chosen_ids"][:n]) == render(tiny_tokenizer, CONVERSATION, True)
    assert decode(tiny_tokenizer, e["chosen_labels"][n:]) == "yes" + EOT
    assert all(label == IGNORE for label in e["chosen_labels"][:n])


def test_system_prompt_is_added_to_the_prompt_only_when_it_has_none(tiny_tokenizer):
    e = encode_pair(PAIR, tiny_tokenizer, 512, "Be exact.")
    prompt = decode(tiny_tokenizer, e["chosen_ids"][: e["prompt_len"]])
    assert "Be exact." in prompt and "tiny test model" not in prompt
    e = encode_pair(dict(PAIR, prompt=CONVERSATION), tiny_tokenizer, 512, "Be exact.")
    assert "Be exact." not in decode(tiny_tokenizer, e["chosen_ids"])


def test_unpaired_row(tiny_tokenizer):
    for label in (True, False):
        row = {"prompt": PAIR["prompt"], "completion": assistant(PAIR["rejected"]), "label": label}
        e = encode_unpaired(row, tiny_tokenizer, 512, None)
        assert set(e) == {"prompt_len", "input_ids", "labels", "label", "truncated"}
        assert e["label"] is label and e["truncated"] is False
        pair = encode_pair(PAIR, tiny_tokenizer, 512, None)
        assert e["prompt_len"] == pair["prompt_len"] and e["input_ids"] == pair["rejected_ids"]
        assert e["labels"] == pair["rejected_labels"]


def test_truncation_cuts_the_prompt_from_the_left_first_and_keeps_prompts_equal(tiny_tokenizer):
    row = {"prompt": "Tell me about the quick brown fox. " * 3, "chosen": "It jumps over the lazy dog.",
           "rejected": "No."}
    full = encode_pair(row, tiny_tokenizer, 10_000)
    p = full["prompt_len"]
    prompt, chosen, rejected = full["chosen_ids"][:p], full["chosen_ids"][p:], full["rejected_ids"][p:]
    longest = max(len(chosen), len(rejected))
    assert longest > 4 and p > 2 * longest  # both cuts happen within the range below
    for max_len in range(8, p + longest + 2):
        e = encode_pair(row, tiny_tokenizer, max_len)
        n = e["prompt_len"]
        assert e["truncated"] is (max_len < p + longest)
        assert n == min(p, max(max_len // 2, max_len - longest))
        assert e["chosen_ids"][:n] == e["rejected_ids"][:n] == prompt[p - n :]  # the prompt's end is kept
        for side, answer in (("chosen", chosen), ("rejected", rejected)):
            ids, labels = e[f"{side}_ids"], e[f"{side}_labels"]
            assert len(ids) == len(labels) <= max_len
            assert ids[n:] == answer[: max_len - n] == labels[n:]  # the answer's start is kept
            assert labels[:n] == [IGNORE] * n
    u = encode_unpaired({"prompt": row["prompt"], "completion": row["chosen"], "label": True}, tiny_tokenizer, 12)
    assert u["truncated"] and len(u["input_ids"]) == 12 and u["prompt_len"] == max(6, 12 - len(chosen))


def test_a_template_that_rewrites_turns_is_refused():
    template = ("{% for m in messages %}{{ m['role'] + ': ' + m['content'] }}"
                "{% if loop.last %}<|im_end|>{% else %}\n{% endif %}{% endfor %}")
    with pytest.raises(UserError, match="turn boundaries cannot be found"):
        encode_pair(PAIR, build_tiny_tokenizer(template), 512)


# --- the test-set cases ----------------------------------------------------------------------------


def test_task_cases_of_preference_and_unpaired_files(tmp_path):
    pairs = write_jsonl(tmp_path / "p.jsonl", [PAIR, conversational(dict(PAIR, chosen="c2"))])
    user = [{"role": "user", "content": PAIR["prompt"]}]
    assert task_cases(DataConfig(test=str(pairs))) == [(user, PAIR["chosen"]), (user, "c2")]
    rows = [{"prompt": "p", "completion": "good", "label": True}, {"prompt": "p", "completion": "bad", "label": False}]
    unpaired = write_jsonl(tmp_path / "u.jsonl", rows)
    assert task_cases(DataConfig(test=str(unpaired))) == [([{"role": "user", "content": "p"}], "good")]
    assert to_messages(rows[1], "unpaired")[-1] == {"role": "assistant", "content": "bad"}


# --- the demo task -----------------------------------------------------------------------------------


def kind_of(rejected: str, chosen: str) -> str:
    """Which of the four mistakes `rejected` is."""
    got, right = parse_object(rejected), json.loads(chosen)
    if got is not None:
        return "wrong_value" if list(got) == list(right) else "missing_field"
    if chosen.startswith(rejected):
        return "truncated"
    assert chosen in rejected
    return "prose"


@pytest.mark.parametrize("variant", ["easy", "hard"])
def test_every_mistake_kind_is_wrong_in_its_own_way(variant):
    rng = random.Random(0)
    for row in demo_rows(40, seed=2, variant=variant):
        answer = reference_answer(row)
        for kind in MISTAKES:
            wrong = mistake(answer, rng, kind)
            assert wrong != answer and wrong.strip() and kind_of(wrong, answer) == kind


def demo_files(path, seed, variant="easy"):
    return write_demo(path, seed=seed, n_train=120, n_validation=20, n_test=20, variant=variant)


@pytest.mark.parametrize("variant", ["easy", "hard"])
def test_demo_pairs_and_unpaired_rows(tmp_path, variant):
    a, b, c = (demo_files(tmp_path / d, seed, variant) for d, seed in (("a", 5), ("b", 5), ("c", 6)))
    new = [f"preference_{s}" for s in ("train", "validation", "test")] + ["unpaired_train", "unpaired_validation"]
    assert set(new) < set(a)
    for name in new:
        assert a[name].read_bytes() == b[name].read_bytes() != c[name].read_bytes()
    kinds = set()
    for split in ("train", "validation", "test"):
        path = a[f"preference_{split}"]
        rows = read_rows(path)
        assert detect_format(rows, path) == "preference"
        validate_rows(rows, "preference", path)
        sft = [r.fields["messages"] for r in read_rows(a[split])]
        assert [r.fields["prompt"] for r in rows] == [m[:-1] for m in sft]  # the same rows, in the same order
        for row, messages in zip(rows, sft):
            chosen, rejected = row.fields["chosen"][0]["content"], row.fields["rejected"][0]["content"]
            assert chosen == messages[-1]["content"] == canonical(json.loads(chosen)) and rejected != chosen
            kinds.add(kind_of(rejected, chosen))
    assert kinds == set(MISTAKES)
    labels = []
    for split in ("train", "validation"):
        path = a[f"unpaired_{split}"]
        rows = read_rows(path)
        assert detect_format(rows, path) == "unpaired"
        validate_rows(rows, "unpaired", path)
        answers = [m[-1]["content"] for m in (r.fields["messages"] for r in read_rows(a[split]))]
        for row, answer in zip(rows, answers):
            assert (row.fields["completion"][0]["content"] == answer) is row.fields["label"]
        labels += [r.fields["label"] for r in rows]
    assert abs(sum(labels) - len(labels) / 2) <= 2  # about half of each


def test_demo_pairs_encode(tmp_path, tiny_tokenizer):
    paths = demo_files(tmp_path, 3)
    for row in read_rows(paths["preference_validation"]):
        e = encode_pair(row.fields, tiny_tokenizer, 512)
        n = e["prompt_len"]
        assert e["chosen_ids"][:n] == e["rejected_ids"][:n] and not e["truncated"]
        assert decode(tiny_tokenizer, e["rejected_labels"][n:]) == row.fields["rejected"][0]["content"] + EOT


def test_demo_sft_files_are_unchanged(tmp_path):
    """The pairs come from a generator of their own: the SFT files are byte for byte what they were before."""
    paths = write_demo(tmp_path, seed=3, n_train=30, n_validation=5, n_test=5)
    digest = hashlib.sha256(b"".join(paths[s].read_bytes() for s in ("train", "validation", "test"))).hexdigest()
    assert digest == "e11b8022033b1067d65359cd6e73b09324d9c1354376bf448bba38bf9ecee7a2"  # before the pairs existed


@pytest.mark.parametrize("name", ["llama3", "zephyr", "gemma"])
def test_pair_labels_with_other_templates(name):
    from test_golden_masks import template_tokenizer

    tokenizer, end = template_tokenizer(name)
    e = encode_pair(PAIR, tokenizer, 512)
    n = e["prompt_len"]
    prompt = render(tokenizer, [{"role": "user", "content": PAIR["prompt"]}], add_generation_prompt=True)
    assert decode(tokenizer, e["chosen_ids"][:n]) == prompt and e["chosen_ids"][:n] == e["rejected_ids"][:n]
    for side in ("chosen", "rejected"):
        assert decode(tokenizer, e[f"{side}_labels"][n:]) == PAIR[side] + end
        assert e[f"{side}_labels"][-1] == tokenizer.convert_tokens_to_ids(end)


@pytest.mark.integration
def test_pair_with_the_default_model_tokenizer():
    """SmolLM2-135M-Instruct's tokenizer: its pad token is its end-of-turn token, which is labelled."""
    from transformers import AutoTokenizer

    from tunesmith.config import ModelConfig
    from tunesmith.models.loading import resolve_model_folder

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_folder(ModelConfig()))
    e = encode_pair(conversational(PAIR), tokenizer, 512)
    n = e["prompt_len"]
    assert e["chosen_ids"][:n] == e["rejected_ids"][:n]
    assert "You are a helpful AI assistant named SmolLM" in decode(tokenizer, e["chosen_ids"][:n])
    for side in ("chosen", "rejected"):
        assert decode(tokenizer, e[f"{side}_labels"][n:]) == PAIR[side] + EOT
        assert e[f"{side}_labels"][-1] == tokenizer.convert_tokens_to_ids(EOT)
