"""A quantized frozen base for QLoRA: bitsandbytes 4-bit (NF4, FP4) or 8-bit linear layers.

Dettmers et al. 2023, "QLoRA: Efficient Finetuning of Quantized LLMs", arXiv:2305.14314, Section 3,
Eq. 5-6. The frozen base weight is stored in 4 bits and dequantized to the compute dtype inside
every matmul; LoRA's A and B stay in the compute dtype and are all that trains:

    h = dequant(c1, c2, W_nf4) x + b + s * B A x

NF4: each block of 64 consecutive weights is divided by its absmax c2 and rounded to the nearest
of 16 levels set at quantiles of N(0, 1) (the QLoRA paper's "4-bit NormalFloat"); FP4 rounds to a
4-bit float grid instead. Storage: 4 bits per weight plus one fp32 absmax per 64 weights,
4 + 32/64 = 4.5 bits per weight.
Double quantization (model.double_quant, on by default): the fp32 absmaxes, minus their mean, are
quantized again to 8 bits in blocks of 256, with one fp32 constant c1 per block:
4 + 8/64 + 32/(64*256) = 4.127 bits per weight.
int8 (LLM.int8(), Dettmers et al. 2022, arXiv:2208.07339): one fp32 scale per output row, 8 bits
per weight; at inference, input features above threshold 6 are multiplied in 16-bit.

Where: loading with model.quantization set (models/loading.py) goes through models/streaming.py, which
reads the checkpoint tensor by tensor and calls `quantized_copy` on each block linear as it arrives, so
the float model never exists; `quantize_model` does the same swap on a model already in memory.

What is quantized: every nn.Linear of the transformer blocks. Embeddings, norms and the output
head (also when it is tied to the embeddings) keep model.dtype, as in transformers' integration.

Why a module swap of our own rather than transformers' BitsAndBytesConfig in from_pretrained:
  - it quantizes whatever our loader produced (built-in GGUF conversion, folder, cached hub id),
    after its safetensors-only checks, in one call;
  - transformers' bitsandbytes path also requires `accelerate`; this one needs bitsandbytes only;
  - the modules are bitsandbytes' own Linear4bit / Linear8bitLt, built with the same arguments
    as transformers' `replace_with_bnb_linear` and quantized by the same bnb.functional call,
    so the bytes are identical to a transformers/peft load (tests/test_qlora.py checks this), and
    `save_quantized` writes a checkpoint that AutoModelForCausalLM.from_pretrained reads back.

A bitsandbytes 0.50 pitfall handled here: on a CPU with AVX512-BF16, Linear4bit's first forward in
eval mode without grad repacks its weight in place for a bf16 inference kernel; after that the
layer computes in bf16, and training through it breaks (no input gradient; with a bias, an
error). Evaluation runs before and during training, so `no_cpu_repacking` turns it off.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from tunesmith.errors import UserError

log = logging.getLogger(__name__)

BLOCKSIZE = 64  # bitsandbytes' default 4-bit block size, and what transformers uses
INT8_THRESHOLD = 6.0  # LLM.int8() outlier threshold, transformers' default


def require_bitsandbytes():
    try:
        import bitsandbytes
    except ImportError:
        raise UserError("model.quantization needs the bitsandbytes package: pip install 'tunesmith[qlora]' "
                        "(or pip install bitsandbytes).") from None
    return bitsandbytes


def resolve_compute_dtype(name: str, device: torch.device) -> torch.dtype:
    """auto: bfloat16 on CUDA, float32 on CPU (where bf16 without native support is slow)."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


def is_quantized_linear(module: nn.Module) -> bool:
    """A bitsandbytes linear layer: its weight holds packed integers, not floats."""
    weight = getattr(module, "weight", None)
    return isinstance(module, nn.Linear) and weight is not None and not weight.is_floating_point()


def quantizable_linears(model: nn.Module) -> list[str]:
    """Full names of the plain nn.Linear layers to quantize: all but the output head and tied weights."""
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    uses: dict[int, int] = {}  # parameter id -> how many modules hold it (a tied head shares the embeddings')
    for _, p in model.named_parameters(remove_duplicate=False):
        uses[id(p)] = uses.get(id(p), 0) + 1
    return [name for name, m in model.named_modules()
            if type(m) is nn.Linear and m is not head and name.split(".")[-1] != "lm_head"
            and uses[id(m.weight)] == 1]


def quantized_copy(linear: nn.Linear, quantization: str, double_quant: bool, compute_dtype: torch.dtype,
                   device: torch.device) -> nn.Linear:
    """A bitsandbytes layer holding `linear`'s weight quantized on `device` (as replace_with_bnb_linear)."""
    bnb = require_bitsandbytes()
    bias = linear.bias is not None
    with torch.device("meta"):
        if quantization == "int8":
            q = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias, has_fp16_weights=False,
                                    threshold=INT8_THRESHOLD)
        else:
            q = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias, compute_dtype,
                                  compress_statistics=double_quant, quant_type=quantization, quant_storage=torch.uint8)
    weight = linear.weight.detach()
    if quantization == "int8":
        q.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False).to(device)  # quantizes
    else:
        q.weight = bnb.nn.Params4bit(weight, requires_grad=False, blocksize=BLOCKSIZE, compress_statistics=double_quant,
                                     quant_type=quantization, quant_storage=torch.uint8, module=q).to(device)
    if bias:
        q.bias = nn.Parameter(linear.bias.detach().to(device), requires_grad=False)
    q.compute_dtype = compute_dtype  # Linear8bitLt has no compute dtype; LoRA reads it for A and B
    q.requires_grad_(False)
    q.train(linear.training)
    return q


def no_cpu_repacking(model: nn.Module) -> None:
    """Keep every Linear4bit on the dequantize-and-matmul path (see the module docstring)."""
    for m in model.modules():
        if hasattr(m, "support_avx512bf16_for_cpu"):
            m.support_avx512bf16_for_cpu = False


def quantize_model(model: nn.Module, quantization: str, double_quant: bool = True, compute_dtype: str = "auto",
                   device: torch.device | str = "cpu") -> list[str]:
    """Replace the transformer blocks' nn.Linear layers by bitsandbytes layers quantized on `device`.

    quantization: nf4 | fp4 (Linear4bit, double_quant applies) | int8 (Linear8bitLt). One layer at a
    time, so the float copy of only one weight is alive beside the quantized model. Returns the names."""
    if quantization not in ("nf4", "fp4", "int8"):
        raise ValueError(f"unknown quantization {quantization!r}")
    require_bitsandbytes()
    device = torch.device(device)
    dtype = resolve_compute_dtype(compute_dtype, device)
    names = quantizable_linears(model)
    before = after = 0
    for name in names:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        linear = getattr(parent, attr)
        q = quantized_copy(linear, quantization, double_quant, dtype, device)
        before += linear.weight.numel() * linear.weight.element_size()
        after += sum(t.numel() * t.element_size() for t in q.state_dict().values() if torch.is_tensor(t))
        setattr(parent, attr, q)
        del linear
    no_cpu_repacking(model)
    if names and device.type == "cpu":
        own_float_tensors(model)
    if names:
        log.info("quantized %d linear layers to %s%s (compute %s): %.0f MiB -> %.0f MiB", len(names), quantization,
                 " with double quantization" if double_quant and quantization != "int8" else "",
                 str(dtype).removeprefix("torch."), before / 2**20, after / 2**20)
    return names


@torch.no_grad()
def own_float_tensors(model: nn.Module) -> None:
    """Copy the float tensors left after quantizing (embeddings, norms) into memory of their own.

    transformers maps the safetensors file and points the tensors into that mapping. Quantizing
    reads every weight, so all the file's pages become resident, and they stay counted in the
    process's memory for as long as any tensor still points into the mapping: measured on
    SmolLM2-135M, 507 MiB of file pages after quantizing, 102 MiB once the embeddings were copied.
    (Off the CPU, model.to(device) makes these copies anyway.)"""
    for t in list(model.parameters()) + list(model.buffers()):
        if t.device.type == "cpu" and t.is_floating_point():
            t.data = t.data.clone()


def dequantize_weight(module: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """The float weight (out, in) of a bitsandbytes Linear4bit or Linear8bitLt."""
    bnb = require_bitsandbytes()
    weight = module.weight
    if getattr(weight, "quant_state", None) is not None:  # Params4bit
        state = weight.quant_state
        if getattr(state, "packing_format_for_cpu", False):  # repacked by an eval forward: undo first
            from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

            weight.data, weight.quant_state = _convert_weight_packed_for_cpu_inverse(weight.data, state)
            state = weight.quant_state
        return bnb.functional.dequantize_4bit(weight.data, state).to(dtype)
    scb = weight.SCB if getattr(weight, "SCB", None) is not None else module.state.SCB  # Int8Params
    return bnb.functional.int8_vectorwise_dequant(weight.data, scb).to(dtype)


@torch.no_grad()
def dequantize_model(model: nn.Module, dtype: torch.dtype = torch.float32) -> int:
    """Every quantized weight back to float `dtype`, in place: bare bitsandbytes layers become nn.Linear,
    adapters over a quantized base (`quantized_base`) get a float weight, so they can merge.
    Returns how many layers changed. The result computes what the quantized model computed, in float."""
    count = 0
    for parent in list(model.modules()):
        for attr, child in list(parent.named_children()):
            base = getattr(child, "quantized_base", None)
            if base is not None:  # an adapter (methods/weight_delta.py: LoRA family, VeRA) over a bitsandbytes layer
                child.weight = nn.Parameter(dequantize_weight(base, dtype), requires_grad=False)
                child.quantized_base = None
                count += 1
            elif is_quantized_linear(child):
                linear = nn.Linear(child.in_features, child.out_features, bias=child.bias is not None, device="meta")
                linear.weight = nn.Parameter(dequantize_weight(child, dtype), requires_grad=False)
                if child.bias is not None:
                    linear.bias = nn.Parameter(child.bias.detach().to(dtype), requires_grad=False)
                setattr(parent, attr, linear)
                count += 1
    return count


def hf_quantization_config(quantization: str, double_quant: bool, compute_dtype: torch.dtype) -> dict:
    """transformers' BitsAndBytesConfig, as config.json stores it, for a model quantized like ours."""
    from transformers import BitsAndBytesConfig

    if quantization == "int8":
        config = BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=INT8_THRESHOLD)
    else:
        config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quantization,
                                    bnb_4bit_use_double_quant=double_quant, bnb_4bit_compute_dtype=compute_dtype,
                                    bnb_4bit_quant_storage=torch.uint8)
    return config.to_dict()


def save_quantized(model: nn.Module, tokenizer, out_dir: str | Path, quantization: str, double_quant: bool,
                   compute_dtype: torch.dtype) -> None:
    """A transformers folder of a model quantized by `quantize_model`: the bitsandbytes layers' state dicts
    (packed weights plus `weight.absmax`, `weight.quant_map`, `weight.nested_*`, `weight.quant_state.*`
    for 4-bit; `weight` int8 plus `SCB` for 8-bit) and config.json's quantization_config."""
    model.config.quantization_config = hf_quantization_config(quantization, double_quant, compute_dtype)
    try:
        model.save_pretrained(out_dir, safe_serialization=True)
    finally:
        del model.config.quantization_config
    tokenizer.save_pretrained(out_dir)
