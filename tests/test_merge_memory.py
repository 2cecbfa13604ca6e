"""A recipe merge holds a row chunk of each input, not whole models (docs/merging.md, Memory), and streaming changes
no bit: with chunks of a few rows, every streamed method writes what the whole-tensor path (the one checked
against mergekit in tests/test_merge_methods.py) writes; no read is larger than a chunk; the artifact check runs
without loading the model whole. bench/merge.py measures the peak RSS on models of the default size."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from safetensors.torch import load_file
from test_merge_methods import recipe, save_models

from tunesmith.merge import run as merge_run
from tunesmith.merge import tensors
from tunesmith.merge.config import parse_recipe
from tunesmith.merge.run import merge_recipe
from tunesmith.merge.task_arithmetic import frame_stream, task_arithmetic_frame
from tunesmith.merge.ties import sorted_magnitudes as SORTED
from tunesmith.merge.ties import trim, trim_plan

CHUNK = 1024  # bytes: eight rows of the tiny model's fp32 tensors (hidden size 32), so every tensor is many chunks
# streamed methods, as tests/test_merge_methods.py writes them, plus the variants with another sparsify path
EXTRA = {
    "ties_rescaled": ("ties", {"rescale": True}),
    "dare_ties_paper": ("dare_ties", {"variant": "paper"}),
    "dare_linear_rescaled": ("dare_linear", {"rescale": True}),
}


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, str]:
    return save_models(tmp_path_factory.mktemp("memory"), tie=True)


GET_METHOD = merge_run.get_merge_method


def merge(tree: dict, out, monkeypatch, streamed: bool) -> tuple[dict, list[int], int]:
    """The merged tensors, the size of every read (streamed in CHUNK-byte row chunks, or by whole tensors) and
    how many of them the merge made (the rest are the check's)."""
    reads, merged = [], []
    with monkeypatch.context() as m:
        m.setattr(tensors, "READ_HOOK", lambda name, nbytes: reads.append(nbytes))
        if streamed:
            m.setattr(tensors, "CHUNK_BYTES", CHUNK)
            m.setattr(tensors, "ELEMENTWISE_CHUNK_BYTES", CHUNK)
        else:
            m.setattr(merge_run, "get_merge_method",
                      lambda name: dataclasses.replace(GET_METHOD(name), elementwise=False, sparsify_=None))
        on_phase = lambda phase: merged.append(len(reads)) if phase == "merge" else None
        merge_recipe(parse_recipe(tree), out, seed=0, on_phase=on_phase)
    return load_file(out / "model.safetensors"), reads, merged[0]


@pytest.mark.parametrize("name", ["linear", "ties", "dare_ties", *EXTRA])
def test_streamed_merges_equal_whole_tensor_merges_bit_for_bit(name, models, tmp_path, monkeypatch):
    base_name, parameters = EXTRA.get(name, (name, {}))
    tree = recipe(base_name, models)
    tree["parameters"] = {**tree.get("parameters", {}), **parameters}
    streamed, reads, merged = merge(tree, tmp_path / "streamed", monkeypatch, streamed=True)
    whole, _, _ = merge(tree, tmp_path / "whole", monkeypatch, streamed=False)
    assert streamed.keys() == whole.keys()
    for key in whole:
        assert torch.equal(streamed[key], whole[key]), key
    # the embeddings are 320 x 32 fp32 (40 KiB): no read, of the merge or of the check, takes more than a chunk,
    # but the check's, which reads each module's weights whole, one at a time
    assert max(reads[:merged]) <= CHUNK
    assert max(reads) <= 320 * 32 * 4


def test_the_check_of_a_merge_never_loads_the_model_whole(models, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    def refuse(*args, **kwargs):
        raise AssertionError("check_merged_folder loaded the whole model")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", refuse)
    out = tmp_path / "out"
    merge_recipe(parse_recipe(recipe("linear", models)), out, seed=0)
    assert (out / "model.safetensors").is_file()


@pytest.mark.parametrize("kind", ["distinct", "ties_at_threshold", "ties_sorted_in_a_file", "zero_threshold",
                                  "negative_zeros"])
def test_ties_threshold_keeps_the_entries_argsort_keeps(kind, monkeypatch):
    """TIES' top-k without argsort equals `trim` (argsort) bit for bit; where ties at the threshold leave a
    choice, argsort decides (trim_plan sorts then, in memory or, above SPILL_BYTES, in a scratch file's mapping)."""
    from tunesmith.merge import ties

    sorts = []
    monkeypatch.setattr(ties, "sorted_magnitudes", lambda *a: sorts.append(1) or SORTED(*a))
    if kind == "ties_sorted_in_a_file":
        monkeypatch.setattr(ties, "SPILL_BYTES", 0)
    g = torch.Generator().manual_seed(0)
    base = torch.randn(64, 48, generator=g)
    tensors_ = [base + 1e-2 * torch.randn(64, 48, generator=g) for _ in range(2)]
    if kind in ("ties_at_threshold", "ties_sorted_in_a_file"):  # few magnitudes: many equal the k-th largest
        tensors_ = [base + 1e-2 * torch.randint(-3, 4, (64, 48), generator=g).float() for _ in range(2)]
    if kind in ("zero_threshold", "negative_zeros"):  # most of the task vector is exactly 0
        for t in tensors_:
            t[8:] = base[8:]
    if kind == "negative_zeros":
        base[8:10] = 0.0
        tensors_[0][8:10] = -0.0
    shared = {"normalize": True, "lambda": 1.0, "rescale": True, "variant": "mergekit"}
    per_model = [{"weight": 0.6, "density": 0.5}, {"weight": 0.4, "density": 0.3}]
    whole = task_arithmetic_frame(base, tensors_, shared, per_model, sparsify=trim, consensus=True)
    chunks = [slice(i, min(i + 5, 64)) for i in range(0, 64, 5)]
    streamed = torch.cat(list(frame_stream(lambda rows: base[rows], [lambda rows, t=t: t[rows] for t in tensors_],
                                           base.shape, base.dtype, chunks, shared, per_model, trim_plan, True)))
    assert torch.equal(streamed, whole)
    assert torch.equal(streamed.signbit(), whole.signbit())
    assert bool(sorts) == kind.startswith("ties_")  # the sort runs only where ties leave argsort a choice


def test_a_read_is_a_private_mapping_that_writing_into_never_changes_the_file(tmp_path):
    from safetensors.torch import save_file

    weight = torch.arange(4096 * 3, dtype=torch.float32).reshape(3, 4096)  # rows of 16 KiB, after "a" and the
    # header: no read starts on a page boundary, so each mapping starts at the page below its first byte
    save_file({"a": torch.ones(5), "w": weight}, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text("{}")
    files = tensors.ModelTensors(tmp_path)
    rows = files.get("w", slice(1, 3))
    assert torch.equal(rows, weight[1:3])
    rows.mul_(-1)  # copy-on-write: this process's pages change, the file's do not
    assert torch.equal(files.get("w"), weight)
    assert torch.equal(load_file(tmp_path / "model.safetensors")["w"], weight)
    assert files.get("w", slice(3, 3)).shape == (0, 4096)


def test_merging_into_one_of_the_inputs_is_refused(models, tmp_path):
    from tunesmith.errors import UserError

    tree = recipe("linear", models)
    with pytest.raises(UserError, match="is one of the merge's inputs"):
        merge_recipe(parse_recipe(tree), tree["models"][1]["model"], seed=0)
