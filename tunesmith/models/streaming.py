"""Load a quantized base (QLoRA) straight from safetensors, one tensor at a time: no full-precision model.

QLoRA is for models that do not fit in memory at full precision (the paper fine-tunes a 65B model on
one 48 GB GPU). Loading in model.dtype and then quantizing (quantize.quantize_model) holds the whole
float model first: 28 GB for a 7B model in fp32. Here instead:

  1. the model is built from its config.json with every parameter on the meta device (no memory),
     while buffers are made for real: non-persistent ones such as the rotary `inv_freq` are not in
     the checkpoint and must be computed exactly as a normal construction computes them;
  2. the safetensors files are read tensor by tensor; each block linear weight becomes a
     bitsandbytes layer as soon as it is read (quantize.quantized_copy, the same call as the
     load-then-quantize path, so the bytes are identical), every other tensor is placed in the
     dtype of its parameter (model.dtype). The float tensor is dropped before the next is read.

So the process holds the quantized model plus one full-precision tensor (and bitsandbytes'
temporaries while it quantizes it). Files are read with positioned reads into a buffer the tensor
owns, not through a memory map: every page a mapping has touched counts in the process's RSS for
as long as the mapping lives (measured with safetensors' safe_open: 600 MiB of file pages resident
after reading 512 MiB of tensors from one open file), which is the cost this module removes.
On CUDA each tensor goes to the GPU as it is made, so GPU memory never holds the float model either.
Every source ends up here as a safetensors folder: the built-in model and a `.gguf` file through their
cached conversion (loading.cached_gguf_conversion, made once), a local folder, a cached hub id.

Anything this reader does not cover (pickle weights, a checkpoint already quantized, keys that
transformers would rename or convert, missing or unknown keys) returns None, and the caller uses
the load-then-quantize path, with a log line saying why.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch
from torch import nn

from tunesmith.models.heap import release_freed_memory
from tunesmith.models.quantize import (no_cpu_repacking, quantizable_linears, quantized_copy, require_bitsandbytes,
                                       resolve_compute_dtype)

log = logging.getLogger(__name__)

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool}
# Keys transformers drops without a word when a checkpoint still has them (old rotary caches, position ids).
IGNORED_SUFFIXES = ("rotary_emb.inv_freq", "position_ids")


def load_quantized(folder: Path, dtype: torch.dtype, quantization: str, double_quant: bool, compute_dtype: str,
                   device: torch.device, trust_remote_code: bool = False) -> nn.Module | None:
    """The model in `folder` with its block linears quantized as they are read, or None (see the docstring)."""
    require_bitsandbytes()
    files = weight_files(folder)
    if files is None:
        return why_not(folder, "its weights are not model.safetensors or an indexed set of shards")
    config = model_config(folder, trust_remote_code)
    if getattr(config, "quantization_config", None) is not None:
        return None  # already quantized on disk (tunesmith quantize): transformers reads it as it is
    entries = {key: (path, entry) for path in files for key, entry in read_header(path).items()}
    if odd := sorted({entry["dtype"] for _, entry in entries.values()} - DTYPES.keys()):
        return why_not(folder, f"it holds {', '.join(odd)} tensors")
    try:
        model = empty_model(folder, config, dtype, trust_remote_code)
    except Exception as e:  # e.g. remote code that computes from its weights in __init__
        log.warning("could not build %s without its weights (%s: %s)", folder, type(e).__name__, str(e)[:200])
        return why_not(folder, "the model cannot be built on the meta device")
    groups, problem = match_keys(model, entries, dtype)
    if problem:
        return why_not(folder, problem)
    started = time.time()
    compute = resolve_compute_dtype(compute_dtype, device)
    quantized = {f"{name}.weight" for name in quantizable_linears(model)}
    # Biases, norms and embeddings first, so every linear has its bias when its weight is quantized.
    order = sorted(groups, key=lambda key: (key in quantized, str(entries[key][0]), entries[key][1]["data_offsets"]))
    for key in order:
        value = read_tensor(*entries[key])
        if key in quantized:
            quantize_in_place(model, key, value, quantization, double_quant, compute, device)
        else:
            place(groups[key], value, device)
        del value  # the only float copy: gone before the next tensor is read
        release_freed_memory()
    check_materialised(model)
    no_cpu_repacking(model)
    log.info("streamed %d tensors from %s in %.1f s, quantizing %d linear layers to %s%s as they were read",
             len(order), folder, time.time() - started, len(quantized), quantization,
             " with double quantization" if double_quant and quantization != "int8" else "")
    return model.eval()


def why_not(folder: Path, reason: str) -> None:
    log.info("loading %s in full precision, then quantizing (not tensor by tensor: %s)", folder, reason)
    return None


def weight_files(folder: Path) -> list[Path] | None:
    """The safetensors files transformers would read: the shards an index names, else model.safetensors."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [folder / name for name in names]
    single = folder / "model.safetensors"
    return [single] if single.is_file() else None


def read_header(path: Path) -> dict[str, dict]:
    """name -> {dtype, shape, data_offsets (absolute in the file)} of a safetensors file, reading only its header.

    Format: 8 bytes little-endian header length n, n bytes of JSON, then the tensors' bytes. The loader has
    already validated the header (files.check_safetensors: offsets cover the file exactly)."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    for entry in header.values():
        begin, end = entry["data_offsets"]
        entry["data_offsets"] = (8 + n + begin, 8 + n + end)
    return header


def read_tensor(path: Path, entry: dict) -> torch.Tensor:
    """One tensor, read into memory of its own (a positioned read: no mapping keeps the file's pages resident)."""
    begin, end = entry["data_offsets"]
    buffer = torch.empty(end - begin, dtype=torch.uint8)
    with open(path, "rb", buffering=0) as f:
        f.seek(begin)
        view = memoryview(buffer.numpy())
        done = 0
        while done < len(view):  # readinto may return short counts on large reads
            got = f.readinto(view[done:])
            if not got:
                raise OSError(f"{path}: file ends inside a tensor")
            done += got
    return buffer.view(DTYPES[entry["dtype"]]).reshape(entry["shape"])


def model_config(folder: Path, trust_remote_code: bool):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)


def empty_model(folder: Path, config, dtype: torch.dtype, trust_remote_code: bool) -> nn.Module:
    """The model of `config` with its parameters on the meta device and its buffers computed on the CPU.

    accelerate's init_empty_weights moves each parameter to meta as it is registered (before any
    initialisation touches it); buffers stay real, so rotary tables equal a normal load's."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM, GenerationConfig

    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    model.tie_weights()  # construction skips tying meta parameters; from_pretrained ties after loading
    if (folder / "generation_config.json").is_file():  # from_pretrained reads it too (eos ids, sampling defaults)
        model.generation_config = GenerationConfig.from_pretrained(folder)
    return model


def has_weight_conversions(model: nn.Module) -> bool:
    """Whether transformers renames or converts this architecture's checkpoint keys while loading."""
    if getattr(model, "_checkpoint_conversion_mapping", None):
        return True
    try:
        from transformers.conversion_mapping import get_checkpoint_conversion_mapping
    except ImportError:  # transformers < 5 converts through _checkpoint_conversion_mapping only
        return False
    return any(get_checkpoint_conversion_mapping(name) is not None
               for name in (type(model).__name__, getattr(model.config, "model_type", None)) if name)


def match_keys(model: nn.Module, entries: dict, dtype: torch.dtype) -> tuple[dict, str | None]:
    """checkpoint key -> the (module, attribute) slots its tensor fills (several when weights are tied).

    Returns (slots, None) when every tensor of the model's state dict has exactly one checkpoint key, or
    ({}, the reason) when this checkpoint needs transformers' own loading."""
    if has_weight_conversions(model):
        return {}, f"transformers converts {type(model).__name__} checkpoints while loading"
    if dtype != torch.float32 and (getattr(model, "_keep_in_fp32_modules", None)
                                   or getattr(model, "_keep_in_fp32_modules_strict", None)):
        return {}, f"{type(model).__name__} keeps some modules in fp32 when loaded in {dtype}"
    expected = set(model.state_dict(keep_vars=True))  # non-persistent buffers are not in it, nor in checkpoints
    by_tensor: dict[int, list[tuple[str, nn.Module, str]]] = {}
    for name, tensor in [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]:
        if name in expected:
            owner, _, attr = name.rpartition(".")
            by_tensor.setdefault(id(tensor), []).append((name, model.get_submodule(owner), attr))
    slots, missing = {}, []
    for group in by_tensor.values():
        present = [name for name, _, _ in group if name in entries]
        if present:
            slots[present[0]] = [(module, attr) for _, module, attr in group]
        else:
            missing.append(group[0][0])
    unexpected = [k for k in entries if k not in expected and not k.endswith(IGNORED_SUFFIXES)]
    if missing or unexpected:
        return {}, f"{len(missing)} missing keys ({', '.join(missing[:3])}), {len(unexpected)} unexpected " \
                   f"({', '.join(unexpected[:3])})"
    for key, group in slots.items():
        meta = getattr(*group[0])
        if tuple(entries[key][1]["shape"]) != tuple(meta.shape):
            return {}, f"{key} has shape {entries[key][1]['shape']} in the checkpoint, {list(meta.shape)} in the model"
    return slots, None


def place(slots: list[tuple[nn.Module, str]], value: torch.Tensor, device: torch.device) -> None:
    """Put `value` (in the dtype the model declares for it) into every slot; tied slots share one tensor."""
    module, attr = slots[0]
    old = getattr(module, attr)
    value = value.to(device=device, dtype=old.dtype if old.is_floating_point() else value.dtype)
    if isinstance(old, nn.Parameter):
        value = nn.Parameter(value, requires_grad=old.requires_grad and value.is_floating_point())
    for module, attr in slots:
        if attr in module._parameters:
            module._parameters[attr] = value
        else:
            module._buffers[attr] = value


def quantize_in_place(model: nn.Module, key: str, value: torch.Tensor, quantization: str, double_quant: bool,
                      compute_dtype: torch.dtype, device: torch.device) -> None:
    """Swap the (meta) nn.Linear that owns weight `key` for a bitsandbytes layer quantized from `value` on `device`."""
    name = key.removesuffix(".weight")
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name)
    linear = getattr(parent, attr)
    # The dtype the load-then-quantize path quantizes from: model.dtype (from_pretrained casts first).
    linear.weight = nn.Parameter(value.to(linear.weight.dtype), requires_grad=False)
    setattr(parent, attr, quantized_copy(linear, quantization, double_quant, compute_dtype, device))
    linear.weight = None  # drop the float weight now, not when the module is collected


def check_materialised(model: nn.Module) -> None:
    """Every parameter and buffer was read (match_keys promised it): a meta tensor left here is a bug."""
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"streaming load left {len(left)} tensors unread: {left[:3]}")
