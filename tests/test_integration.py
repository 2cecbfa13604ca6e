"""A few tests on the real default model, SmolLM2-135M-Instruct (converted once, then cached)."""

from __future__ import annotations

import pytest
import torch

from tunesmith.config import MethodConfig, ModelConfig, load_config
from tunesmith.evaluate.generate import generate, render_prompt

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def default_model():
    from tunesmith.models.loading import load_model_and_tokenizer

    return load_model_and_tokenizer(ModelConfig())


def test_default_model_loads_and_answers(default_model):
    model, tokenizer = default_model
    assert model.config.num_hidden_layers == 30 and model.config.vocab_size == 49152
    prompt = render_prompt(tokenizer, [{"role": "user", "content": "What is the capital of France?"}])
    assert "Paris" in generate(model, tokenizer, [prompt], max_new_tokens=20)[0]


def test_second_load_is_cached_and_not_converted_again(default_model, monkeypatch):
    """The GGUF file is converted once (the fixture's load did it): a second load reads the cached
    safetensors folder as it is. Checked by what happens, not by a timing a busy machine could miss."""
    from tunesmith.models import loading

    folder = loading.resolve_model_folder(ModelConfig())
    weights = folder / "model.safetensors"
    written = weights.stat().st_mtime_ns

    def no_conversion(*args):
        raise AssertionError("the GGUF file was converted again")

    monkeypatch.setattr(loading, "convert_gguf", no_conversion)
    loading.load_model_and_tokenizer(ModelConfig())
    assert loading.resolve_model_folder(ModelConfig()) == folder
    assert weights.stat().st_mtime_ns == written


@pytest.mark.slow  # ~65 s on 2 cores; peft parity on tiny models is in make test (test_peft_format.py)
def test_real_model_adapter_matches_peft_and_learns(default_model, tmp_path):
    """A few SFT steps on the demo task lower the loss; the saved adapter gives peft's logits."""
    import copy

    from peft import PeftModel

    from tunesmith.data.dataset import prepare_datasets
    from tunesmith.data.demo import write_demo
    from tunesmith.methods.inject import apply_lora
    from tunesmith.methods.io import save_adapter
    from tunesmith.train.loop import train
    from tunesmith.train.validate import validation_loss

    base, tokenizer = default_model
    model = copy.deepcopy(base)
    paths = write_demo(tmp_path / "data", seed=5, n_train=64, n_validation=16, n_test=4)
    cfg = load_config(None, [f"data.train={paths['train']}", f"data.validation={paths['validation']}",
                             "train.max_steps=6", "train.batch_size=8", "train.lr=1e-3", "method.r=8",
                             f"output.dir={tmp_path / 'run'}", "train.save_every=0"])
    data = prepare_datasets(cfg.data, tokenizer, 0)
    torch.manual_seed(0)
    apply_lora(model, cfg.method)
    before = validation_loss(model, data.validation, 8, tokenizer.pad_token_id)
    train(model, data.train, data.validation, cfg, tmp_path / "run", tokenizer.pad_token_id)
    after = validation_loss(model, data.validation, 8, tokenizer.pad_token_id)
    assert after < before * 0.8, (before, after)

    save_adapter(model, tmp_path / "adapter", cfg.method, "smollm2-135m-instruct")
    peft_model = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "adapter").eval()
    ids = torch.tensor([tokenizer("Extract name, age and city as JSON.\nText: Ana, 31, Porto.").input_ids])
    with torch.no_grad():
        ours, theirs = model(ids).logits, peft_model(ids).logits
    assert (ours - theirs).abs().max() <= 1e-4
