"""models/gguf_convert.py: a GGUF file becomes a safetensors folder one tensor at a time, with transformers' values."""

from __future__ import annotations

import gc
import json
import weakref

import numpy as np
import pytest
import torch
from safetensors import safe_open

from tunesmith.models.gguf_convert import write_safetensors


def test_safetensors_written_from_a_stream_read_back_and_hold_one_tensor_at_a_time(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {"a.weight": rng.standard_normal((5, 3)).astype(np.float32), "b.bias": np.zeros(0, np.float32),
              "c": rng.standard_normal((7,)).astype(np.float16), "d.weight": rng.standard_normal((2, 2, 3)).astype(np.float32)}
    alive: list[weakref.ref] = []

    def stream():
        for name, array in arrays.items():
            gc.collect()
            assert sum(r() is not None for r in alive) == 0  # the writer kept none of the earlier arrays
            copy = array.copy()
            alive.append(weakref.ref(copy))
            yield name, copy
            del copy

    path = tmp_path / "model.safetensors"
    write_safetensors(path, stream())
    with safe_open(path, "pt") as f:
        assert sorted(f.keys()) == sorted(arrays)
        for name, array in arrays.items():
            assert torch.equal(f.get_tensor(name), torch.from_numpy(array))
    header_len = int.from_bytes(path.read_bytes()[:8], "little")
    assert header_len % 8 == 0  # the data starts aligned, as safetensors itself writes
    assert json.loads(path.read_bytes()[8 : 8 + header_len])["__metadata__"] == {"format": "pt"}
    assert not (tmp_path / "model.safetensors.body").exists()


@pytest.mark.integration
@pytest.mark.slow  # transformers parses the GGUF metadata (49,152 tokens) slowly: ~45 s on 2 busy cores
def test_the_built_in_model_converts_to_exactly_what_transformers_loads():
    """Every tensor of the cached conversion of the built-in GGUF file equals transformers' own GGUF loader's
    (same dequantization, same llama q/k permutation, same names), and the config names the class."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    from tunesmith.config import DEFAULT_MODEL, ModelConfig
    from tunesmith.models.loading import BUILTIN_MODELS, builtin_gguf_path, resolve_model_folder

    folder = resolve_model_folder(ModelConfig())
    gguf_path = builtin_gguf_path(*BUILTIN_MODELS[DEFAULT_MODEL])
    config = AutoConfig.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    with init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(config)
    theirs = load_gguf_checkpoint(str(gguf_path), return_tensors=True, model_to_load=skeleton)["tensors"]
    with safe_open(folder / "model.safetensors", "pt") as ours:
        assert sorted(ours.keys()) == sorted(theirs)
        for name, tensor in theirs.items():
            assert torch.equal(ours.get_tensor(name), tensor), name
    saved = json.loads((folder / "config.json").read_text())
    assert saved["architectures"] == ["LlamaForCausalLM"] and saved["dtype"] == "float32"
    assert saved["num_key_value_heads"] == config.num_key_value_heads and saved["tie_word_embeddings"] is True
