"""LoRA on embedding tables (tunesmith/methods/lora_embedding.py): the math, merging, PEFT's format both ways on a
causal LM, and what is refused (a table tied to the output head, LoRA variants other than plain LoRA)."""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import build_tiny_model, logits
from safetensors.torch import load_file
from torch import nn

from tunesmith.config import MethodConfig
from tunesmith.errors import UserError
from tunesmith.methods.dora import DoRALinear
from tunesmith.methods.inject import adapter_modules, apply_lora, find_targets, merge_and_unload
from tunesmith.methods.io import load_adapter, save_adapter
from tunesmith.methods.lora_embedding import LoRAEmbedding

TARGETS = ["embed_tokens", "q_proj", "v_proj"]


def randomize(model) -> None:
    """Non-zero updates: the embedding's A and each linear layer's B start at zero."""
    torch.manual_seed(7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_embedding_A" in name or "lora_B" in name:
                p.normal_(std=0.2)


def test_update_is_the_table_plus_s_times_BA_transposed():
    base = nn.Embedding(10, 6, padding_idx=0)
    table = base.weight.detach().clone()
    layer = LoRAEmbedding(base, r=3, alpha=6)  # s = 2
    x = torch.tensor([[1, 4, 4, 9], [0, 2, 3, 1]])
    assert torch.equal(layer(x), table[x])  # A = 0: the base model
    with torch.no_grad():
        layer.lora_embedding_A.normal_()
    a, b = layer.lora_embedding_A.detach(), layer.lora_embedding_B.detach()
    expected = table[x] + 2.0 * (a.T[x] @ b.T)
    torch.testing.assert_close(layer(x), expected)
    torch.testing.assert_close(layer.delta_weight(), 2.0 * (b @ a).T)

    layer(x).sum().backward()  # the table stays frozen; only the rows of A of tokens in x get gradients
    assert base.weight.grad is None and not layer.weight.requires_grad
    seen = layer.lora_embedding_A.grad.abs().sum(dim=0) > 0
    assert seen.tolist() == [i in (1, 2, 3, 4, 9) for i in range(10)]  # padding_idx 0 gets none, as in nn.Embedding

    layer.merge()
    torch.testing.assert_close(layer(x), expected)
    layer.disabled = True
    torch.testing.assert_close(layer(x), table[x])
    layer.disabled = False
    layer.unmerge()
    torch.testing.assert_close(layer.weight.detach(), table)
    plain = layer.to_embedding()
    assert type(plain) is nn.Embedding and plain.padding_idx == 0 and plain.weight is layer.weight
    torch.testing.assert_close(plain(x), expected)


@pytest.mark.parametrize("rslora", [False, True])
def test_ours_loads_in_peft_back_in_ours_and_merges(tmp_path, rslora):
    peft = pytest.importorskip("peft")
    cfg = MethodConfig(r=4, alpha=8, dropout=0.0, rslora=rslora, target_modules=TARGETS)
    model = build_tiny_model(tie=False)
    apply_lora(model, cfg)
    assert isinstance(model.model.embed_tokens, LoRAEmbedding)
    randomize(model)
    ours = logits(model)
    assert (ours - logits(build_tiny_model(tie=False))).abs().max() > 1e-3
    save_adapter(model, tmp_path, cfg, "tiny")
    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert saved["base_model.model.model.embed_tokens.lora_embedding_A"].shape == (4, 320)
    assert saved["base_model.model.model.embed_tokens.lora_embedding_B"].shape == (32, 4)

    theirs = peft.PeftModel.from_pretrained(build_tiny_model(tie=False), tmp_path)
    assert isinstance(theirs.base_model.model.model.embed_tokens, peft.tuners.lora.Embedding)
    assert (logits(theirs) - ours).abs().max() <= 1e-5

    again = build_tiny_model(tie=False)
    load_adapter(again, tmp_path)
    assert (logits(again) - ours).abs().max() <= 1e-6
    merged = merge_and_unload(again)
    assert type(merged.model.embed_tokens) is nn.Embedding and not list(adapter_modules(merged))
    assert (logits(merged) - ours).abs().max() <= 1e-5


def test_peft_embedding_adapter_loads_in_ours(tmp_path):
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=TARGETS, task_type="CAUSAL_LM")
    theirs = peft.get_peft_model(build_tiny_model(tie=False), config)
    randomize(theirs)
    expected = logits(theirs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft says it saves the embedding table too (save_embedding_layers)
        theirs.save_pretrained(tmp_path)
    assert "base_model.model.model.embed_tokens.base_layer.weight" in load_file(tmp_path / "adapter_model.safetensors")
    model = build_tiny_model(tie=False)
    load_adapter(model, tmp_path)
    assert (logits(model) - expected).abs().max() <= 1e-5


def test_tied_tables_and_lora_variants_are_refused():
    with pytest.raises(UserError, match="tied to 'lm_head.weight'"):
        apply_lora(build_tiny_model(tie=True), MethodConfig(r=4, target_modules=TARGETS))
    with pytest.raises(UserError, match="plain method.name=lora also adapts nn.Embedding"):
        apply_lora(build_tiny_model(tie=False), MethodConfig(name="dora", r=4, target_modules=TARGETS), DoRALinear)
    model = build_tiny_model(tie=False)
    assert "model.embed_tokens" not in find_targets(model, "all-linear", embeddings=True)  # only when named
    assert find_targets(model, ["embed_tokens"], embeddings=True) == ["model.embed_tokens"]


def test_gguf_lora_export_refuses_an_embedding_update(tmp_path):
    """llama.cpp's LoRA files adapt linear layers only: skipping the embedding's update would drop it silently."""
    pytest.importorskip("gguf")
    from tunesmith.export.gguf_lora import export_gguf_lora

    cfg = MethodConfig(r=4, alpha=8, target_modules=TARGETS)
    model = build_tiny_model(tie=False)
    apply_lora(model, cfg)
    save_adapter(model, tmp_path / "adapter", cfg, "tiny")
    with pytest.raises(UserError, match="embedding table model.embed_tokens"):
        export_gguf_lora(tmp_path / "adapter", model.config, tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists()
