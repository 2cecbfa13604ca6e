"""Shared fixtures: a tiny Llama-architecture model and a tokenizer built on the spot.

Unit tests never touch the real model; they run on these in milliseconds. Tests marked
`integration` use the real default model.
"""

from __future__ import annotations

import contextlib
import os
import tempfile

import pytest
import torch

# Tests never reach for a model hub (peft and transformers otherwise try, and wait on DNS).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Tokenised data (data.cache) goes to a folder of this session, not the user's cache; CLI runs the
# tests start inherit it.
_DATA_CACHE = tempfile.TemporaryDirectory(prefix="tunesmith-test-data-cache-")
os.environ["TUNESMITH_DATA_CACHE"] = _DATA_CACHE.name

# A ChatML template like SmolLM2's, with a default system prompt when the first message is not one.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a tiny test model.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def build_tiny_tokenizer(chat_template: str = CHATML_TEMPLATE):
    """A byte-level BPE tokenizer trained in a few ms on a small corpus: every string encodes."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    corpus = [
        "The quick brown fox jumps over the lazy dog.",
        '{"name": "Ada", "age": 36, "city": "London"}',
        "system user assistant: What is the capital of France? Paris.",
        "0123456789 ,.:;!?{}[]\"' hello world",
    ] * 4
    trainer = trainers.BpeTrainer(
        vocab_size=320, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    core.train_from_iterator(corpus, trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        unk_token="<|endoftext|>",
    )
    tok.chat_template = chat_template
    return tok


def build_tiny_model(vocab_size: int = 320, seed: int = 0, layers: int = 2, tie: bool = True):
    """A 2-layer Llama with hidden size 32: the same module names as SmolLM2, a few thousand times smaller."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=tie,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    model = LlamaForCausalLM(config)
    model.eval()
    return model


def lora_model():
    """The tiny model with LoRA r 4 (alpha 8, no dropout) on its default targets, initialised from seed 0; B = 0,
    so it computes the base model until trained. Returns (model, the lora method)."""
    from tunesmith.config import MethodConfig
    from tunesmith.methods.registry import get_method

    model = build_tiny_model()
    method = get_method("lora")
    torch.manual_seed(0)
    method.apply(model, MethodConfig(r=4, alpha=8, dropout=0.0))
    return model, method


def tiny_run_files(root, n_train: int, n_validation: int, n_test: int):
    """For tests that run the CLI: the tiny model and tokenizer saved in root/tiny-model, and demo data
    (seed 1) in root/data. Returns (model folder, {split: path})."""
    from tunesmith.data.demo import write_demo

    model_dir = root / "tiny-model"
    build_tiny_model().save_pretrained(model_dir)
    build_tiny_tokenizer().save_pretrained(model_dir)
    return model_dir, write_demo(root / "data", seed=1, n_train=n_train, n_validation=n_validation, n_test=n_test)


def ids() -> torch.Tensor:
    """A fixed (2, 9) batch of token ids for comparing a tiny model's logits."""
    return torch.randint(0, 320, (2, 9), generator=torch.Generator().manual_seed(1))


def logits(model) -> torch.Tensor:
    """The tiny model's eval-mode logits on `ids()`."""
    model.eval()
    with torch.no_grad():
        return model(ids()).logits


@pytest.fixture
def tiny_tokenizer():
    return build_tiny_tokenizer()


@pytest.fixture
def tiny_model():
    return build_tiny_model()


@contextlib.contextmanager
def killed_after(monkeypatch, step: int | None):
    """Inside: the test fault hook stops training right after `step` (None: never) by raising
    KeyboardInterrupt, as a kill would, without killing the test process. Unarmed again on the way out."""
    from tunesmith.train import faults

    def kill():
        raise KeyboardInterrupt

    if step:
        monkeypatch.setattr(faults, "ARMED", faults.Faults(kill_at_step=step))
        monkeypatch.setattr(faults, "kill", kill)
    try:
        yield
    finally:
        monkeypatch.setattr(faults, "ARMED", faults.Faults())


def assert_resumes_bit_exact(run, tmp_path, monkeypatch) -> list[dict]:
    """`run(run_dir, monkeypatch, resume=False, kill_after=None)` trains and returns its checkpoint tensors. Runs
    it whole, and again killed after step 2 (killed_after) then resumed in the same folder; asserts both end
    bit-exact. Returns the whole run's metrics.jsonl records."""
    import json

    whole = run(tmp_path / "a", monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "b", monkeypatch, kill_after=2)
    resumed = run(tmp_path / "b", monkeypatch, resume=True)
    assert whole.keys() == resumed.keys() and whole
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)
    return [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]


ENCODER_WORDS = ("the a of to in is what how why where which who does do can river bank money loan interest water "
                 "fish boat bridge city north south old new red blue green tree forest mountain snow rain sun").split()


def build_tiny_encoder(folder, pooling="mean", normalize: bool = True, max_seq_length: int | None = 24,
                       seed: int = 0, sentence_transformers: bool = True):
    """A 2-layer BERT (hidden size 32) with a WordPiece tokenizer over ENCODER_WORDS, saved in `folder` as a
    sentence-transformers folder (modules.json, 1_Pooling with `pooling`, Normalize if asked), or as a plain
    transformers folder. Returns the folder."""
    import json
    from pathlib import Path

    from transformers import BertConfig, BertModel, BertTokenizerFast

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *ENCODER_WORDS, *"abcdefghijklmnopqrstuvwxyz?.,",
             *(f"##{c}" for c in "abcdefghijklmnopqrstuvwxyz")]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    BertTokenizerFast(vocab_file=str(folder / "vocab.txt"), do_lower_case=True).save_pretrained(folder)
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=64, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)
    BertModel(config).save_pretrained(folder)
    if not sentence_transformers:
        return folder
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    if normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
    (folder / "modules.json").write_text(json.dumps(modules), encoding="utf-8")
    (folder / "1_Pooling").mkdir(exist_ok=True)
    modes = (pooling,) if isinstance(pooling, str) else tuple(pooling)
    (folder / "1_Pooling" / "config.json").write_text(json.dumps(
        {"word_embedding_dimension": 32, **{f"pooling_mode_{m}_tokens" if m in ("mean", "max") else
                                             {"cls": "pooling_mode_cls_token", "lasttoken": "pooling_mode_lasttoken",
                                              "mean_sqrt_len_tokens": "pooling_mode_mean_sqrt_len_tokens"}[m]: True
                                             for m in modes}}), encoding="utf-8")
    if max_seq_length:
        (folder / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": max_seq_length,
                                                                      "do_lower_case": False}), encoding="utf-8")
    return folder
