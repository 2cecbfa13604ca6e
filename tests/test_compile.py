"""train.compile: compiled decoder layers train like eager ones, and are eager again after training."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from conftest import build_tiny_model
from test_loop import examples, run_config
from tunesmith.methods.freeze import find_blocks
from tunesmith.objectives.lm import token_loss_sum
from tunesmith.train.loop import train

# Inductor writes and builds C++ for the CPU: without a compiler torch.compile cannot run at all.
needs_compiler = pytest.mark.skipif(not any(shutil.which(c) for c in ("c++", "g++", "clang++")),
                                    reason="torch.compile on the CPU needs a C++ compiler")


def losses(run_dir) -> list[float]:
    return [json.loads(l)["loss"] for l in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow  # 85 s on 2 cores: inductor compiles every layer, forward and backward, for two shapes
@needs_compiler
def test_compiled_layers_train_like_eager(tmp_path):
    """Two steps of the tiny model, every weight trained, padded rows of changing widths (dynamic shapes)."""
    rows = examples(8)
    runs = {}
    for on in (False, True):
        model, seen = build_tiny_model(), {"compiled": [], "grads": []}

        def loss_fn(m, batch):
            seen["compiled"].append(find_blocks(m)[1][0]._compiled_call_impl is not None)
            return token_loss_sum(m, batch)

        def after_step(m):  # the gradients of each step, before AdamW's sign-like update amplifies rounding
            seen["grads"].append({n: p.grad.clone() for n, p in m.named_parameters()})

        cfg = run_config(tmp_path / str(on), max_steps=2, batch_size=4, lr=1e-2, compile=on)
        cfg.data.packing = False
        train(model, rows, [], cfg, tmp_path / str(on), pad_id=2, loss_fn=loss_fn, after_step=after_step)
        assert seen["compiled"] == [on, on]
        assert all(layer._compiled_call_impl is None for layer in find_blocks(model)[1])  # eager again after
        runs[on] = seen["grads"]
    assert losses(tmp_path / "True") == pytest.approx(losses(tmp_path / "False"), abs=1e-4)
    # Step 1's gradients agree to float rounding. (From step 2 on the weights differ by AdamW's update of
    # that rounding, near lr for gradients near 0, so only the losses are compared there.)
    for name, eager in runs[False][0].items():
        assert torch.allclose(eager, runs[True][0][name], atol=1e-7, rtol=1e-4), name
