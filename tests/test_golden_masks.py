"""Golden label masks: exactly which text is trained on, for the real default model's chat template and
for Llama-3, Zephyr and Gemma templates. Each labelled run decodes to an answer plus its end-of-turn token."""

from __future__ import annotations

import json
import logging

import pytest

from conftest import build_tiny_tokenizer
from tunesmith.config import DataConfig
from tunesmith.data.tokenize import IGNORE, encode_conversation, render
from tunesmith.errors import UserError

SYSTEM = {"role": "system", "content": "Answer briefly."}
ONE_TURN = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}]
MULTI_TURN = ONE_TURN + [
    {"role": "user", "content": "As JSON, please."},
    {"role": "assistant", "content": '{"answer": 4}'},
    {"role": "user", "content": "And the capital of France?"},
    {"role": "assistant", "content": "Paris."},
]
CONVERSATIONS = {"one turn": ONE_TURN, "multi-turn": MULTI_TURN, "system + multi-turn": [SYSTEM] + MULTI_TURN}
ANSWERS = {"one turn": ["4"], "multi-turn": ["4", '{"answer": 4}', "Paris."]}
ANSWERS["system + multi-turn"] = ANSWERS["multi-turn"]

# meta-llama/Meta-Llama-3-8B-Instruct's template.
LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim "
    "+ '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
# HuggingFaceH4/zephyr-7b-beta's template (its newlines matter: transformers renders with trim_blocks).
ZEPHYR = (
    "{% for message in messages %}\n{% if message['role'] == 'user' %}\n{{ '<|user|>\n' + message['content'] + "
    "eos_token }}\n{% elif message['role'] == 'system' %}\n{{ '<|system|>\n' + message['content'] + eos_token }}\n"
    "{% elif message['role'] == 'assistant' %}\n{{ '<|assistant|>\n'  + message['content'] + eos_token }}\n"
    "{% endif %}\n{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}\n{% endfor %}"
)
# google/gemma-2-2b-it's template: the assistant is "model", and a system turn is refused.
GEMMA = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    "{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
)
# template -> (special tokens it needs, bos, end-of-turn token)
TEMPLATES = {
    "llama3": (LLAMA3, ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
               "<|begin_of_text|>", "<|eot_id|>"),
    "zephyr": (ZEPHYR, ["<s>", "</s>", "<|user|>", "<|assistant|>", "<|system|>"], "<s>", "</s>"),
    "gemma": (GEMMA, ["<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>"], "<bos>", "<end_of_turn>"),
}


def template_tokenizer(name: str):
    template, specials, bos, end = TEMPLATES[name]
    tok = build_tiny_tokenizer(chat_template=template)
    tok.add_special_tokens({"bos_token": bos, "eos_token": end,
                            "additional_special_tokens": specials})
    return tok, end


def labelled_runs(tokenizer, ids: list[int], labels: list[int]) -> list[list[int]]:
    runs, current = [], []
    for token, label in zip(ids, labels):
        if label != IGNORE:
            assert label == token
            current.append(token)
        elif current:
            runs, current = runs + [current], []
    return runs + ([current] if current else [])


def check_golden(tokenizer, messages, answers: list[str], end: str) -> None:
    ids, labels = encode_conversation(messages, tokenizer)
    runs = labelled_runs(tokenizer, ids, labels)
    decoded = [tokenizer.decode(run, skip_special_tokens=False, clean_up_tokenization_spaces=False) for run in runs]
    assert decoded == [answer + end for answer in answers]
    end_id = tokenizer.convert_tokens_to_ids(end)
    assert all(run[-1] == end_id for run in runs)  # the end-of-turn is one token, trained on: the model learns to stop
    text = tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    assert text == render(tokenizer, messages)  # every token of the rendering is there, once


@pytest.mark.parametrize("name", ["llama3", "zephyr"])
@pytest.mark.parametrize("conversation", list(CONVERSATIONS))
def test_golden_masks_llama3_and_zephyr(name, conversation):
    tokenizer, end = template_tokenizer(name)
    check_golden(tokenizer, CONVERSATIONS[conversation], ANSWERS[conversation], end)


@pytest.mark.parametrize("conversation", ["one turn", "multi-turn"])
def test_golden_masks_gemma(conversation):
    tokenizer, end = template_tokenizer("gemma")
    check_golden(tokenizer, CONVERSATIONS[conversation], ANSWERS[conversation], end)


def test_gemma_refuses_a_system_turn_as_a_user_error():
    tokenizer, _ = template_tokenizer("gemma")
    with pytest.raises(UserError, match="System role not supported"):
        encode_conversation(CONVERSATIONS["system + multi-turn"], tokenizer)


@pytest.mark.integration
@pytest.mark.parametrize("conversation", list(CONVERSATIONS))
def test_golden_masks_default_model(conversation):
    """SmolLM2-135M-Instruct's own ChatML template and tokenizer (only the tokenizer is loaded)."""
    from transformers import AutoTokenizer

    from tunesmith.config import ModelConfig
    from tunesmith.models.loading import resolve_model_folder

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_folder(ModelConfig()))
    check_golden(tokenizer, CONVERSATIONS[conversation], ANSWERS[conversation], "<|im_end|>")
    if conversation != "system + multi-turn":  # the template adds its default system turn, never trained on
        text = render(tokenizer, CONVERSATIONS[conversation])
        assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")


def test_unfindable_turn_boundaries_are_one_user_error(tmp_path, caplog):
    """A template that rewrites earlier turns stops data preparation once, naming the file and row,
    instead of warning (or silently mis-masking) row after row."""
    from tunesmith.data.dataset import prepare_datasets

    rewriting = "{{ messages | length }} messages\n" + build_tiny_tokenizer().chat_template
    tokenizer = build_tiny_tokenizer(chat_template=rewriting)
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps({"messages": MULTI_TURN}) + "\n" for _ in range(5)), encoding="utf-8")
    with caplog.at_level(logging.WARNING), pytest.raises(UserError) as e:
        prepare_datasets(DataConfig(train=str(path), val_split=0.0), tokenizer, seed=0)
    message = str(e.value)
    assert "turn boundaries cannot be found" in message and "train.jsonl" in message and "line 1" in message
    assert "data.train_on_prompt=true" in message  # the way out
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
