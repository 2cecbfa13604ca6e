"""A GGUF file to a transformers safetensors folder, one tensor at a time.

transformers can load a GGUF file itself, but it dequantizes every tensor into one dictionary first
and then builds the float model from it: for a moment the process holds the whole model in fp32
twice (28 GB per copy for a 7B model), which is the memory QLoRA exists to avoid. Here each tensor is
read from the memory-mapped file, dequantized, given transformers' name and layout, and appended to
the output file before the next one is read, so at most one float tensor (and the copy its layout
change makes) is alive at a time.

The values are transformers' own: the same `gguf.dequantize`, the same per-architecture tensor
processor (e.g. llama's reverse permutation of the q and k rows back from GGUF's rotary layout) and
the same name map (tests/test_gguf_convert.py compares every tensor with transformers' loader).
Config and tokenizer come from transformers' GGUF readers of the metadata, which hold no weights.

A safetensors file is an 8-byte little-endian header length, a JSON header naming each tensor's
dtype, shape and byte range, then the bytes. The header must come first but the shapes are known
only once each tensor is processed, so the bytes go to a side file first and are copied behind the
header afterwards (disk, not memory: the copy runs in 64 MiB chunks).
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

COPY_CHUNK = 64 << 20
SAFETENSORS_DTYPES = {np.dtype(np.float32): "F32", np.dtype(np.float16): "F16"}


def convert_gguf_streaming(gguf_path: Path, out_dir: Path) -> None:
    """Write config.json, generation_config.json, the tokenizer and model.safetensors (fp32) of `gguf_path`
    into `out_dir` (which must exist), one tensor in memory at a time."""
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    config = AutoConfig.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    with init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(config)  # on the meta device: the names, no memory
    config.architectures, config.dtype = [type(skeleton).__name__], torch.float32  # as save_pretrained writes
    config.save_pretrained(out_dir)
    GenerationConfig.from_model_config(config).save_pretrained(out_dir)
    AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name).save_pretrained(out_dir)
    write_safetensors(out_dir / "model.safetensors", hf_tensors(gguf_path, skeleton))


def hf_tensors(gguf_path: Path, skeleton):
    """(transformers name, float32 numpy array) for each tensor of the file that `skeleton` (the model on the
    meta device) uses, in file order."""
    from gguf import GGUFReader, dequantize
    from transformers.modeling_gguf_pytorch_utils import (TENSOR_PROCESSORS, TensorProcessor,
                                                          get_gguf_hf_weights_map, load_gguf_checkpoint, read_field)

    metadata = load_gguf_checkpoint(str(gguf_path), return_tensors=False)  # parsed config, no tensors
    reader = GGUFReader(gguf_path)
    architecture = read_field(reader, "general.architecture")[0]
    processor = TENSOR_PROCESSORS.get(architecture, TensorProcessor)(config=metadata.get("config", {}))
    names = get_gguf_hf_weights_map(skeleton, processor)
    for tensor in tqdm(reader.tensors, desc=f"convert {gguf_path.name}", unit="tensor", dynamic_ncols=True):
        result = processor.process(weights=dequantize(tensor.data, tensor.tensor_type), name=tensor.name,
                                   tensor_key_mapping=names, parsed_parameters=metadata)
        if result.name in names:  # tensors transformers' models do not use (e.g. rope frequencies) are dropped
            yield names[result.name], np.ascontiguousarray(result.weights, dtype=np.float32)


def write_safetensors(path: Path, tensors) -> None:
    """A safetensors file from an iterator of (name, array), holding one array at a time."""
    body = path.with_name(path.name + ".body")
    header: dict[str, dict] = {}
    offset = 0
    with open(body, "wb") as f:
        for name, array in tensors:
            f.write(memoryview(array).cast("B"))
            header[name] = {"dtype": SAFETENSORS_DTYPES[array.dtype], "shape": list(array.shape),
                            "data_offsets": [offset, offset + array.nbytes]}
            offset += array.nbytes
            del array
    header["__metadata__"] = {"format": "pt"}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    with open(path, "wb") as out, open(body, "rb") as f:
        out.write(struct.pack("<Q", len(raw)) + raw)
        shutil.copyfileobj(f, out, COPY_CHUNK)
    os.remove(body)
