"""QLoRA: LoRA over a bitsandbytes 4-bit (or 8-bit) base; the quantize and merge commands; 8-bit optimizers.

The tiny model here has hidden size 64 (conftest's 32 is smaller than bitsandbytes' 4-bit block of 64).
"""

from __future__ import annotations

import json
import logging
import sys

import pytest
import torch
from conftest import build_tiny_tokenizer
from torch import nn

from tunesmith.config import MethodConfig, ModelConfig, TrainConfig, load_config
from tunesmith.errors import UserError
from tunesmith.methods.inject import adapter_modules, apply_lora, count_parameters, merge_and_unload
from tunesmith.methods.io import save_adapter

bnb = pytest.importorskip("bitsandbytes")
from tunesmith.models.quantize import dequantize_model, quantize_model  # noqa: E402

VOCAB = 320


def build_model(seed: int = 0):
    """A 2-layer Llama, hidden 64, intermediate 128: every block linear holds whole 64-value blocks."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    return LlamaForCausalLM(config).eval()


def ids() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 11), generator=torch.Generator().manual_seed(1))


def logits(model) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(ids()).logits


def randomise_b(model, std: float = 0.2) -> None:
    """B != 0, so the adapter changes the output."""
    torch.manual_seed(7)
    with torch.no_grad():
        for _, a in adapter_modules(model):
            a.lora_B.weight.normal_(std=std)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("qlora") / "tiny-64"
    build_model().save_pretrained(folder)
    build_tiny_tokenizer().save_pretrained(folder)
    return folder


def qlora(quantization: str = "nf4", cfg: MethodConfig | None = None):
    model = build_model()
    quantize_model(model, quantization)
    apply_lora(model, cfg or MethodConfig(r=4, alpha=8, dropout=0.0))
    randomise_b(model)
    return model


@pytest.mark.parametrize("quantization, cls", [("nf4", "Linear4bit"), ("fp4", "Linear4bit"), ("int8", "Linear8bitLt")])
def test_only_block_linears_are_quantized(quantization, cls):
    model = build_model()
    reference = logits(model)
    names = quantize_model(model, quantization)
    assert len(names) == 2 * 7 and all(".layers." in n for n in names)
    modules = dict(model.named_modules())
    assert all(type(modules[n]).__name__ == cls for n in names)
    assert type(model.lm_head) is nn.Linear and model.lm_head.weight is model.model.embed_tokens.weight
    assert model.model.embed_tokens.weight.dtype == torch.float32
    assert count_parameters(model)[1] == count_parameters(build_model())[1]  # packed weights counted by (out, in)
    error = (logits(model) - reference).abs().max()
    assert 0 < error < 0.5  # quantization changes the output, a little


def test_lora_over_nf4_trains_only_the_adapter_and_survives_eval():
    model = qlora()
    packed = {n: m.weight.data.clone() for n, m in adapter_modules(model)}
    a = model.model.layers[0].self_attn.q_proj
    assert a.quantized_base is not None and a.lora_A.weight.dtype == torch.float32
    assert "q_proj.base_layer" not in str(list(model.state_dict())) and "quantized_base" not in str(model)
    logits(model)  # an eval forward first: bitsandbytes must not repack the weight for bf16 inference
    model.train()
    assert a.quantized_base.training
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    before = logits(model)
    for _ in range(2):
        model.train()
        model(ids(), labels=ids()).loss.backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        assert len(grads) == 2 * 14 and all(g is not None and g.abs().sum() > 0 for g in grads.values())
        optimizer.step()
        optimizer.zero_grad()
    assert (logits(model) - before).abs().max() > 1e-4
    assert all(torch.equal(m.weight.data, packed[n]) for n, m in adapter_modules(model))  # base untouched


def test_lora_over_int8_runs_forward_and_backward():
    model = qlora("int8")
    model.train()
    model(ids(), labels=ids()).loss.backward()
    assert all(a.lora_A.weight.grad.abs().sum() > 0 for _, a in adapter_modules(model))


def test_merge_refuses_quantized_base_and_merges_into_dequantized():
    model = qlora()
    adapted = logits(model)
    with pytest.raises(UserError, match="quantized weight in place"):
        merge_and_unload(model)
    assert dequantize_model(model) == 14
    assert (logits(model) - adapted).abs().max() == 0  # same weights, now float: same numbers
    merge_and_unload(model)
    assert all(type(m) is nn.Linear for n, m in model.named_modules() if n.endswith("_proj"))
    assert (logits(model) - adapted).abs().max() < 1e-5


@pytest.mark.parametrize("name", ["lora_fa", "adapter"])
def test_other_methods_that_train_over_a_quantized_base(name):
    from tunesmith.methods.registry import get_method

    cfg = load_config(None, ["model.quantization=nf4", f"method.name={name}"]).method
    model = build_model()
    quantize_model(model, "nf4")
    get_method(name).apply(model, cfg)
    model.train()
    model(ids(), labels=ids()).loss.backward()
    trained = [p for p in model.parameters() if p.requires_grad]
    assert trained and all(p.dtype == torch.float32 for p in trained)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in trained)


def test_quantization_without_bitsandbytes_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    with pytest.raises(UserError, match=r"tunesmith\[qlora\]"):
        quantize_model(build_model(), "nf4")


def test_methods_that_cannot_use_a_quantized_base_are_refused():
    for name in ("dora", "delta_lora", "vera", "full", "freeze", "peft"):
        with pytest.raises(UserError, match="cannot train on a quantized base"):
            load_config(None, ["model.quantization=nf4", f"method.name={name}", "method.peft_config={peft_type: LORA}"])


# --- interoperability: transformers' bitsandbytes loading and peft -----------------------------


def transformers_quantized(folder, quantization: str):
    """The same base as transformers + bitsandbytes load it (what a peft QLoRA user does)."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from tunesmith.models.quantize import no_cpu_repacking

    if quantization == "int8":
        config = BitsAndBytesConfig(load_in_8bit=True)
    else:
        config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quantization,
                                    bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(folder, quantization_config=config, dtype=torch.float32)
    no_cpu_repacking(model)  # else eval forwards run in bf16 on AVX512-BF16 CPUs (quantize.py's docstring)
    return model.eval()


@pytest.mark.parametrize("quantization", ["nf4", "int8"])
def test_our_quantization_is_bitwise_transformers(base_dir, quantization):
    pytest.importorskip("accelerate")  # transformers' bitsandbytes path needs it
    from transformers import AutoModelForCausalLM

    ours = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    quantize_model(ours, quantization)
    theirs = transformers_quantized(base_dir, quantization)
    ours_state, theirs_state = ours.state_dict(), theirs.state_dict()
    assert ours_state.keys() == theirs_state.keys()
    for key, value in ours_state.items():
        assert torch.equal(value, theirs_state[key]), key
    assert torch.equal(logits(ours), logits(theirs))


def test_qlora_adapter_loads_in_peft_over_bitsandbytes(tmp_path, base_dir):
    """Our adapter, trained over our NF4 base, in peft over transformers' NF4 base: same logits (<= 1e-6)."""
    pytest.importorskip("accelerate")
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    ours = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    quantize_model(ours, "nf4")
    cfg = MethodConfig(r=4, alpha=8, dropout=0.1)
    apply_lora(ours, cfg)
    randomise_b(ours)
    save_adapter(ours, tmp_path, cfg, str(base_dir))
    theirs = peft.PeftModel.from_pretrained(transformers_quantized(base_dir, "nf4"), tmp_path)
    assert any(type(m).__module__.startswith("peft.tuners.lora.bnb") for m in theirs.modules())
    expected = logits(ours)
    assert (expected - logits(AutoModelForCausalLM.from_pretrained(base_dir))).abs().max() > 1e-2
    assert (logits(theirs) - expected).abs().max() <= 1e-6  # measured: 0 (same kernels, same order)


def run_cli(*args):
    """The real CLI entry point, in this process (a subprocess would spend seconds importing torch)."""
    from tunesmith.cli import main

    assert main(list(args)) == 0


@pytest.mark.parametrize("bits", [4, 8])
def test_quantize_command_writes_a_checkpoint_transformers_loads(tmp_path, base_dir, bits):
    pytest.importorskip("accelerate")
    from transformers import AutoModelForCausalLM

    run_cli("quantize", "--model", str(base_dir), "--out", str(tmp_path / "q"), "--bits", str(bits))
    config = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert config["load_in_4bit" if bits == 4 else "load_in_8bit"] and config["quant_method"] == "bitsandbytes"
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    layer = loaded.model.layers[0].mlp.down_proj
    assert type(layer).__name__ == ("Linear4bit" if bits == 4 else "Linear8bitLt")
    ours = build_model()
    quantize_model(ours, "nf4" if bits == 4 else "int8")
    from tunesmith.models.quantize import no_cpu_repacking

    no_cpu_repacking(loaded)
    assert torch.equal(logits(loaded), logits(ours))
    # and tunesmith trains on it: the loader keeps the checkpoint's quantization
    from tunesmith.models.loading import load_model_and_tokenizer

    model, _ = load_model_and_tokenizer(ModelConfig(name_or_path=str(tmp_path / "q")))
    apply_lora(model, MethodConfig(r=4, alpha=8))
    assert model.model.layers[0].mlp.down_proj.quantized_base is not None


def test_merge_command_folds_qlora_into_the_dequantized_base(tmp_path, base_dir):
    from transformers import AutoModelForCausalLM

    from tunesmith.models.loading import load_model_and_tokenizer

    model, _ = load_model_and_tokenizer(ModelConfig(name_or_path=str(base_dir), quantization="nf4"))
    cfg = MethodConfig(r=4, alpha=8)
    apply_lora(model, cfg)
    randomise_b(model)
    run_dir = tmp_path / "run"
    save_adapter(model, run_dir / "adapter", cfg, str(base_dir))
    (run_dir / "config.yaml").write_text("model:\n  quantization: nf4\n  double_quant: true\n")
    adapted = logits(model)
    run_cli("merge", "--adapter", str(run_dir / "adapter"), "--out", str(tmp_path / "merged"))
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert "quantization_config" not in json.loads((tmp_path / "merged" / "config.json").read_text())
    assert type(merged.model.layers[1].self_attn.o_proj) is nn.Linear
    assert (logits(merged) - adapted).abs().max() < 1e-4
    # merging into the float base instead leaves the quantization error in
    run_cli("merge", "--adapter", str(run_dir / "adapter"), "--out", str(tmp_path / "float"), "--quantization", "none")
    assert (logits(AutoModelForCausalLM.from_pretrained(tmp_path / "float")) - adapted).abs().max() > 1e-3


# --- 8-bit optimizers -------------------------------------------------------------------------


@pytest.mark.parametrize("name, cls", [("adamw_8bit", "AdamW8bit"), ("paged_adamw_8bit", "PagedAdamW8bit")])
def test_bitsandbytes_optimizers_keep_lr_scale_groups(name, cls):
    from tunesmith.train.optim import build_optimizer, set_lr

    big, small = nn.Parameter(torch.randn(64, 128)), nn.Parameter(torch.randn(8))
    optimizer = build_optimizer([{"params": [big]}, {"params": [small], "lr_scale": 16.0}],
                                TrainConfig(optimizer=name, lr=1e-3))
    assert type(optimizer).__name__ == cls
    set_lr(optimizer, 2e-3)
    assert [g["lr"] for g in optimizer.param_groups] == [2e-3, 3.2e-2]
    before = big.detach().clone()
    (big.sum() + small.sum()).backward()
    optimizer.step()
    assert not torch.equal(big, before)
    assert optimizer.state[big]["state1"].dtype == torch.uint8  # 8-bit moments


@pytest.mark.parametrize("failure", ["not installed", "no kernel for the device"])
def test_optimizer_falls_back_to_torch_adamw_with_a_message(monkeypatch, caplog, failure):
    from tunesmith.train import optim

    if failure == "not installed":
        monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import fails
    else:
        def no_kernel(self, closure=None):
            raise NotImplementedError("no kernel for this device")

        monkeypatch.setattr(bnb.optim.AdamW8bit, "step", no_kernel)
    with caplog.at_level(logging.WARNING, logger="tunesmith.train.optim"):
        optimizer = optim.build_optimizer([nn.Parameter(torch.randn(4))], TrainConfig(optimizer="adamw_8bit"))
    assert type(optimizer) is torch.optim.AdamW
    assert "using torch AdamW instead" in caplog.text


def test_qlora_with_8bit_adamw_trains_and_resumes_exactly(tmp_path, base_dir):
    """The real `tunesmith train`: NF4 base, adamw_8bit; resuming from step 2 ends where the straight run did."""
    import shutil

    from safetensors.torch import load_file

    from tunesmith.data.demo import write_demo

    paths = write_demo(tmp_path / "data", seed=1, n_train=24, n_validation=4, n_test=2)
    args = [f"model.name_or_path={base_dir}", "model.quantization=nf4", "train.optimizer=adamw_8bit",
            f"data.train={paths['train']}", f"data.validation={paths['validation']}", "data.max_seq_len=128",
            "method.r=4", "method.alpha=8", "train.max_steps=4", "train.batch_size=4", "train.lr=1e-2",
            "train.save_every=2", "train.seed=3"]
    config = tmp_path / "c.yaml"
    config.write_text("{}\n")
    run_cli("train", str(config), *args, f"output.dir={tmp_path / 'a'}")
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    shutil.rmtree(tmp_path / "b" / "checkpoints" / "step-4")
    run_cli("train", str(config), *args, f"output.dir={tmp_path / 'b'}", "train.resume=true")
    summary = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert summary["total"] > summary["trainable"] > 0
    a, b = (load_file(tmp_path / run / "adapter" / "adapter_model.safetensors") for run in "ab")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(a[k].abs().sum() > 0 for k in a if "lora_B" in k)
