"""Full fine-tuning and freeze: what trains, the block finder, artifacts (a plain transformers folder for full)."""

from __future__ import annotations

import pytest
import torch
from conftest import build_tiny_model, ids, logits
from torch import nn

from tunesmith.config import MethodConfig
from tunesmith.errors import UserError
from tunesmith.methods.freeze import find_blocks
from tunesmith.methods.registry import get_method, load_artifact


def perturb_trainable(model) -> None:
    torch.manual_seed(5)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)


def test_full_trains_everything_and_saves_a_transformers_folder(tmp_path):
    from transformers import AutoModelForCausalLM

    model = build_tiny_model()
    for p in model.parameters():
        p.requires_grad_(False)  # whatever came before, full unfreezes all
    method = get_method("full")
    method.apply(model, MethodConfig(name="full"))
    assert all(p.requires_grad for p in model.parameters())
    perturb_trainable(model)
    tuned = logits(model)
    method.save(model, tmp_path, MethodConfig(name="full"), "tiny")
    assert (tmp_path / "config.json").is_file() and (tmp_path / "model.safetensors").is_file()
    assert (logits(AutoModelForCausalLM.from_pretrained(tmp_path)) - tuned).abs().max() == 0
    fresh = build_tiny_model()
    assert load_artifact(fresh, tmp_path).name == "full"
    assert (logits(fresh) - tuned).abs().max() == 0


def test_full_artifact_is_a_complete_transformers_folder(tmp_path, tiny_tokenizer):
    """Loaded as `tunesmith train` loads it, the tuned model's folder also holds the tokenizer it trained with."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunesmith.config import ModelConfig
    from tunesmith.models.loading import load_model_and_tokenizer

    build_tiny_model().save_pretrained(tmp_path / "base")
    tiny_tokenizer.save_pretrained(tmp_path / "base")
    model, tokenizer = load_model_and_tokenizer(ModelConfig(name_or_path=str(tmp_path / "base")))
    method = get_method("full")
    method.apply(model, MethodConfig(name="full"))
    perturb_trainable(model)
    tuned = logits(model)
    method.save(model, tmp_path / "out", MethodConfig(name="full"), str(tmp_path / "base"))
    assert (logits(AutoModelForCausalLM.from_pretrained(tmp_path / "out")) - tuned).abs().max() == 0
    saved = AutoTokenizer.from_pretrained(tmp_path / "out")
    text = '{"name": "Ada"} <|im_end|>'
    assert saved(text).input_ids == tokenizer(text).input_ids and saved.pad_token_id == tokenizer.pad_token_id
    messages = [{"role": "user", "content": "hi"}]
    chat = lambda tok: tok.apply_chat_template(messages, tokenize=False)
    assert chat(saved) == chat(tokenizer)
    # and tunesmith's own loader takes the folder as a model
    reloaded, _ = load_model_and_tokenizer(ModelConfig(name_or_path=str(tmp_path / "out")))
    assert (logits(reloaded) - tuned).abs().max() == 0


def test_full_load_refuses_another_shape(tmp_path):
    model = build_tiny_model()
    get_method("full").save(model, tmp_path, MethodConfig(name="full"), "tiny")
    with pytest.raises(UserError, match="shape|unexpected|missing"):
        load_artifact(build_tiny_model(layers=3), tmp_path)


def test_find_blocks_is_the_largest_module_list():
    model = build_tiny_model(layers=3)
    name, blocks = find_blocks(model)
    assert name == "model.layers" and blocks is model.model.layers
    nested = nn.Module()
    nested.small, nested.big = nn.ModuleList([nn.Linear(2, 2)] * 2), nn.ModuleList([nn.Linear(2, 2) for _ in range(4)])
    assert find_blocks(nested)[0] == "big"


def test_freeze_trains_last_blocks_and_named_modules():
    model = build_tiny_model(layers=3)
    names = get_method("freeze").apply(model, MethodConfig(name="freeze", trainable_blocks=1,
                                                           trainable_modules=["norm"]))
    assert names == ["model.layers.2", "model.norm"]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in model.named_parameters() if n.startswith(("model.layers.2.", "model.norm."))}
    model.train()
    model(ids()).logits.sum().backward()
    assert model.model.layers[0].mlp.up_proj.weight.grad is None
    assert model.model.layers[2].mlp.up_proj.weight.grad.abs().sum() > 0


def test_freeze_tied_head_trains_embeddings():
    model = build_tiny_model()
    get_method("freeze").apply(model, MethodConfig(name="freeze", trainable_blocks=0, trainable_modules=["lm_head"]))
    assert model.model.embed_tokens.weight.requires_grad  # tied to lm_head


@pytest.mark.parametrize("kw,match", [({"trainable_blocks": 5}, "only 2 blocks"),
                                      ({"trainable_modules": ["nope"]}, "nope"),
                                      ({"trainable_blocks": 0}, "trains nothing")])
def test_freeze_errors(kw, match):
    with pytest.raises(UserError, match=match):
        get_method("freeze").apply(build_tiny_model(), MethodConfig(name="freeze", **kw))


def test_freeze_round_trip_saves_only_trained_tensors(tmp_path):
    from safetensors.torch import load_file

    cfg = MethodConfig(name="freeze", trainable_blocks=1, trainable_modules=["norm"])
    model = build_tiny_model()
    method = get_method("freeze")
    method.apply(model, cfg)
    perturb_trainable(model)
    tuned = logits(model)
    method.save(model, tmp_path, cfg, "tiny")
    saved = load_file(tmp_path / "weights.safetensors")
    assert set(saved) == {n for n, p in model.named_parameters() if p.requires_grad}
    fresh = build_tiny_model()
    assert load_artifact(fresh, tmp_path).trainable_blocks == 1
    assert (logits(fresh) - tuned).abs().max() == 0
