"""The contract every registered method keeps, checked on a tiny model for each entry of METHODS.

A method added to the registry is tested here with no new test code: it starts as the base model,
only its own parameters get gradients, save then load gives the same logits, merging changes no
logit, disabling gives the base, and a run killed after a checkpoint resumes bit-exact.
"""

from __future__ import annotations

import pytest
import torch

from conftest import build_tiny_model, logits
from tunesmith.config import MethodConfig, build_config
from tunesmith.data.dataset import collate
from tunesmith.methods.registry import METHODS, get_method, load_artifact
from tunesmith.objectives.lm import token_loss_sum
from tunesmith.train import faults
from tunesmith.train.checkpoint import checkpoint_tensors
from tunesmith.train.loop import train

# Settings a method cannot run without, or that keep the tiny model tiny. Everything else is the default.
OPTIONS = {
    "peft": {"peft_config": {"peft_type": "IA3", "target_modules": ["k_proj", "v_proj", "down_proj"],
                             "feedforward_modules": ["down_proj"]}},
    "freeze": {"trainable_blocks": 1},
    "adapter": {"adapter_size": 8},
}


def method_config(name: str, **extra) -> MethodConfig:
    return MethodConfig(name=name, r=4, alpha=8, **{**OPTIONS.get(name, {}), **extra})


def adapted(name: str, seed: int = 0, **extra):
    """(tiny model with the method applied, method, config); the initialisation seeded as `train` does."""
    model, cfg = build_tiny_model(), method_config(name, **extra)
    method = get_method(name)
    torch.manual_seed(seed)
    method.apply(model, cfg)
    return model, method, cfg


def rows(n: int = 6) -> list[dict]:
    g = torch.Generator().manual_seed(5)
    out = []
    for i in range(n):
        ids = torch.randint(3, 300, (6 + i % 4,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": [-100] * 3 + ids[3:]})
    return out


@torch.no_grad()
def perturb(model) -> None:
    """Move every trainable parameter off its initial value, as training would."""
    g = torch.Generator().manual_seed(3)
    for p in model.parameters():
        if p.requires_grad:
            p.add_(0.05 * torch.randn(p.shape, generator=g))


@pytest.fixture(params=list(METHODS))
def name(request):
    return request.param


def test_registered_under_its_own_name(name):
    assert get_method(name).name == name
    assert get_method(name).sharding in ("ddp", "fsdp2")


def test_starts_as_the_base_model(name):
    base = logits(build_tiny_model())
    model, _, _ = adapted(name)
    assert (logits(model) - base).abs().max() <= 1e-5


def test_only_the_methods_parameters_get_gradients(name):
    model, method, cfg = adapted(name)
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    grouped = {id(p) for group in method.param_groups(model, cfg) for p in group["params"]}
    assert trainable and grouped == trainable
    model.train()
    loss, count = token_loss_sum(model, collate(rows(), 2))
    (loss / count).backward()
    with_grad = {id(p) for p in model.parameters() if p.grad is not None}
    assert with_grad == trainable


def test_save_then_load_gives_the_same_logits(name, tmp_path):
    model, method, cfg = adapted(name)
    perturb(model)
    tuned = logits(model)
    method.save(model, tmp_path / "artifact", cfg, "tiny")
    fresh = build_tiny_model()
    loaded = load_artifact(fresh, tmp_path / "artifact").name
    # PEFT's format has no LoRA-FA: its file is a LORA file, and loads as LoRA (the same inference model)
    assert loaded == name or get_method(loaded).peft_type == method.peft_type is not None
    assert (logits(fresh) - tuned).abs().max() <= 1e-6


def test_merge_changes_no_logit(name):
    model, method, _ = adapted(name)
    if method.merge is None:
        pytest.skip(f"{name} declares merge=None: its update is not a weight change")
    perturb(model)
    tuned = logits(model)
    merged = method.merge(model)
    assert (logits(merged) - tuned).abs().max() <= 1e-5
    assert not any(p.requires_grad and "lora" in n for n, p in merged.named_parameters())


def test_disabling_gives_the_base_model(name):
    base = logits(build_tiny_model())
    model, method, _ = adapted(name)
    perturb(model)
    tuned = logits(model)
    if method.disable is None:
        # Allowed only where the method trains the base weights themselves: no switch can bring them back.
        base_names = {n for n, _ in build_tiny_model().named_parameters()}
        assert any(p.requires_grad and n in base_names for n, p in model.named_parameters())
        return
    assert (tuned - base).abs().max() > 1e-4  # the perturbation is visible...
    with method.disable(model):
        assert (logits(model) - base).abs().max() <= 1e-5  # ...and switched off
    assert torch.equal(logits(model), tuned)  # and back on afterwards


class SimulatedKill(Exception):
    """Stands in for SIGKILL inside this process: the loop gets no chance to clean up or save."""


def run(name: str, run_dir, monkeypatch, resume: bool = False, kill_after: int | None = None):
    model, method, cfg = adapted(name, dropout=0.1)
    train_options = {"max_steps": 4, "save_every": 2, "batch_size": 2, "lr": 0.01, "warmup_steps": 1, "resume": resume}
    config = build_config({"method": cfg.model_dump(), "train": train_options, "output": {"dir": str(run_dir)}})
    if kill_after is not None:
        def kill():
            raise SimulatedKill
        monkeypatch.setattr(faults, "ARMED", faults.Faults(kill_at_step=kill_after))
        monkeypatch.setattr(faults, "kill", kill)
    try:
        train(model, rows(), [], config, run_dir, pad_id=2, param_groups=lambda m: method.param_groups(m, cfg),
              after_step=method.after_step)
    finally:
        monkeypatch.setattr(faults, "ARMED", faults.Faults())
    return {k: v.detach().clone() for k, v in checkpoint_tensors(model).items()}


def test_killed_and_resumed_run_is_bit_exact(name, tmp_path, monkeypatch):
    whole = run(name, tmp_path / "whole", monkeypatch)
    with pytest.raises(SimulatedKill):
        run(name, tmp_path / "killed", monkeypatch, kill_after=2)
    resumed = run(name, tmp_path / "killed", monkeypatch, resume=True)
    assert whole.keys() == resumed.keys() and whole
    for key in whole:
        assert torch.equal(whole[key], resumed[key]), key
    untrained = checkpoint_tensors(adapted(name, dropout=0.1)[0])
    assert any(not torch.equal(whole[k], untrained[k]) for k in whole)  # four steps did change something
