"""Delta-LoRA: the post-step update of W, the telescoping identity, the warm-up, exact resume, artifact round trip,
merging."""

from __future__ import annotations

import pytest
import torch
from conftest import build_tiny_model, ids, logits

from tunesmith.config import MethodConfig, TrainConfig, load_config
from tunesmith.errors import UserError
from tunesmith.methods.delta_lora import DeltaLoRALinear, after_step_delta_lora, delta_modules
from tunesmith.methods.registry import get_method, load_artifact
from tunesmith.train.checkpoint import checkpoint_tensors
from tunesmith.train.optim import build_optimizer

CFG = MethodConfig(name="delta_lora", r=4, alpha=8, delta_lambda=0.5, target_modules=["q_proj", "up_proj"])
METHOD = get_method("delta_lora")


def trained(steps: int, cfg: MethodConfig = CFG, model=None, opt=None):
    """The tiny model after `steps` AdamW steps of Delta-LoRA, and its W0 per adapted layer (`model`, `opt`:
    continue those)."""
    w0 = {}
    if model is None:
        model = build_tiny_model()
        w0 = {n: m.weight.detach().clone() for n, m in model.named_modules() if n.endswith(("q_proj", "up_proj"))}
        METHOD.apply(model, cfg)
        opt = build_optimizer(METHOD.param_groups(model, cfg), TrainConfig(lr=1e-2))
        for group in opt.param_groups:
            group["lr"] = 1e-2
    model.train()
    for _ in range(steps):
        model(ids()).logits.pow(2).mean().backward()
        opt.step()
        METHOD.after_step(model)
        opt.zero_grad()
    return model, w0, opt


def test_after_step_moves_w_by_the_change_of_ba():
    model, _, opt = trained(1)
    layer = delta_modules(model)[0][1]
    before = {k: t.detach().clone() for k, t in (("w", layer.weight), ("a", layer.lora_A.weight),
                                                 ("b", layer.lora_B.weight))}
    model(ids()).logits.pow(2).mean().backward()
    opt.step()
    after_step_delta_lora(model)
    change = layer.lora_B.weight @ layer.lora_A.weight - before["b"] @ before["a"]
    torch.testing.assert_close(layer.weight, before["w"] + 0.5 * 2.0 * change, atol=1e-7, rtol=0)
    assert torch.equal(layer.prev_A, layer.lora_A.weight) and torch.equal(layer.prev_B, layer.lora_B.weight)


def test_w_has_no_gradient_or_optimizer_state_and_telescopes():
    model, w0, opt = trained(4)
    optimized = {id(p) for g in opt.param_groups for p in g["params"]}
    for name, layer in delta_modules(model):
        assert not layer.weight.requires_grad and id(layer.weight) not in optimized
        # sum over steps of (B_{t+1} A_{t+1} - B_t A_t) = B_T A_T - B_0 A_0, and B_0 = 0
        torch.testing.assert_close(layer.weight - w0[name], 0.5 * 2.0 * layer.lora_B.weight @ layer.lora_A.weight,
                                   atol=1e-6, rtol=0)
        assert (layer.weight - w0[name]).abs().max() > 1e-4  # W really moved
    assert all(m.lora_dropout.__class__.__name__ == "Identity" for _, m in delta_modules(model))


def test_warm_up_leaves_w_alone_for_k_steps_then_follows_the_change_since():
    """method.delta_start_step = K: plain LoRA for K steps, then W_T = W_0 + lambda s (B_T A_T - B_K A_K)."""
    model, w0, opt = trained(2, CFG.model_copy(update={"delta_start_step": 2}))
    layers = delta_modules(model)
    assert all(torch.equal(m.weight, w0[n]) for n, m in layers)  # two steps of warm-up: W untouched
    product_k = {n: m.lora_B.weight.detach() @ m.lora_A.weight.detach() for n, m in layers}
    assert all(product_k[n].abs().max() > 1e-4 for n, _ in layers)  # while B A did move
    trained(2, model=model, opt=opt)
    for name, m in layers:
        assert int(m.steps_done) == 4
        change = m.lora_B.weight @ m.lora_A.weight - product_k[name]  # B_T A_T - B_K A_K
        torch.testing.assert_close(m.weight - w0[name], 0.5 * 2.0 * change, atol=1e-6, rtol=0)
        assert (m.weight - w0[name]).abs().max() > 1e-4


def test_checkpoint_holds_the_moved_weights():
    model, _, _ = trained(0)
    names = set(checkpoint_tensors(model))
    assert "model.layers.0.self_attn.q_proj.weight" in names  # W changes outside the optimizer
    assert "model.layers.0.self_attn.q_proj.prev_A" in names
    assert "model.layers.0.self_attn.q_proj.steps_done" in names  # the warm-up's position
    assert "model.layers.0.self_attn.q_proj.lora_A.weight" in names
    assert "model.layers.0.self_attn.k_proj.weight" not in names


@pytest.mark.parametrize("start_step", [0, 3])
def test_resume_is_exact(tmp_path, start_step):
    """4 steps straight == 2 steps, then a fresh model resumed to 4 (through the real loop; constant
    schedule, so the 2-step run takes the same steps as the first half of the 4-step one). With a warm-up
    of 3 the resumed run must know it is past step 2, or step 4 would not move W."""
    from test_loop import examples

    from tunesmith.train.loop import train

    def run(folder, steps, resume=False):
        cfg = load_config(None, [f"output.dir={folder}", f"train.max_steps={steps}", "train.batch_size=2",
                                 "train.lr=1e-2", "train.save_every=2", "train.schedule=constant",
                                 f"train.resume={str(resume).lower()}",
                                 "method.name=delta_lora", "method.r=4", "method.target_modules=[q_proj,up_proj]",
                                 f"method.delta_start_step={start_step}"])
        model = build_tiny_model()
        torch.manual_seed(0)
        METHOD.apply(model, cfg.method)
        train(model, examples(8), [], cfg, folder, pad_id=2, param_groups=METHOD.param_groups(model, cfg.method),
              after_step=METHOD.after_step)
        return model

    straight = run(tmp_path / "a", 4)
    w0 = build_tiny_model().model.layers[0].self_attn.q_proj.weight
    assert (straight.model.layers[0].self_attn.q_proj.weight - w0).abs().max() > 1e-5  # W moved
    run(tmp_path / "b", 2)
    resumed = run(tmp_path / "b", 4, resume=True)
    ours, theirs = checkpoint_tensors(straight), checkpoint_tensors(resumed)
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), key


def test_artifact_round_trip_and_merge(tmp_path):
    from transformers import AutoModelForCausalLM

    from tunesmith.methods.inject import merge_and_unload

    model, _, _ = trained(3)
    adapted = logits(model)
    METHOD.save(model, tmp_path, CFG, "tiny")
    fresh = build_tiny_model()
    cfg = load_artifact(fresh, tmp_path)
    assert cfg.name == "delta_lora" and cfg.delta_lambda == 0.5 and cfg.delta_start_step == 0
    torch.testing.assert_close(logits(fresh), adapted, atol=1e-6, rtol=0)
    for _, m in delta_modules(fresh):
        assert torch.equal(m.prev_A, m.lora_A.weight)
    merged = merge_and_unload(model)
    assert not any(isinstance(m, DeltaLoRALinear) for m in merged.modules())
    assert (logits(merged) - adapted).abs().max() <= 1e-4
    merged.save_pretrained(tmp_path / "merged")
    assert (logits(AutoModelForCausalLM.from_pretrained(tmp_path / "merged")) - adapted).abs().max() <= 1e-4


def test_tied_head_refused():
    with pytest.raises(UserError, match="tied"):
        METHOD.apply(build_tiny_model(), CFG.model_copy(update={"target_modules": ["lm_head"]}))
