"""`tunesmith export`: GGUF files that transformers' GGUF loader reads back to the same model, GGUF LoRA
files whose update equals the merged weights, and the Ollama Modelfile's template."""

from __future__ import annotations

import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import build_tiny_model, build_tiny_tokenizer, logits
from test_methods_merge import base_dir, trained_artifact  # noqa: F401 (base_dir: a fixture)

from tunesmith.commands.export import ExportConfig, export
from tunesmith.errors import UserError
from tunesmith.export.gguf import export_gguf, rotary_interleave
from tunesmith.export.ollama import modelfile_text

ROOT = Path(__file__).parent.parent


def read_back(path: Path):
    """(model, tokenizer) from the GGUF by transformers' own loader (dequantizing, undoing the rotary order)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    return model.eval(), AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


def gguf_tensors(path: Path) -> dict[str, np.ndarray]:
    from gguf import GGUFReader, dequantize

    return {t.name: dequantize(t.data, t.tensor_type).reshape([int(d) for d in reversed(t.shape)])
            for t in GGUFReader(path).tensors}


def test_rotary_interleave_pairs_each_half_of_a_head():
    w = np.arange(8)[:, None] * np.ones((1, 3))  # 2 heads of 4 rows: row i holds i
    assert rotary_interleave(w, 2)[:, 0].tolist() == [0, 2, 1, 3, 4, 6, 5, 7]


@pytest.mark.parametrize("tie", [True, False])
def test_f32_export_reads_back_as_the_same_model_and_tokenizer(tmp_path, tie):
    model, tokenizer = build_tiny_model(tie=tie), build_tiny_tokenizer()
    out = export_gguf(model, tokenizer, tmp_path / "m.gguf", "f32")
    back, back_tok = read_back(out)
    assert torch.equal(logits(back), logits(model))
    assert back.config.tie_word_embeddings == tie
    text = 'The quick {"age": 36} 0123 <|im_end|>'
    assert back_tok(text).input_ids == tokenizer(text).input_ids
    assert back_tok.chat_template == tokenizer.chat_template
    assert (back_tok.bos_token_id, back_tok.eos_token_id) == (tokenizer.bos_token_id, tokenizer.eos_token_id)
    assert not (tmp_path / "m.gguf.partial").exists()


# Relative RMS error of the weights read back, per type: f16 keeps 11 significant bits; q8_0 rounds
# to 1/127 of a block's largest |w|; q4_0 to 1/8 of it, q4_1 to 1/15 of its range (RMS of a uniform rounding
# error: step / sqrt(12)).
BOUNDS = {"f16": 1e-3, "q8_0": 0.02, "q4_1": 0.2, "q4_0": 0.2}


@pytest.mark.parametrize("kind", sorted(BOUNDS))
def test_each_type_reads_back_within_its_rounding(tmp_path, kind):
    model = build_tiny_model()
    out = export_gguf(model, build_tiny_tokenizer(), tmp_path / "m.gguf", kind)
    back = read_back(out)[0].state_dict()
    errors = {}
    for name, w in model.state_dict().items():
        if w.ndim == 2 and name != "lm_head.weight":
            errors[name] = float((back[name] - w).norm() / w.norm())
    assert max(errors.values()) < BOUNDS[kind], errors
    assert min(errors.values()) > 0  # the weights were rounded, not kept
    norm = "model.layers.0.input_layernorm.weight"
    assert torch.equal(back[norm], model.state_dict()[norm])  # 1-D tensors stay f32


@pytest.mark.parametrize("rslora", [False, True])
def test_a_gguf_lora_file_adds_what_the_merge_adds(tmp_path, base_dir, rslora):
    """base.gguf + (alpha / r) B A from the LoRA file == the merged model's GGUF, tensor by tensor (f32)."""
    import json

    trained_artifact("lora", base_dir, tmp_path / "adapter")
    if rslora:  # the same tensors scaled by alpha / sqrt(r)
        cfg_path = tmp_path / "adapter" / "adapter_config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg_path.write_text(json.dumps({**cfg, "use_rslora": True}))
    export(ExportConfig(model=str(base_dir), out=str(tmp_path / "base.gguf"), type="f32"))
    export(ExportConfig(adapter=str(tmp_path / "adapter"), out=str(tmp_path / "merged.gguf"), type="f32"))
    export(ExportConfig(adapter=str(tmp_path / "adapter"), format="gguf-lora", out=str(tmp_path / "lora.gguf"),
                        type="f32"))
    from gguf import GGUFReader

    fields = GGUFReader(tmp_path / "lora.gguf").fields
    alpha = float(fields["adapter.lora.alpha"].contents())
    assert fields["adapter.type"].contents() == "lora" and fields["general.type"].contents() == "adapter"
    base, merged, lora = (gguf_tensors(tmp_path / n) for n in ("base.gguf", "merged.gguf", "lora.gguf"))
    adapted = [n.removesuffix(".lora_a") for n in lora if n.endswith(".lora_a")]
    assert len(adapted) == 2 * 7  # every linear layer of both blocks
    for name in adapted:
        a, b = lora[name + ".lora_a"], lora[name + ".lora_b"]
        scale = alpha / a.shape[0]
        np.testing.assert_allclose(base[name] + scale * b @ a, merged[name], atol=1e-6)
        assert np.abs(merged[name] - base[name]).max() > 1e-4
    assert alpha == (8 * math.sqrt(4) if rslora else 8)


def test_a_dora_adapter_has_no_gguf_lora_form(tmp_path, base_dir):
    trained_artifact("dora", base_dir, tmp_path / "adapter")
    with pytest.raises(UserError, match="DoRA adapters have no GGUF LoRA form"):
        export(ExportConfig(adapter=str(tmp_path / "adapter"), format="gguf-lora", out=str(tmp_path / "x.gguf")))


def test_export_refuses_another_architecture(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    with pytest.raises(UserError, match="Llama-family"):
        export_gguf(GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2)), build_tiny_tokenizer(),
                    tmp_path / "x.gguf")
    assert not list(tmp_path.iterdir())


def render_go_template(template: str, messages: list[dict]) -> str:
    """The Go template constructs the Modelfile uses ({{- range .Messages }} .Role .Content {{ end }}), by hand."""
    head, body, tail = re.fullmatch(r"(.*?)\{\{- range \.Messages \}\}(.*?)\{\{ end \}\}(.*)", template, re.S).groups()
    turns = [body.replace("{{ .Role }}", m["role"]).replace("{{ .Content }}", m["content"]) for m in messages]
    return head + "".join(turns) + tail


def test_the_modelfile_formats_a_conversation_as_the_chat_template_does():
    tokenizer = build_tiny_tokenizer()
    text = modelfile_text(tokenizer, "m.gguf")
    template = re.search(r'TEMPLATE """(.*?)"""', text, re.S).group(1)
    system = re.search(r'SYSTEM """(.*?)"""', text, re.S).group(1)
    assert system == "You are a tiny test model."  # the template's default system turn
    assert 'PARAMETER stop "<|im_end|>"' in text and "FROM ./m.gguf" in text
    chat = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
            {"role": "user", "content": "Name?"}]
    expected = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    # Ollama puts SYSTEM first in .Messages when the conversation has no system turn
    assert render_go_template(template, [{"role": "system", "content": system}, *chat]) == expected


def test_export_command_writes_a_gguf_and_a_modelfile(tmp_path, base_dir):
    trained_artifact("lora", base_dir, tmp_path / "adapter")
    proc = subprocess.run([sys.executable, "-m", "tunesmith", "export", "--adapter", str(tmp_path / "adapter"),
                           "--type", "q8_0", "--out", str(tmp_path / "out" / "tuned.gguf")], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "out" / "tuned.gguf").stat().st_size > 0
    assert "FROM ./tuned.gguf" in (tmp_path / "out" / "Modelfile").read_text()


def test_export_options_are_checked_before_anything_loads(capsys):
    from tunesmith.cli import main

    assert main(["export", "--model", "m", "--out", "x.bin"]) == 2
    assert "ending in .gguf" in capsys.readouterr().err
    assert main(["export", "--model", "m", "--format", "gguf-lora", "--out", "x.gguf"]) == 2
    assert "give --adapter" in capsys.readouterr().err


@pytest.mark.slow
def test_the_default_model_exports_within_the_stated_bounds(tmp_path):
    """docs/export.md's table (bench/gguf_export.py): f32 reads back bit-identical; f16 and q8_0 move the next-token
    distribution by at most these mean KLs on held-out demo conversations (measured 3.2e-6 and 2.0e-3)."""
    from tunesmith.config import ModelConfig
    from tunesmith.export.fidelity import compare, held_out_texts, log_probs
    from tunesmith.models.loading import load_model_and_tokenizer

    source, tokenizer = load_model_and_tokenizer(ModelConfig())
    texts = held_out_texts(tokenizer, 8)
    reference = log_probs(source, tokenizer, texts)
    for kind, bound in (("f32", 0.0), ("f16", 2e-5), ("q8_0", 5e-3)):
        path = export_gguf(source, tokenizer, tmp_path / f"{kind}.gguf", kind)
        back, back_tokenizer = read_back(path)
        assert back_tokenizer(texts[0]).input_ids == tokenizer(texts[0]).input_ids
        assert compare(reference, log_probs(back, tokenizer, texts))["kl"] <= bound, kind
        path.unlink()


@pytest.mark.slow
def test_llama_cpp_answers_the_f16_export_as_tunesmith_generate_does(tmp_path):
    """llama.cpp itself (llama-cpp-python, `pip install 'tunesmith[llamacpp]'`, built from source) loads the f16
    export of the default model, tokenizes the chat prompts as the tokenizer does, and greedy-decodes the same
    answers as tunesmith's generate on the fp32 model."""
    llama_cpp = pytest.importorskip("llama_cpp")
    from tunesmith.config import ModelConfig
    from tunesmith.data.demo import demo_rows
    from tunesmith.evaluate.generate import generate, render_prompt
    from tunesmith.models.loading import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(ModelConfig())
    path = export_gguf(model, tokenizer, tmp_path / "model.gguf", "f16")
    prompts = [render_prompt(tokenizer, row["messages"][:-1]) for row in demo_rows(4, seed=4343)]
    expected = generate(model, tokenizer, prompts, max_new_tokens=32, batch_size=4)
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=512, n_threads=2, verbose=False)
    for prompt, answer in zip(prompts, expected):
        assert llm.tokenize(prompt.encode(), add_bos=False, special=True) == tokenizer(prompt).input_ids
        out = llm.create_completion(prompt, max_tokens=32, temperature=0.0, top_k=1, stop=["<|im_end|>"])
        assert out["choices"][0]["text"].strip() == answer.strip(), prompt
