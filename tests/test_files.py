"""tunesmith/files.py: atomic writes that never leave a half-written file, strict reads that name the file."""

from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import save_file

from tunesmith import files
from tunesmith.errors import UserError


def saved(tmp_path, tensors=None):
    path = tmp_path / "weights.safetensors"
    save_file(tensors or {"a": torch.ones(4, 3), "b": torch.zeros(5)}, path)
    return path


# --- reading ---------------------------------------------------------------------------------


def test_reads_back_what_it_wrote(tmp_path):
    path = tmp_path / "w.safetensors"
    files.atomic_save_safetensors({"a": torch.arange(6.0).view(2, 3).t()}, path)  # non-contiguous in
    assert torch.equal(files.read_safetensors(path, "test weights")["a"], torch.arange(6.0).view(2, 3).t())


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty", "missing"])
def test_unreadable_safetensors_is_a_user_error_naming_the_file(tmp_path, damage):
    path = saved(tmp_path)
    data = path.read_bytes()
    if damage == "truncated":
        path.write_bytes(data[: len(data) - 7])
    elif damage == "garbage":
        path.write_bytes(b"this is not a safetensors file at all")
    elif damage == "empty":
        path.write_bytes(b"")
    else:
        path.unlink()
    for read in (files.read_safetensors, files.check_safetensors):
        with pytest.raises(UserError) as e:
            read(path, "the test's weights")
        assert str(path) in str(e.value) and "the test's weights" in str(e.value)
        assert ("does not exist" if damage == "missing" else "corrupt") in str(e.value)


def test_invalid_json_and_torch_files_are_user_errors(tmp_path):
    (tmp_path / "s.json").write_text("{not json")
    with pytest.raises(UserError, match="s.json.*not valid JSON.*settings"):
        files.read_json(tmp_path / "s.json", "settings")
    (tmp_path / "o.pt").write_bytes(b"not a torch file")
    with pytest.raises(UserError, match="o.pt.*corrupt.*optimizer state"):
        files.read_torch(tmp_path / "o.pt", "optimizer state")


# --- strict keys -----------------------------------------------------------------------------


def expected():
    return {"a": torch.empty(4, 3), "b": torch.empty(5)}


@pytest.mark.parametrize("change,words", [
    ("missing", ["1 missing", "'b'"]),
    ("unexpected", ["1 unexpected", "'c'"]),
    ("shape", ["wrong shape", "a has shape (3, 4), expected (4, 3)"]),
])
def test_key_mismatch_is_a_user_error_naming_the_file(tmp_path, change, words):
    tensors = {"a": torch.ones(4, 3), "b": torch.zeros(5)}
    if change == "missing":
        del tensors["b"]
    elif change == "unexpected":
        tensors["c"] = torch.zeros(1)
    else:
        tensors["a"] = torch.ones(3, 4)
    path = saved(tmp_path, tensors)
    target = expected()
    with pytest.raises(UserError) as e:
        files.load_state_strict(target, files.read_safetensors(path, "w"), path, what="the test model")
    message = str(e.value)
    assert str(path) in message and "the test model" in message
    assert all(w in message for w in words), message


def test_nothing_is_copied_when_keys_do_not_match(tmp_path):
    target = {"a": torch.zeros(4, 3), "b": torch.zeros(5)}
    with pytest.raises(UserError):
        files.load_state_strict(target, {"a": torch.ones(4, 3), "b": torch.ones(6)}, tmp_path / "x")
    assert target["a"].abs().sum() == 0  # checked first, copied after: no half-loaded model


def test_message_is_bounded_for_many_mismatches(tmp_path):
    many = {f"layer.{i}.weight": torch.zeros(2) for i in range(5000)}
    with pytest.raises(UserError) as e:
        files.check_keys({"x": torch.zeros(1)}, many, tmp_path / "big.safetensors")
    message = str(e.value)
    assert "5000 unexpected" in message and "and 4997 more" in message and "1 missing" in message
    assert len(message) < 1000


def test_required_subset_and_module_target(tmp_path):
    module = torch.nn.Linear(3, 2)
    files.load_state_strict(module, {"weight": torch.ones(2, 3, dtype=torch.float64)}, tmp_path / "x", required=())
    assert module.weight.dtype == torch.float32 and torch.equal(module.weight, torch.ones(2, 3))
    with pytest.raises(UserError, match="1 missing key.*'bias'"):
        files.load_state_strict(module, {"weight": torch.ones(2, 3)}, tmp_path / "x")


# --- atomic writes ---------------------------------------------------------------------------


def test_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    path = tmp_path / "summary.json"
    files.atomic_write_json(path, {"old": 1})
    before = path.read_bytes()

    def half_then_fail(tmp):
        tmp.write_bytes(b'{"new": ')  # the serializer dies midway
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        files.atomic_write(path, half_then_fail)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["summary.json"]


def test_failed_rename_keeps_the_old_safetensors_and_leaves_no_temp(tmp_path, monkeypatch):
    path = tmp_path / "adapter_model.safetensors"
    files.atomic_save_safetensors({"a": torch.ones(3)}, path)

    def no_rename(src, dst):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(files.os, "replace", no_rename)
    with pytest.raises(PermissionError):
        files.atomic_save_safetensors({"a": torch.zeros(3)}, path)
    monkeypatch.undo()
    assert torch.equal(files.read_safetensors(path, "w")["a"], torch.ones(3))
    assert os.listdir(tmp_path) == ["adapter_model.safetensors"]


def test_serializer_error_keeps_the_old_file(tmp_path, monkeypatch):
    import safetensors.torch

    path = tmp_path / "w.safetensors"
    files.atomic_save_safetensors({"a": torch.ones(3)}, path)

    def broken(tensors, filename, metadata=None):
        open(filename, "wb").write(b"partial")
        raise RuntimeError("serializer died")

    monkeypatch.setattr(safetensors.torch, "save_file", broken)
    with pytest.raises(RuntimeError, match="serializer died"):
        files.atomic_save_safetensors({"a": torch.zeros(3)}, path)
    monkeypatch.undo()
    assert torch.equal(files.read_safetensors(path, "w")["a"], torch.ones(3))
    assert os.listdir(tmp_path) == ["w.safetensors"]


def test_text_and_torch_writes_round_trip(tmp_path):
    files.atomic_write_text(tmp_path / "r.md", "héllo\n")
    assert (tmp_path / "r.md").read_text(encoding="utf-8") == "héllo\n"
    files.atomic_torch_save({"step": torch.tensor(3), "nested": [torch.ones(2)]}, tmp_path / "s.pt")
    loaded = files.read_torch(tmp_path / "s.pt", "state")
    assert loaded["step"] == 3 and torch.equal(loaded["nested"][0], torch.ones(2))


# --- every loader goes through it ------------------------------------------------------------

SETTINGS = {"vera": {"r": 8}, "freeze": {"trainable_blocks": 1},
            "peft": {"peft_config": {"peft_type": "IA3", "target_modules": ["k_proj", "down_proj"],
                                     "feedforward_modules": ["down_proj"]}}}


@pytest.mark.parametrize("name", ["lora", "lora_fa", "dora", "vera", "delta_lora", "adapter", "full", "freeze", "peft"])
def test_every_methods_artifact_cut_short_is_a_user_error_naming_the_file(tmp_path, name):
    from conftest import build_tiny_model

    from tunesmith.config import MethodConfig
    from tunesmith.methods.registry import get_method, load_artifact

    if name == "peft":
        pytest.importorskip("peft")
    cfg = MethodConfig(name=name, **{"r": 4, "alpha": 8, **SETTINGS.get(name, {})})
    method = get_method(name)
    model = build_tiny_model()
    method.apply(model, cfg)
    method.save(model, tmp_path, cfg, "tiny")
    weights = sorted(tmp_path.glob("*.safetensors"))
    assert weights
    for path in weights:
        path.write_bytes(path.read_bytes()[:100])  # an interrupted copy
    with pytest.raises(UserError) as e:
        load_artifact(build_tiny_model(), tmp_path)
    assert any(str(path) in str(e.value) for path in weights), str(e.value)


def test_model_folder_with_a_truncated_weights_file_is_a_user_error(tmp_path):
    from conftest import build_tiny_model

    from tunesmith.config import ModelConfig
    from tunesmith.models.loading import resolve_model_folder

    build_tiny_model().save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])
    with pytest.raises(UserError, match="model.safetensors.*corrupt"):
        resolve_model_folder(ModelConfig(name_or_path=str(tmp_path)))
