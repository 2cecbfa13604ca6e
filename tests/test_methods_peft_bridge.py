"""The peft bridge: any peft method trained by our loop, saved in peft's format both ways, merged; errors."""

from __future__ import annotations

import sys

import pytest
import torch
from conftest import build_tiny_model, ids, logits

from tunesmith.config import MethodConfig, load_config
from tunesmith.errors import UserError
from tunesmith.methods.registry import get_method, load_artifact

peft = pytest.importorskip("peft")

IA3 = {"peft_type": "IA3", "target_modules": ["k_proj", "v_proj", "down_proj"], "feedforward_modules": ["down_proj"]}
LOHA = {"peft_type": "LOHA", "r": 2, "alpha": 4, "target_modules": ["q_proj", "up_proj"], "init_weights": False}
METHOD = get_method("peft")


def trained(peft_config: dict):
    model = build_tiny_model()
    cfg = MethodConfig(name="peft", peft_config=peft_config)
    METHOD.apply(model, cfg)
    torch.manual_seed(5)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.2)
    return model, cfg


@pytest.mark.parametrize("peft_config", [IA3, LOHA], ids=["ia3", "loha"])
def test_saved_in_peft_format_both_ways(tmp_path, peft_config):
    model, cfg = trained(peft_config)
    assert type(model).__name__ == "LlamaForCausalLM"  # injected in place: the loop sees a plain model
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".default" in n for n in trainable)
    tuned = logits(model)
    assert (tuned - logits(build_tiny_model())).abs().max() > 1e-4
    METHOD.save(model, tmp_path, cfg, "tiny")
    theirs = peft.PeftModel.from_pretrained(build_tiny_model(), tmp_path)
    assert (logits(theirs) - tuned).abs().max() <= 1e-5
    fresh = build_tiny_model()
    assert load_artifact(fresh, tmp_path).name == "peft"
    assert (logits(fresh) - tuned).abs().max() <= 1e-5
    merged = METHOD.merge(model)
    assert not any("default" in n for n, _ in merged.named_parameters())
    assert (logits(merged) - tuned).abs().max() <= 1e-4


def test_a_peft_trained_adapter_loads_through_the_bridge(tmp_path):
    config = peft.IA3Config(**{k: v for k, v in IA3.items() if k != "peft_type"})
    theirs = peft.get_peft_model(build_tiny_model(), config)
    with torch.no_grad():
        for n, p in theirs.named_parameters():
            if "ia3_l" in n:
                p.uniform_(0.5, 1.5)
    theirs.save_pretrained(tmp_path)
    fresh = build_tiny_model()
    load_artifact(fresh, tmp_path)
    assert (logits(fresh) - logits(theirs)).abs().max() <= 1e-5


def test_trains_in_our_loop(tmp_path):
    from test_loop import examples

    from tunesmith.train.loop import train

    cfg = load_config(None, [f"output.dir={tmp_path}", "train.max_steps=2", "train.batch_size=2", "train.lr=1e-2",
                             "method.name=peft", "method.peft_config={peft_type: IA3, target_modules: [k_proj, "
                             "down_proj], feedforward_modules: [down_proj]}"])
    model = build_tiny_model()
    METHOD.apply(model, cfg.method)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    train(model, examples(4), [], cfg, tmp_path, pad_id=2, param_groups=METHOD.param_groups(model, cfg.method))
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters() if n in before)


def test_errors(monkeypatch):
    with pytest.raises(UserError, match="peft_config"):
        load_config(None, ["method.name=peft"])
    with pytest.raises(UserError, match="not a peft method"):
        METHOD.apply(build_tiny_model(), MethodConfig(name="peft", peft_config={"peft_type": "NOPE"}))
    with pytest.raises(UserError, match="IA3Config"):
        METHOD.apply(build_tiny_model(), MethodConfig(name="peft", peft_config={"peft_type": "IA3", "bogus": 1}))
    with pytest.raises(UserError, match="prompt"):
        METHOD.apply(build_tiny_model(), MethodConfig(name="peft", peft_config={"peft_type": "PROMPT_TUNING",
                                                                                 "num_virtual_tokens": 4}))
    monkeypatch.setitem(sys.modules, "peft", None)  # as if peft were not installed
    with pytest.raises(UserError, match=r"pip install 'tunesmith\[peft\]'"):
        METHOD.apply(build_tiny_model(), MethodConfig(name="peft", peft_config=IA3))


def peft_ia3_adapter(folder):
    """An IA3 adapter written by peft itself (PeftModel.save_pretrained)."""
    config = peft.IA3Config(**{k: v for k, v in IA3.items() if k != "peft_type"})
    peft.get_peft_model(build_tiny_model(), config).save_pretrained(folder)
    return folder / "adapter_model.safetensors"


def corrupt(path, damage: str) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"\x00garbage, not safetensors" * 8)


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_corrupt_peft_adapter_is_a_user_error_naming_the_file(tmp_path, damage):
    weights = peft_ia3_adapter(tmp_path)
    corrupt(weights, damage)
    with pytest.raises(UserError) as e:
        load_artifact(build_tiny_model(), tmp_path)
    assert str(weights) in str(e.value) and "corrupt" in str(e.value) and "IA3" in str(e.value)


def test_peft_adapter_with_other_keys_or_shapes_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    weights = peft_ia3_adapter(tmp_path)
    state = load_file(weights)
    key = sorted(state)[0]
    state[key.replace("layers.0", "layers.7")] = state.pop(key)  # a layer this model does not have
    save_file(state, weights)
    with pytest.raises(UserError) as e:
        load_artifact(build_tiny_model(), tmp_path)
    assert str(weights) in str(e.value) and "1 missing" in str(e.value) and "1 unexpected" in str(e.value)

    state = load_file(peft_ia3_adapter(tmp_path))
    state[key] = torch.ones(3)
    save_file(state, weights)
    with pytest.raises(UserError, match="wrong shape"):
        load_artifact(build_tiny_model(), tmp_path)


def test_corrupt_peft_adapter_through_the_cli_exits_2_without_traceback(tmp_path):
    import subprocess

    from conftest import build_tiny_tokenizer

    model_dir = tmp_path / "tiny-model"
    build_tiny_model().save_pretrained(model_dir)
    build_tiny_tokenizer().save_pretrained(model_dir)
    weights = peft_ia3_adapter(tmp_path / "adapter")
    corrupt(weights, "truncated")
    proc = subprocess.run([sys.executable, "-m", "tunesmith", "generate", "--model", str(model_dir), "--adapter",
                           str(tmp_path / "adapter"), "--max-new-tokens", "2", "hi"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert str(weights) in proc.stderr and "Traceback" not in proc.stderr
