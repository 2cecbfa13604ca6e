"""A llama-family transformers model to one GGUF file that llama.cpp, Ollama and transformers load.

Written with the `gguf` package (llama.cpp's own Python writer), so no llama.cpp build is needed:

    metadata   general.*, llama.* (the shapes config.json holds), tokenizer.ggml.* (vocabulary, token
               types, BPE merges, special ids, chat template)
    tensors    transformers' names mapped to GGUF's (model.layers.3.self_attn.q_proj.weight ->
               blk.3.attn_q.weight), each in the chosen type

Two layout facts. (1) Rotary embeddings: transformers rotates the two halves of each head's
dimensions (x_i with x_{i+d/2}, `rotate_half`); llama.cpp rotates adjacent pairs (x_{2i} with
x_{2i+1}). The same attention comes out when the rows of q_proj and k_proj are reordered within each
head so that row 2i is transformers' row i and row 2i+1 its row i+d/2 (`rotary_interleave` below);
transformers' GGUF loader applies the inverse when it reads the file back. (2) Norm weights and
other 1-D tensors stay F32 whatever the type, as llama.cpp's converter keeps them.

Types, per 2-D weight (GGML's block formats, gguf.quants implements them):
    f32    4 bytes per weight
    f16    2 bytes
    q8_0   blocks of 32 weights: one f16 scale d = max|w| / 127 and 32 int8 q = round(w / d): 8.5 bits
    q4_1   blocks of 32 weights: an f16 scale d = (max - min) / 15, an f16 minimum m and 32 4-bit
           q = round((w - m) / d), so w ~ d q + m: 5 bits (the default model ships in it)
    q4_0   blocks of 32 weights: one f16 scale d = w_maxabs / -8 (the signed extreme) and 32 4-bit
           q = clamp(round(w / d) + 8, 0, 15): 4.5 bits
A weight whose rows are not a multiple of 32 long cannot be blocked and is written f16 instead. With
q4_0 and q4_1 the token embedding and output head stay q8_0, as llama.cpp's own quantizer keeps them.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from tunesmith.errors import UserError

log = logging.getLogger(__name__)

TYPES = ("f32", "f16", "q8_0", "q4_1", "q4_0")
BLOCK = 32  # weights per q8_0 / q4_0 block

# llama.cpp picks its pre-tokenizer (the regex that splits text before BPE) by a name in the file.
# It recognises a tokenizer by hashing its output on a fixed text, which needs llama.cpp; here the
# pre-tokenizer section of tokenizer.json is matched instead (see pre_tokenizer_name).
GPT2_SPLIT = {"type": "ByteLevel", "use_regex": True}
DIGITS_SPLIT = {"type": "Digits", "individual_digits": True}


def export_gguf(model, tokenizer, out: Path, gguf_type: str = "f16", name: str | None = None) -> Path:
    """Write `model` (a transformers Llama-family causal LM in memory, float weights) and its tokenizer to `out`."""
    import gguf

    if gguf_type not in TYPES:
        raise UserError(f"--type {gguf_type!r} is not one of {', '.join(TYPES)}.")
    config = model.config
    check_architecture(config)
    writer = gguf.GGUFWriter(str(partial_path(out)), "llama")
    write_model_metadata(writer, config, gguf_type, name or out.stem)
    write_tokenizer_metadata(writer, tokenizer, config.vocab_size)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    for hf_name, tensor in model.state_dict().items():
        if hf_name == "lm_head.weight" and config.tie_word_embeddings:
            continue  # llama.cpp reads the head from token_embd when output.weight is absent
        gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise UserError(f"{hf_name} has no GGUF name for the llama architecture; this model cannot be exported.")
        array = to_gguf_layout(hf_name, tensor.detach().float().cpu().numpy(), config)
        data, raw_type = encode(array, tensor_type(gguf_name, gguf_type))
        writer.add_tensor(gguf_name, data, raw_dtype=raw_type)
    return finish(writer, out)


def partial_path(out: Path) -> Path:
    """Where a GGUF is written before it is complete: a kill mid-write leaves `out` as it was."""
    out.parent.mkdir(parents=True, exist_ok=True)
    return out.with_name(out.name + ".partial")


def finish(writer, out: Path) -> Path:
    """Write the file the writer was given (partial_path(out)), then move it onto `out` in one step."""
    import os

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file(progress=False)
    writer.close()
    os.replace(partial_path(out), out)
    return out


def check_architecture(config) -> None:
    """What this writer covers: LlamaForCausalLM (SmolLM, Llama 1-3 without rope scaling, TinyLlama, ...)."""
    archs = getattr(config, "architectures", None) or []
    if config.model_type != "llama" or (archs and archs[0] != "LlamaForCausalLM"):
        raise UserError(f"GGUF export covers Llama-family models (LlamaForCausalLM); this one is {config.model_type} "
                        f"({', '.join(archs) or 'no architecture'}).")
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind not in ("default", None):
        raise UserError(f"rope scaling {kind!r} is not exported yet (only unscaled rotary embeddings).")
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        raise UserError("Llama models with biases in attention or MLP are not exported yet.")


def rope_theta(config) -> float:
    rope = getattr(config, "rope_parameters", None) or {}
    return float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0)))


def head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


FILE_TYPES = {"f32": 0, "f16": 1, "q4_0": 2, "q4_1": 3, "q8_0": 7}  # llama.cpp's LLAMA_FTYPE_ALL_F32, MOSTLY_F16, ...


def write_model_metadata(writer, config, gguf_type: str, name: str) -> None:
    import gguf

    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(rope_theta(config))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_rope_dimension_count(head_dim(config))
    writer.add_file_type(FILE_TYPES[gguf_type])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def write_tokenizer_metadata(writer, tokenizer, vocab_size: int) -> None:
    """A byte-level BPE tokenizer (tokenizer.json, GPT-2 style: SmolLM, Llama 3) as tokenizer.ggml.*."""
    import gguf

    spec = json.loads(tokenizer.backend_tokenizer.to_str()) if getattr(tokenizer, "is_fast", False) else None
    if spec is None or spec["model"]["type"] != "BPE" or not is_byte_level(spec):
        raise UserError("GGUF export covers byte-level BPE tokenizers (tokenizer.json, as SmolLM and Llama 3 use); "
                        "this model's tokenizer is another kind.")
    vocab = spec["model"]["vocab"]
    added = {t["id"]: t for t in spec.get("added_tokens", [])}
    tokens, types = [], []
    by_id = {i: t for t, i in vocab.items()}
    by_id.update({i: t["content"] for i, t in added.items()})
    for i in range(vocab_size):  # rows past the tokenizer's vocabulary (padding the embedding) are unused
        tokens.append(by_id.get(i, f"[PAD{i}]"))
        if i in added:
            types.append(gguf.TokenType.CONTROL if added[i]["special"] else gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL if i in by_id else gguf.TokenType.UNUSED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre_tokenizer_name(spec))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for key, add in (("bos_token_id", writer.add_bos_token_id), ("eos_token_id", writer.add_eos_token_id),
                     ("unk_token_id", writer.add_unk_token_id), ("pad_token_id", writer.add_pad_token_id)):
        if getattr(tokenizer, key, None) is not None:
            add(getattr(tokenizer, key))
    writer.add_add_bos_token(bool(getattr(tokenizer, "add_bos_token", False)))
    writer.add_add_space_prefix(False)  # byte-level BPE marks spaces itself
    if getattr(tokenizer, "chat_template", None):
        writer.add_chat_template(tokenizer.chat_template)


def is_byte_level(spec: dict) -> bool:
    decoder = spec.get("decoder") or {}
    kinds = [decoder.get("type")] + [d.get("type") for d in decoder.get("decoders", [])]
    return "ByteLevel" in kinds


def pre_tokenizer_name(spec: dict) -> str:
    """llama.cpp's name of the split tokenizer.json describes: GPT-2's regex alone is "gpt-2" (the default
    model's tokenizer as transformers reads it from GGUF); single digits, then GPT-2's regex, is "smollm" (SmolLM's
    tokenizer.json). Anything else is written as "default", which llama.cpp accepts with a warning."""
    pre = spec.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    shape = [{k: step.get(k) for k in ("type", "use_regex", "individual_digits") if k in step} for step in steps]
    if shape == [GPT2_SPLIT]:
        return "gpt-2"
    if shape == [DIGITS_SPLIT, GPT2_SPLIT]:
        return "smollm"
    log.warning("this tokenizer's pre-tokenizer (%s) has no llama.cpp name tunesmith knows; the GGUF says "
                "'default', which llama.cpp accepts with a warning", json.dumps(pre)[:200])
    return "default"


def rotary_interleave(w: np.ndarray, heads: int) -> np.ndarray:
    """Rows of q_proj/k_proj from transformers' half-split rotary layout to llama.cpp's adjacent pairs: within each
    head of d rows, new row 2i = old row i, new row 2i+1 = old row i + d/2."""
    d = w.shape[0] // heads
    return w.reshape(heads, 2, d // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def to_gguf_layout(hf_name: str, w: np.ndarray, config) -> np.ndarray:
    if hf_name.endswith("self_attn.q_proj.weight"):
        return rotary_interleave(w, config.num_attention_heads)
    if hf_name.endswith("self_attn.k_proj.weight"):
        return rotary_interleave(w, config.num_key_value_heads)
    return w


def tensor_type(gguf_name: str, gguf_type: str) -> str:
    """The type of one tensor: `gguf_type`, except that the 4-bit types keep the token embedding and the output
    head at q8_0, as llama.cpp's quantizer keeps them above 4 bits (and the default model's own GGUF file does): every
    token's logits pass through the head, and at 4 bits it alone moves the default model's answers (docs/export.md)."""
    if gguf_type.startswith("q4") and gguf_name in ("token_embd.weight", "output.weight"):
        return "q8_0"
    return gguf_type


def encode(w: np.ndarray, gguf_type: str):
    """(data, GGML type) of one tensor: 1-D tensors F32; 2-D ones in `gguf_type` (F16 where rows cannot be blocked)."""
    from gguf import GGMLQuantizationType as Q
    from gguf.quants import quantize

    if w.ndim < 2 or gguf_type == "f32":
        return np.ascontiguousarray(w, dtype=np.float32), Q.F32
    if gguf_type == "f16" or w.shape[-1] % BLOCK:
        return np.ascontiguousarray(w, dtype=np.float16), Q.F16
    qtype = {"q8_0": Q.Q8_0, "q4_1": Q.Q4_1, "q4_0": Q.Q4_0}[gguf_type]
    return quantize(np.ascontiguousarray(w, dtype=np.float32), qtype), qtype
