"""QLoRA: LoRA (and DoRA, VeRA, ...) over a bitsandbytes 4-bit (or 8-bit) base; peft interoperability; the
quantize, merge, generate, chat and eval commands on a quantized base; 8-bit optimizers.

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
from tunesmith.methods.inject import (adapter_modules, apply_lora, count_parameters, merge_and_unload,
                                      weight_delta_modules)
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


@pytest.mark.parametrize("name, why", [("delta_lora", "rounds away"), ("full", "no gradient"),
                                       ("freeze", "no gradient"), ("peft", "bitsandbytes")])
def test_methods_that_cannot_use_a_quantized_base_are_refused_saying_why(name, why):
    with pytest.raises(UserError, match=f"{name} cannot train on a quantized base.*{why}"):
        load_config(None, ["model.quantization=nf4", f"method.name={name}", "method.peft_config={peft_type: LORA}"])


# --- DoRA and VeRA over a quantized base ------------------------------------------------------

TRAINED = {"dora": ("lora_A.weight", "lora_B.weight", "lora_magnitude_vector"),
           "vera": ("vera_lambda_b", "vera_lambda_d")}


def over_quantized(name: str, model=None, quantization: str = "nf4", dropout: float = 0.0):
    """`name` applied over a `quantization` base (the tiny model unless `model` is given), as the config builds it."""
    from tunesmith.methods.registry import get_method

    cfg = load_config(None, [f"model.quantization={quantization}", f"method.name={name}", "method.r=4",
                             "method.alpha=8", f"method.dropout={dropout}"]).method
    if model is None:
        model = build_model()
        quantize_model(model, quantization)
    get_method(name).apply(model, cfg)
    return model, cfg


def randomise(model, name: str) -> None:
    """Adapters away from their init (which is the base model): B and DoRA's magnitudes, VeRA's b and d."""
    if name == "lora":
        return randomise_b(model)
    torch.manual_seed(7)
    with torch.no_grad():
        for _, m in weight_delta_modules(model):
            if name == "vera":
                m.vera_lambda_b.normal_(std=0.5)
                m.vera_lambda_d.normal_()
            else:
                m.lora_B.weight.normal_(std=0.2)
                m.lora_magnitude_vector.mul_(1 + 0.3 * torch.rand_like(m.lora_magnitude_vector))


@pytest.mark.parametrize("quantization", ["nf4", "int8"])
@pytest.mark.parametrize("name", ["dora", "vera"])
def test_dora_and_vera_train_over_a_quantized_base(name, quantization):
    """The loss falls, only the adapter gets gradients, the packed base is untouched, no float W0 is kept."""
    model, _ = over_quantized(name, quantization=quantization, dropout=0.1)
    packed = {n: m.weight.data.clone() for n, m in weight_delta_modules(model)}
    assert len(packed) == 14 and all(m.quantized_base is not None for _, m in weight_delta_modules(model))
    assert all(not m.weight.is_floating_point() for _, m in weight_delta_modules(model))
    assert not [k for k, t in model.state_dict().items() if t.ndim == 2 and ".layers." in k and t.is_floating_point()
                and t.shape[0] > 4 and t.shape[1] > 4]  # adapters' r=4 matrices only: no float copy of any W0
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert len(trainable) == 14 * len(TRAINED[name]) and all(n.endswith(TRAINED[name]) for n in trainable)
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if n in trainable)
    logits(model)  # an eval forward first: bitsandbytes must not repack the weight for bf16 inference
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    losses = []
    for _ in range(5):
        model.train()
        loss = model(ids(), labels=ids()).loss
        loss.backward()
        assert {n for n, p in model.named_parameters() if p.grad is not None} == trainable
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.01, losses  # measured over nf4: DoRA 5.747 -> 5.236, VeRA 5.747 -> 5.691
    assert all(torch.equal(m.weight.data, packed[n]) for n, m in weight_delta_modules(model))  # base untouched


@pytest.mark.parametrize("name", ["dora", "vera"])
def test_dora_and_vera_over_nf4_compute_their_formula_on_the_dequantized_weight(name):
    """Over NF4 the layer computes what it computes over the float dequantized W0 (DoRA's norms included);
    merging refuses the packed weight and folds into the dequantized one."""
    model, _ = over_quantized(name)
    randomise(model, name)
    adapted = logits(model)
    assert (adapted - logits(over_quantized(name)[0])).abs().max() > 1e-2  # the adapter changes the output
    with pytest.raises(UserError, match="quantized weight in place"):
        merge_and_unload(model)
    assert dequantize_model(model) == 14
    assert all(m.quantized_base is None and m.weight.dtype == torch.float32 for _, m in weight_delta_modules(model))
    assert (logits(model) - adapted).abs().max() <= 1e-6  # measured: 0 for both
    merge_and_unload(model)
    assert all(type(m) is nn.Linear for n, m in model.named_modules() if n.endswith("_proj"))
    assert (logits(model) - adapted).abs().max() <= 1e-4  # measured: 2.4e-7 (DoRA), 7.8e-7 (VeRA)


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


# peft parity: max abs logit difference allowed (the tiny model's logits are at most ~1.1 in magnitude)
TOL_PEFT = {"dora": 1e-5,  # measured 2.5e-7: peft forms B A as B(A(I))^T, and sums the norms in its own order
            "vera": 1e-6}  # measured 0: the same operations in the same order


@pytest.mark.parametrize("name", ["dora", "vera"])
def test_dora_and_vera_adapters_over_nf4_load_in_peft_over_bitsandbytes(tmp_path, base_dir, name):
    """Trained over our NF4 base, saved in peft's format, loaded by peft over transformers' NF4 base: same logits."""
    pytest.importorskip("accelerate")
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    from tunesmith.methods.registry import get_method

    ours = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    quantize_model(ours, "nf4")
    ours, cfg = over_quantized(name, model=ours, dropout=0.1)
    randomise(ours, name)
    get_method(name).save(ours, tmp_path, cfg, str(base_dir))
    theirs = peft.PeftModel.from_pretrained(transformers_quantized(base_dir, "nf4"), tmp_path)
    package = "peft.tuners.vera" if name == "vera" else "peft.tuners.lora"
    wrapped = [m for m in theirs.modules() if type(m).__module__.startswith(package)
               and type(getattr(m, "base_layer", None)).__name__ == "Linear4bit"]
    assert len(wrapped) == 14  # peft's layers over bitsandbytes' Linear4bit
    expected = logits(ours)
    assert (expected - logits(AutoModelForCausalLM.from_pretrained(base_dir))).abs().max() > 1e-2
    assert (logits(theirs) - expected).abs().max() <= TOL_PEFT[name]


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


def qlora_run(run_dir, base_dir, name: str = "lora"):
    """A run directory as `tunesmith train` leaves it for a QLoRA run: adapter/ and config.yaml (nf4).
    Returns the adapted model in memory."""
    from tunesmith.methods.registry import get_method
    from tunesmith.models.loading import load_model_and_tokenizer

    model, _ = load_model_and_tokenizer(ModelConfig(name_or_path=str(base_dir), quantization="nf4"))
    model, cfg = over_quantized(name, model=model)
    randomise(model, name)
    get_method(name).save(model, run_dir / "adapter", cfg, str(base_dir))
    (run_dir / "config.yaml").write_text("model:\n  quantization: nf4\n  double_quant: true\n")
    return model


@pytest.mark.parametrize("name", ["lora", "dora", "vera"])
def test_merge_command_folds_qlora_into_the_dequantized_base(tmp_path, base_dir, name, capsys):
    import re

    from transformers import AutoModelForCausalLM

    run_dir = tmp_path / "run"
    adapted = logits(qlora_run(run_dir, base_dir, name))
    capsys.readouterr()
    run_cli("merge", "--adapter", str(run_dir / "adapter"), "--out", str(tmp_path / "merged"))
    # the report: KL to the adapter on its 4-bit base, ours next to a naive merge into the float weights
    ours, naive = map(float, re.search(r"KL (\S+) nats.*would give KL (\S+),", capsys.readouterr().out).groups())
    assert ours < 1e-9 and naive > 1e-6, (ours, naive)  # measured 3e-15 and 6e-5 (lora)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert "quantization_config" not in json.loads((tmp_path / "merged" / "config.json").read_text())
    assert type(merged.model.layers[1].self_attn.o_proj) is nn.Linear
    assert (logits(merged) - adapted).abs().max() < 1e-4  # measured: 5.1e-7 (lora), 4.5e-7 (dora), 7.8e-7 (vera)
    # merging into the float base instead leaves the quantization error in
    run_cli("merge", "--adapter", str(run_dir / "adapter"), "--out", str(tmp_path / "float"), "--quantization", "none")
    assert (logits(AutoModelForCausalLM.from_pretrained(tmp_path / "float")) - adapted).abs().max() > 1e-3  # 0.03-0.1


def test_generate_and_chat_use_the_quantized_base_of_a_qlora_run(tmp_path, base_dir, monkeypatch, capsys):
    """`tunesmith generate/chat --adapter` on a QLoRA run: the base is quantized as in training (config.yaml
    beside the adapter), so the model is the one that was trained: same logits, same greedy answer."""
    from tunesmith.commands import infer
    from tunesmith.evaluate.generate import generate, render_prompt

    run_dir = tmp_path / "run"
    trained = qlora_run(run_dir, base_dir)
    adapter = str(run_dir / "adapter")
    model, tokenizer = infer.load_for_inference(str(base_dir), adapter)
    assert type(model.model.layers[0].self_attn.q_proj.quantized_base).__name__ == "Linear4bit"
    assert torch.equal(logits(model), logits(trained))
    expected = generate(trained, tokenizer, [render_prompt(tokenizer, [{"role": "user", "content": "hi"}])], 6)[0]
    assert infer.generate_one(str(base_dir), adapter, "hi", 6, None) == expected
    answers = iter(["hi", ""])
    monkeypatch.setattr("builtins.input", lambda prompt: next(answers))
    infer.chat(str(base_dir), adapter, 6, None)
    assert f"model> {expected}\n" in capsys.readouterr().out
    # quantization none, or an adapter folder without its run's config.yaml: the float base, another model
    import shutil

    shutil.copytree(adapter, tmp_path / "alone")
    for args in ((adapter, "none"), (str(tmp_path / "alone"),)):
        plain, _ = infer.load_for_inference(str(base_dir), *args)
        assert plain.model.layers[0].self_attn.q_proj.quantized_base is None
        assert (logits(plain) - logits(trained)).abs().max() > 1e-3


@pytest.mark.parametrize("override, quantized", [([], True), (["model.quantization=none"], False)])
def test_eval_with_a_qlora_adapter_uses_its_quantized_base_unless_the_config_says(tmp_path, base_dir, monkeypatch,
                                                                                   override, quantized):
    from tunesmith.commands import infer
    from tunesmith.evaluate.metrics.scoring import Evaluation

    run_dir = tmp_path / "run"
    qlora_run(run_dir, base_dir)
    (tmp_path / "test.jsonl").write_text('{"prompt": "hi", "completion": "there"}\n')
    scored = []
    monkeypatch.setattr(infer, "score_test_set", lambda model, *args: scored.append(model) or Evaluation({}))
    cfg = load_config(None, [f"model.name_or_path={base_dir}", f"data.test={tmp_path / 'test.jsonl'}", *override])
    infer.evaluate(cfg, str(run_dir / "adapter"))
    assert (scored[0].model.layers[0].mlp.up_proj.quantized_base is not None) == quantized


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
