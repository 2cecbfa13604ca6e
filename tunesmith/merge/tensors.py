"""Streaming safetensors I/O: a merge holds a row chunk of each input, or one tensor, and its result at a time.

A safetensors file is an 8-byte little-endian header length n, n bytes of JSON
({name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}) and the data,
offsets counted from the end of the header. Reading maps only the bytes of the tensor (or row
chunk) asked for, copy-on-write (mmap.ACCESS_COPY: a consumer writing into it never changes the
file), and the mapping goes when the last tensor viewing it does. No bytes are copied: a 513 MiB
file read in 16 MiB chunks and summed took 0.05 s mapped, 0.15-0.21 s through readinto. Mapping
the whole file once (safe_open) would keep every page read resident and count all inputs in the
peak RSS; a mapping per read counts only what is held. Writing knows every output name, dtype and
shape before the first tensor is merged, so each shard's header is written first and the tensors
are appended as they come; nothing is buffered. Shards and their index are named as transformers
names them.
"""

from __future__ import annotations

import json
import math
import mmap
import re
import struct
from pathlib import Path

import torch

from tunesmith.errors import UserError

LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")
TIED_HEAD = ("lm_head.weight", "model.embed_tokens.weight")
DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
CODES = {v: k for k, v in DTYPES.items()}
CHUNK_BYTES = 16 * 2**20  # a streamed merge reads and writes a tensor in row chunks of about this size
# ... and an elementwise one (linear, task arithmetic) in smaller ones: its inputs' chunks and the result, four
# passes over them, stay in the CPU's cache. A linear merge of three models of the default size: 16 MiB
# 0.66-0.89 s, 2 MiB 0.34-0.53 s, 1 MiB 0.42-0.52 s, 0.25 MiB 0.62-0.77 s (bench/merge.py's models, fresh processes)
ELEMENTWISE_CHUNK_BYTES = 2 * 2**20
READ_HOOK = None  # tests: called as READ_HOOK(name, nbytes) on every read, to see what a merge holds


def row_chunks(shape: tuple, itemsize: int, chunk_bytes: int | None = None) -> list[slice | None]:
    """Slices of dim 0 that cover a tensor of `shape` in order, each about chunk_bytes (CHUNK_BYTES) and at least
    one row; [None] (the whole tensor) for a 0-d one."""
    if not shape:
        return [None]
    row = max(1, math.prod(shape[1:]) * itemsize)
    step = max(1, (chunk_bytes or CHUNK_BYTES) // row)
    return [slice(i, min(i + step, shape[0])) for i in range(0, shape[0], step)] or [slice(0, 0)]


class TensorInfo:
    __slots__ = ("path", "dtype", "shape", "begin", "end")

    def __init__(self, path: Path, dtype: torch.dtype, shape: tuple, begin: int, end: int):
        self.path, self.dtype, self.shape, self.begin, self.end = path, dtype, shape, begin, end


def read_header(path: Path) -> dict[str, TensorInfo]:
    """The tensors of one safetensors file: name -> where its bytes are. A malformed file is a UserError."""
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        start = 8 + n
        out = {}
        for name, meta in header.items():
            if name == "__metadata__":
                continue
            if meta["dtype"] not in DTYPES:
                raise ValueError(f"tensor {name!r} has dtype {meta['dtype']}, which tunesmith merge does not read")
            begin, end = meta["data_offsets"]
            out[name] = TensorInfo(path, DTYPES[meta["dtype"]], tuple(meta["shape"]), start + begin, start + end)
        return out
    except (OSError, ValueError, KeyError, TypeError, struct.error) as e:
        raise UserError(f"Cannot read {str(path)!r} as safetensors: {e}") from None


class ModelTensors:
    """The tensors and config.json of a model folder, each tensor read from disk only when asked for."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.config = read_config(self.folder)
        shards = sorted(self.folder.glob("*.safetensors"))
        if not shards:
            raise UserError(f"Model folder {str(self.folder)!r} has no *.safetensors weights to merge.")
        self.info: dict[str, TensorInfo] = {}
        for shard in shards:
            self.info.update(read_header(shard))

    def names(self) -> list[str]:
        return list(self.info)

    def resolve(self, name: str) -> str | None:
        """The stored name for `name`: itself, or (tied model) the embeddings for lm_head.weight."""
        if name in self.info:
            return name
        if name == TIED_HEAD[0] and self.config.get("tie_word_embeddings", False) and TIED_HEAD[1] in self.info:
            return TIED_HEAD[1]
        return None

    def meta(self, name: str) -> TensorInfo:
        stored = self.resolve(name)
        if stored is None:
            raise UserError(f"The model in {str(self.folder)!r} has no tensor {name!r}; merged models must share "
                            "their architecture and tensor names.")
        return self.info[stored]

    def get(self, name: str, rows: slice | None = None) -> torch.Tensor:
        """The tensor, or only its rows `rows` (a slice of dim 0 with a step of 1, as row_chunks gives)."""
        info = self.meta(name)
        begin, size, shape = info.begin, info.end - info.begin, info.shape
        if rows is not None and shape:
            row_bytes = size // shape[0] if shape[0] else 0
            start, stop, _ = rows.indices(shape[0])
            begin, size, shape = begin + start * row_bytes, max(0, stop - start) * row_bytes, (max(0, stop - start),
                                                                                             *shape[1:])
        if READ_HOOK is not None:
            READ_HOOK(name, size)
        if size == 0:
            return torch.empty(shape, dtype=info.dtype)
        return read_bytes(info.path, begin, size).view(info.dtype).reshape(shape)

    def num_layers(self) -> int:
        layers = self.config.get("num_hidden_layers")
        if layers is None:
            found = {i for n in self.info if (i := layer_index(n)) is not None}
            layers = max(found) + 1 if found else 0
        return int(layers)


def read_bytes(path: Path, begin: int, size: int) -> torch.Tensor:
    """Bytes begin..begin+size of the file as a uint8 tensor over a private mapping of them (see the module
    docstring). The tensor holds the mmap object, which unmaps when the tensor's storage is freed: it is never
    closed here, as a close would leave the tensor pointing at unmapped memory. The file must not be truncated
    while a tensor of it lives (reading past its end would be SIGBUS): merges never write into an input."""
    start = begin - begin % mmap.ALLOCATIONGRANULARITY  # mappings start at a page boundary
    with open(path, "rb") as f:
        mapped = mmap.mmap(f.fileno(), begin - start + size, access=mmap.ACCESS_COPY, offset=start)
    return torch.frombuffer(mapped, dtype=torch.uint8, offset=begin - start, count=size)


def layer_index(name: str) -> int | None:
    """The transformer block a tensor belongs to (model.layers.7.mlp.up_proj.weight -> 7), None outside them."""
    m = LAYER.search(name)
    return int(m.group(1)) if m else None


def read_config(folder: Path) -> dict:
    path = folder / "config.json"
    if not path.is_file():
        raise UserError(f"Model folder {str(folder)!r} has no config.json; is it a Hugging Face model folder?")
    return json.loads(path.read_text(encoding="utf-8"))


class ShardWriter:
    """Writes a planned list of (name, dtype, shape) into shards of at most max_shard_bytes (one shard:
    model.safetensors; several: model-0000i-of-0000n.safetensors plus model.safetensors.index.json).
    Tensors must be added in the planned order; `close` checks that all came."""

    def __init__(self, out_dir: str | Path, plan: list[tuple[str, torch.dtype, tuple]],
                 max_shard_bytes: int = 5 * 2**30):
        self.out = Path(out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.plan = plan
        shards, size = [[]], 0
        for name, dtype, shape in plan:
            nbytes = math.prod(shape) * _itemsize(dtype)
            if shards[-1] and size + nbytes > max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append((name, dtype, shape, nbytes))
            size += nbytes
        self.shards = shards
        self.files = (["model.safetensors"] if len(shards) == 1 else
                      [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
        for old in [*self.out.glob("model*.safetensors"), self.out / "model.safetensors.index.json"]:
            old.unlink(missing_ok=True)  # a previous merge into this folder must not leave stale shards
        self.position = 0  # index into plan
        self.shard, self.handle = -1, None

    def add(self, name: str, tensor: torch.Tensor) -> None:
        self.add_rows(name, [tensor])

    def add_rows(self, name: str, chunks) -> None:
        """Append the planned tensor `name` from its row chunks (dim 0, in order; one chunk: the whole tensor),
        each written as it comes, so only one chunk is held."""
        expected, dtype, shape = self.plan[self.position]
        if name != expected:
            raise RuntimeError(f"merge wrote {name} where the plan has {expected}")
        shard = self._shard_of(self.position)
        if shard != self.shard:
            self._open(shard)
        rows = 0
        for tensor in chunks:
            if tuple(tensor.shape[1:]) != tuple(shape[1:]) or (not shape and tensor.dim()):
                raise RuntimeError(f"merge wrote {name} rows {tuple(tensor.shape)} where the plan has {shape}")
            rows += tensor.shape[0] if shape else 1
            data = tensor.detach().to(dtype).contiguous().cpu()
            if data.numel():
                self.handle.write(data.reshape(-1).view(torch.uint8).numpy())
            del tensor, data
        if rows != (shape[0] if shape else 1):
            raise RuntimeError(f"merge wrote {rows} rows of {name} where the plan has {shape}")
        self.position += 1

    def _shard_of(self, position: int) -> int:
        count = 0
        for i, shard in enumerate(self.shards):
            count += len(shard)
            if position < count:
                return i
        raise RuntimeError("more tensors than planned")

    def _open(self, shard: int) -> None:
        if self.handle is not None:
            self.handle.close()
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for name, dtype, shape, nbytes in self.shards[shard]:
            header[name] = {"dtype": CODES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as safetensors writes it
        self.handle = open(self.out / self.files[shard], "wb")
        self.handle.write(struct.pack("<Q", len(raw)) + raw)
        self.shard = shard

    def close(self) -> list[str]:
        if self.handle is not None:
            self.handle.close()
            self.handle = None
        if self.position != len(self.plan):
            raise RuntimeError(f"merge wrote {self.position} of {len(self.plan)} planned tensors")
        if len(self.files) > 1:
            weight_map = {n: self.files[i] for i, shard in enumerate(self.shards) for n, *_ in shard}
            total = sum(nbytes for shard in self.shards for *_, nbytes in shard)
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (self.out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        return self.files


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()
