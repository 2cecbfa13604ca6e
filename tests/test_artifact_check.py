"""The check every written model folder goes through (tunesmith/export/check.py): each fault users meet
after a save is found and named, and a good folder passes."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import build_tiny_model, build_tiny_tokenizer
from safetensors.torch import load_file, save_file

from tunesmith.export.check import ArtifactCheckError, check_saved_model


def saved(tmp_path, tie: bool = True):
    model, tokenizer = build_tiny_model(tie=tie), build_tiny_tokenizer()
    model.save_pretrained(tmp_path, safe_serialization=True)
    tokenizer.save_pretrained(tmp_path)
    return model, tokenizer


def test_a_good_folder_passes(tmp_path):
    model, tokenizer = saved(tmp_path)
    check_saved_model(tmp_path, model, tokenizer)


def test_a_trained_head_saved_as_tied_is_found(tmp_path):
    """The head was untied and trained, but config.json still ties it: on reload the head would be the embeddings."""
    model, tokenizer = build_tiny_model(tie=True), build_tiny_tokenizer()
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone() + 0.1)
    model.save_pretrained(tmp_path, safe_serialization=True)
    tokenizer.save_pretrained(tmp_path)
    with pytest.raises(ArtifactCheckError, match="tie_word_embeddings is true but the output head differs"):
        check_saved_model(tmp_path, model, tokenizer)


def test_a_lost_chat_template_is_found(tmp_path):
    model, tokenizer = saved(tmp_path)
    config_path = tmp_path / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config.pop("chat_template", None)
    config_path.write_text(json.dumps(config))
    (tmp_path / "chat_template.jinja").unlink(missing_ok=True)
    with pytest.raises(ArtifactCheckError, match="chat template"):
        check_saved_model(tmp_path, model, tokenizer)


def test_missing_tokenizer_files_are_found(tmp_path):
    model, tokenizer = saved(tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        (tmp_path / name).unlink(missing_ok=True)
    with pytest.raises(ArtifactCheckError, match="tokenizer does not load"):
        check_saved_model(tmp_path, model, tokenizer)


def test_a_changed_weight_and_a_wrong_dtype_are_found(tmp_path):
    model, tokenizer = saved(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    weights["model.layers.1.mlp.up_proj.weight"][0, 0] += 1.0
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ArtifactCheckError, match="model.layers.1.mlp.up_proj.weight differs"):
        check_saved_model(tmp_path, model, tokenizer)
    with pytest.raises(ArtifactCheckError, match="stored as torch.float32, not torch.bfloat16"):
        check_saved_model(tmp_path, model, tokenizer, dtype=torch.bfloat16)


def test_a_vocabulary_larger_than_the_embedding_is_found(tmp_path):
    model, tokenizer = saved(tmp_path)
    tokenizer.add_tokens([f"<extra_{i}>" for i in range(40)])  # 360 tokens, 320 embedding rows
    tokenizer.save_pretrained(tmp_path)
    with pytest.raises(ArtifactCheckError, match="360 tokens but the embedding only 320 rows"):
        check_saved_model(tmp_path, model, tokenizer)


def test_different_answers_are_found(tmp_path, monkeypatch):
    """Weights equal but answers not (e.g. a generation config or a tokenizer that encodes otherwise)."""
    from tunesmith.export import check

    model, tokenizer = saved(tmp_path)
    calls = iter([["a", "b", "c"], ["a", "x", "c"]])
    monkeypatch.setattr("tunesmith.evaluate.generate.generate", lambda *a, **k: next(calls))
    with pytest.raises(ArtifactCheckError, match="greedy answer to .* changed from 'b' to 'x'"):
        check.check_saved_model(tmp_path, model, tokenizer)


def test_a_streamed_merge_folder_is_checked_without_a_model_in_memory(tmp_path):
    from tunesmith.export.check import check_merged_folder

    model, _ = saved(tmp_path)
    planned = {name: torch.float32 for name in model.state_dict()}
    check_merged_folder(tmp_path, tmp_path, planned)
    with pytest.raises(ArtifactCheckError, match="stored as torch.float32, not torch.bfloat16"):
        check_merged_folder(tmp_path, tmp_path, {**planned, "model.norm.weight": torch.bfloat16})
    weights = load_file(tmp_path / "model.safetensors")
    del weights["model.layers.0.mlp.down_proj.weight"]
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ArtifactCheckError, match="weights missing from the files: model.layers.0.mlp.down_proj"):
        check_merged_folder(tmp_path, tmp_path, planned)


def test_a_merge_folder_that_lost_the_donors_chat_template_is_found(tmp_path):
    """The donor's template is read from its files (no second tokenizer load) and must survive in the merge."""
    import shutil

    from tunesmith.export.check import check_merged_folder

    donor, merged = tmp_path / "donor", tmp_path / "merged"
    model, _ = saved(donor)
    assert (donor / "chat_template.jinja").is_file() or "chat_template" in (donor / "tokenizer_config.json").read_text()
    shutil.copytree(donor, merged)
    planned = {name: torch.float32 for name in model.state_dict()}
    check_merged_folder(merged, donor, planned)
    (merged / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((merged / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (merged / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(ArtifactCheckError, match="the chat template is missing"):
        check_merged_folder(merged, donor, planned)
