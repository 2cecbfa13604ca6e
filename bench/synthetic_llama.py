"""A Llama-architecture model folder with random weights, written in safetensors shards, in seconds.

For memory measurements of loading and training (tests/test_qlora_streaming.py, bench/qlora_memory.py):
what matters there is the shapes, not the values, so the weights are one seeded block of N(0, 0.02)
values tiled over each tensor (a fresh normal draw per tensor would cost more than the writing).
Each tensor starts at a different point of the block, so no two tensors are identical.

    write_random_llama(folder, **SIZES["1b"])   # 1.03B parameters, 4.1 GB in fp32
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

SIZES = {  # name -> Llama shapes; parameters counted with tied embeddings
    "200m": dict(hidden=1024, intermediate=2816, layers=16, heads=16, kv_heads=4, vocab=32000),  # 213M
    "1b": dict(hidden=2048, intermediate=5632, layers=22, heads=32, kv_heads=4, vocab=49152),  # 1.07B (SmolLM2's vocab)
}
BLOCK = 1 << 20  # values in the random block that every tensor is tiled from


def shapes(hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int, vocab: int) -> dict[str, tuple]:
    """State-dict key -> shape of LlamaForCausalLM with tied embeddings (no lm_head.weight, as save_pretrained)."""
    kv = hidden // heads * kv_heads
    out = {"model.embed_tokens.weight": (vocab, hidden), "model.norm.weight": (hidden,)}
    for i in range(layers):
        p = f"model.layers.{i}."
        out |= {p + "input_layernorm.weight": (hidden,), p + "post_attention_layernorm.weight": (hidden,),
                p + "self_attn.q_proj.weight": (hidden, hidden), p + "self_attn.k_proj.weight": (kv, hidden),
                p + "self_attn.v_proj.weight": (kv, hidden), p + "self_attn.o_proj.weight": (hidden, hidden),
                p + "mlp.gate_proj.weight": (intermediate, hidden), p + "mlp.up_proj.weight": (intermediate, hidden),
                p + "mlp.down_proj.weight": (hidden, intermediate)}
    return out


def fill(shape: tuple, block: torch.Tensor, offset: int, dtype: torch.dtype) -> torch.Tensor:
    """A tensor of `shape` tiled from `block`, starting `offset` values in (norm weights: ones, as Llama's init)."""
    if len(shape) == 1:
        return torch.ones(shape, dtype=dtype)
    n = torch.Size(shape).numel()
    rolled = torch.roll(block, offset % BLOCK)
    return rolled.repeat(n // BLOCK + 1)[:n].reshape(shape).to(dtype)


def write_random_llama(folder: str | Path, hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int,
                       vocab: int, dtype: torch.dtype = torch.float32, shard_bytes: int = 1 << 30,
                       seed: int = 0) -> dict:
    """Write config.json, model-0000k-of-0000n.safetensors shards and their index. Returns the shapes."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                num_attention_heads=heads, num_key_value_heads=kv_heads, tie_word_embeddings=True,
                max_position_embeddings=2048, bos_token_id=1, eos_token_id=2, dtype=dtype).save_pretrained(folder)
    block = torch.randn(BLOCK, generator=torch.Generator().manual_seed(seed)) * 0.02
    all_shapes = shapes(hidden, intermediate, layers, heads, kv_heads, vocab)
    shards: list[list[str]] = []  # keys per shard; the tensors are freed once written
    current, size, total = {}, 0, 0
    for i, (key, shape) in enumerate(all_shapes.items()):
        current[key] = fill(shape, block, 7919 * i, dtype)
        size += current[key].numel() * current[key].element_size()
        if size >= shard_bytes or i == len(all_shapes) - 1:
            shards.append(list(current))
            save_file(current, folder / f"shard-{len(shards)}.safetensors")
            total += size
            current, size = {}, 0
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for i, name in enumerate(names):
        (folder / f"shard-{i + 1}.safetensors").rename(folder / name)
    weight_map = {key: names[i] for i, keys in enumerate(shards) for key in keys}
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    return all_shapes
