"""`tunesmith embed demo` with the real all-MiniLM-L6-v2: the held-out gain the demo promises (docs/embeddings.md
has the measured numbers; the thresholds here are looser), the chart, and the exported folder."""

from __future__ import annotations

import pytest

from tunesmith.commands.embed import DEMO_CONFIG


@pytest.mark.integration
@pytest.mark.slow  # ~3 min on 2 cores
def test_embed_demo_gains_on_held_out_questions(tmp_path):
    from tunesmith.embed.demo import run_demo

    summary = run_demo(tmp_path, DEMO_CONFIG, ["eval.bootstrap=200"])
    full = summary["evaluation"]["full"]
    assert full["difference"]["accuracy@5"]["value"] >= 0.25  # the issue asks 0.30; measured far above
    assert full["difference"]["mrr@10"]["value"] >= 0.25
    assert full["difference"]["mrr@10"]["ci"][0] > 0
    assert summary["data"]["test"]["corpus"] == 512  # the whole corpus against the held-out questions
    assert (tmp_path / "before_after.svg").read_text().lstrip().startswith("<?xml")
    assert (tmp_path / "model" / "modules.json").is_file() and summary["export_max_abs_diff"] <= 1e-5


@pytest.mark.integration
@pytest.mark.slow  # ~4 min on 2 cores
def test_embed_demo_lora_recipe_nears_full_fine_tuning(tmp_path):
    """The LoRA recipe (LoRA on the word embeddings too) against full fine-tuning's measured MRR@10, 0.808 (the issue
    asks 97% of it; measured above it), and its adapter holds the embedding update in PEFT's key names."""
    from safetensors.torch import load_file

    from tunesmith.embed.demo import LORA_OVERRIDES, run_demo

    summary = run_demo(tmp_path, DEMO_CONFIG, [*LORA_OVERRIDES, "eval.bootstrap=200"])
    assert summary["evaluation"]["full"]["after"]["mrr@10"]["value"] >= 0.97 * 0.808 - 0.03  # a little slack
    keys = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert "base_model.model.embeddings.word_embeddings.lora_embedding_A" in keys
