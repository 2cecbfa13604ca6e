"""A LoRA adapter alone as a GGUF LoRA file, which llama.cpp applies to its base at load time
(`llama-cli -m base.gguf --lora adapter.gguf`), so one base file serves several adapters.

The file holds, per adapted linear layer, A (r x in) and B (out x r) under the base tensor's GGUF
name plus `.lora_a` / `.lora_b`, and the metadata general.type = "adapter", adapter.type = "lora",
adapter.lora.alpha. llama.cpp adds

    W x + (alpha / r) B A x

so an adapter whose scale is not alpha / r stores the alpha that gives its own scale: rsLoRA scales
by alpha / sqrt(r) and is written with alpha' = alpha * sqrt(r). B's rows of q_proj and k_proj are
reordered per head as the base weights are (gguf.py: rotary_interleave): (P W) + s (P B) A = P (W + s B A).
DoRA's magnitude rescaling and VeRA's shared matrices have no GGUF LoRA form; such adapters are merged
and exported whole instead (tunesmith export --adapter DIR --format gguf).
"""

from __future__ import annotations

import math
from pathlib import Path

from tunesmith.errors import UserError
from tunesmith.export.gguf import encode, finish, partial_path, rotary_interleave


def export_gguf_lora(adapter_dir: Path, base_config, out: Path, gguf_type: str = "f32") -> Path:
    """Write the PEFT-format LoRA adapter in `adapter_dir` (for a base whose transformers config is
    `base_config`) to `out` in `gguf_type` (f32 or f16: llama.cpp keeps adapters small already)."""
    import gguf

    from tunesmith.export.gguf import check_architecture
    from tunesmith.files import read_json, read_safetensors
    from tunesmith.methods.io import CONFIG_NAME, PREFIX, WEIGHTS_NAME

    if gguf_type not in ("f32", "f16"):
        raise UserError(f"a GGUF LoRA file is written in f32 or f16, not {gguf_type}.")
    check_architecture(base_config)
    cfg = read_json(adapter_dir / CONFIG_NAME, "adapter config")
    if cfg.get("peft_type") != "LORA" or cfg.get("use_dora"):
        kind = "DoRA" if cfg.get("use_dora") else cfg.get("peft_type", "this method")
        raise UserError(f"{adapter_dir}: {kind} adapters have no GGUF LoRA form (llama.cpp adds B A x only); "
                        "merge and export the whole model: tunesmith export --adapter DIR --format gguf.")
    tensors = read_safetensors(adapter_dir / WEIGHTS_NAME, "adapter weights")
    embedded = sorted({k[len(PREFIX):].rsplit(".", 1)[0] for k in tensors if ".lora_embedding_" in k})
    if embedded:  # llama.cpp's LoRA adapts matrices of linear layers only; skipping these would lose them silently
        raise UserError(f"{adapter_dir}: the adapter has LoRA on the embedding table {', '.join(embedded)}, which a "
                        "GGUF LoRA file cannot hold; merge and export the whole model: tunesmith export --adapter DIR "
                        "--format gguf.")
    r, alpha = int(cfg["r"]), float(cfg["lora_alpha"])
    gguf_alpha = alpha * math.sqrt(r) if cfg.get("use_rslora") else alpha  # llama.cpp scales by alpha / r
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, base_config.num_hidden_layers)
    writer = gguf.GGUFWriter(str(partial_path(out)), "llama")
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, gguf_alpha)
    for key in sorted(k for k in tensors if k.endswith(".lora_A.weight")):
        module = key[len(PREFIX):-len(".lora_A.weight")]
        base_name = names.get_name(module + ".weight", try_suffixes=(".weight",))
        if base_name is None:
            raise UserError(f"{adapter_dir}: the adapted module {module} has no GGUF name for the llama architecture.")
        a = tensors[key].float().numpy()
        b = tensors[f"{PREFIX}{module}.lora_B.weight"].float().numpy()
        if module.endswith("self_attn.q_proj"):
            b = rotary_interleave(b, base_config.num_attention_heads)
        elif module.endswith("self_attn.k_proj"):
            b = rotary_interleave(b, base_config.num_key_value_heads)
        for suffix, w in ((".lora_a", a), (".lora_b", b)):
            data, raw = encode(w, gguf_type)
            writer.add_tensor(base_name + suffix, data, raw_dtype=raw)
    return finish(writer, out)
