"""`tunesmith eval CONFIG --adapter A --adapter B --base` (tunesmith/evaluate/compare.py) on the tiny model:
what each path is, and one table of several artifacts with paired differences from the first."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import build_tiny_model, build_tiny_tokenizer, lora_model
from tunesmith.config import MethodConfig, load_config
from tunesmith.errors import UserError
from tunesmith.evaluate.compare import artifact_kind, targets


@pytest.fixture
def artifacts(tmp_path):
    """A tiny model folder, the same weights saved again as a "merged" model folder, a LoRA adapter (B random, so
    it changes the model) in a run directory, and a test file of free-text answers."""
    model, method = lora_model()  # LoRA on build_tiny_model(): the base below, with B drawn at random
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(0))
    method.save(model, tmp_path / "run" / "adapter", MethodConfig(r=4, alpha=8, dropout=0.0), "tiny")
    for folder in ("base", "merged"):
        build_tiny_model().save_pretrained(tmp_path / folder)
        build_tiny_tokenizer().save_pretrained(tmp_path / folder)
    rows = [("What is the capital of France?", "Paris is the capital."), ("Say hello.", "hello world"),
            ("Name a colour.", "Blue.")] * 3
    (tmp_path / "test.jsonl").write_text("".join(json.dumps({"prompt": q, "completion": a}) + "\n" for q, a in rows))
    return tmp_path


def test_artifact_kinds(tmp_path, artifacts):
    assert artifact_kind(artifacts / "merged") == ("model", artifacts / "merged")
    assert artifact_kind(artifacts / "run" / "adapter") == ("adapter", artifacts / "run" / "adapter")
    assert artifact_kind(artifacts / "run") == ("adapter", artifacts / "run" / "adapter")  # a run directory
    (tmp_path / "model.gguf").write_bytes(b"GGUF")
    assert artifact_kind(tmp_path / "model.gguf") == ("model", tmp_path / "model.gguf")
    with pytest.raises(UserError, match="not an artifact"):
        artifact_kind(tmp_path / "test.jsonl")
    chosen = targets([str(artifacts / "merged"), str(artifacts / "merged")], base=True)
    assert [t.name for t in chosen] == ["base", str(artifacts / "merged"), f"{artifacts / 'merged'} (2)"]
    assert [t.kind for t in targets([], base=False)] == ["base"]


def test_eval_compares_several_artifacts_paired_on_the_same_rows(artifacts, capsys):
    from tunesmith.commands.infer import evaluate

    cfg = load_config(None, [f"model.name_or_path={artifacts / 'base'}", f"data.test={artifacts / 'test.jsonl'}",
                             "eval.max_new_tokens=4", "eval.bootstrap=200", "eval.metrics=[token_f1, perplexity]"])
    out = evaluate(cfg, [str(artifacts / "merged"), str(artifacts / "run")], base=True)
    captured = capsys.readouterr()
    assert json.loads(captured.out) == out
    base, merged, adapter = out["artifacts"]
    assert out["reference"] == "base" and out["rows"] == 9 and [a["kind"] for a in out["artifacts"]] == [
        "base", "model", "adapter"]
    assert merged["scores"] == base["scores"]  # the same weights: the same answers and likelihoods ...
    assert all(d == {"value": 0.0, "interval": [0.0, 0.0]} for d in merged["difference"].values())  # ... exactly
    assert adapter["scores"]["perplexity"] != base["scores"]["perplexity"]
    d = adapter["difference"]["perplexity"]
    assert d["value"] == pytest.approx(adapter["scores"]["perplexity"] - base["scores"]["perplexity"])
    assert d["interval"][0] <= d["value"] <= d["interval"][1]
    assert "| metric | base |" in captured.err and "difference from base" in captured.err

    single = evaluate(cfg, str(artifacts / "run" / "adapter"))  # one artifact: its flat scores, as before
    assert single == adapter["scores"] and json.loads(capsys.readouterr().out) == single
