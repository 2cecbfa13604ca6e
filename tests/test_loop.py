"""The training loop's invariants on a tiny model: accumulation, schedules, non-finite steps, checkpoints."""

from __future__ import annotations

import pytest
import torch

from conftest import build_tiny_model
from tunesmith.config import TrainConfig, load_config
from tunesmith.data.dataset import collate
from tunesmith.errors import UserError
from tunesmith.objectives.lm import token_loss_sum
from tunesmith.train.checkpoint import TrainState, complete_checkpoints, load_checkpoint, save_checkpoint
from tunesmith.train.loop import train, train_step
from tunesmith.train.optim import build_optimizer, lr_at


def examples(n: int, seed: int = 0) -> list[dict]:
    """Rows of different lengths with different numbers of labelled tokens."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        length = 5 + (i * 3) % 9
        ids = torch.randint(3, 300, (length,), generator=g).tolist()
        labels = [-100] * (length // 2) + ids[length // 2 :]
        rows.append({"input_ids": ids, "labels": labels})
    return rows


def grads_after(window) -> dict[str, torch.Tensor]:
    model = build_tiny_model()
    opt = build_optimizer(list(model.parameters()), TrainConfig())
    train_step(model, opt, window, max_grad_norm=0, loss_fn=token_loss_sum)
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def test_accumulation_equals_one_big_batch():
    rows = examples(7)
    whole = grads_after([collate(rows, 2)])
    # 7 rows as micro-batches of 3, 3 and a shorter last one of 1
    split = grads_after([collate(rows[0:3], 2), collate(rows[3:6], 2), collate(rows[6:7], 2)])
    for name in whole:
        assert torch.allclose(whole[name], split[name], atol=1e-6, rtol=1e-5), name


def test_loss_is_mean_over_labelled_tokens():
    model = build_tiny_model()
    batch = collate(examples(3), 2)
    total, count = token_loss_sum(model, batch)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    labels = batch["labels"][:, 1:]
    reference = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                                  ignore_index=-100, reduction="sum")
    assert count == int((labels != -100).sum())
    assert torch.allclose(total, reference, atol=1e-4)


@pytest.mark.parametrize("schedule", ["cosine", "linear", "constant"])
def test_schedules(schedule):
    cfg = TrainConfig(lr=1.0, warmup_steps=4, schedule=schedule)
    assert [lr_at(s, cfg, 20) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_at(4, cfg, 20) == 1.0
    end = lr_at(20, cfg, 20)
    assert end == (1.0 if schedule == "constant" else pytest.approx(0.0, abs=1e-12))
    if schedule == "cosine":
        assert lr_at(12, cfg, 20) == pytest.approx(0.5)


def run_config(tmp_path, **train):
    overrides = [f"train.{k}={v}" for k, v in train.items()]
    return load_config(None, [f"output.dir={tmp_path}", *overrides])


def test_non_finite_steps_are_skipped_then_abort(tmp_path):
    model = build_tiny_model()
    calls = {"n": 0}

    def poisoned(model, batch):
        calls["n"] += 1
        total, count = token_loss_sum(model, batch)
        return (total * float("nan"), count) if calls["n"] in (2, 3) else (total, count)

    cfg = run_config(tmp_path, max_steps=5, batch_size=2, lr=1e-3)
    state = train(model, examples(10), [], cfg, tmp_path, pad_id=2, loss_fn=poisoned)
    assert state.step == 5 and state.skipped_steps == 2
    assert all(torch.isfinite(p).all() for p in model.parameters())

    always_nan = lambda m, b: (token_loss_sum(m, b)[0] * float("inf"), 1)
    cfg = run_config(tmp_path / "b", max_steps=9, batch_size=2, max_bad_steps=3)
    with pytest.raises(UserError, match="step 3"):
        train(build_tiny_model(), examples(10), [], cfg, tmp_path / "b", pad_id=2, loss_fn=always_nan)


def test_checkpoint_round_trip_and_partial_ignored(tmp_path):
    model = build_tiny_model()
    opt = build_optimizer(list(model.parameters()), TrainConfig())
    train_step(model, opt, [collate(examples(4), 2)], 1.0, token_loss_sum)
    opt.step()
    trainable = dict(model.named_parameters())
    save_checkpoint(tmp_path, TrainState(step=1, tokens_seen=9), trainable, opt, {"x": 1})
    (tmp_path / "checkpoints" / "step-2").mkdir()  # a half-written one: no COMPLETE marker
    found = complete_checkpoints(tmp_path)
    assert [p.name for p in found] == ["step-1"]
    expected_rng = torch.rand(3)  # what the next random draw is after the save...

    fresh = build_tiny_model(seed=1)
    fresh_opt = build_optimizer(list(fresh.parameters()), TrainConfig())
    torch.manual_seed(123)
    state = load_checkpoint(found[0], fresh, fresh_opt)
    assert state.step == 1 and state.tokens_seen == 9
    assert torch.equal(torch.rand(3), expected_rng)  # ...and it is the same after loading
    for (n, a), b in zip(model.named_parameters(), fresh.parameters()):
        assert torch.equal(a, b), n
    assert fresh_opt.state_dict()["state"][0]["step"] == opt.state_dict()["state"][0]["step"]


def test_corrupt_checkpoint_fails_naming_the_file(tmp_path):
    model = build_tiny_model()
    opt = build_optimizer(list(model.parameters()), TrainConfig())
    path = save_checkpoint(tmp_path, TrainState(step=1), dict(model.named_parameters()), opt, {})
    (path / "trainable.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(UserError, match="corrupt"):
        load_checkpoint(path, model, opt)
    (path / "optimizer.pt").unlink()
    with pytest.raises(UserError, match="optimizer.pt"):
        load_checkpoint(path, model, opt)


def test_keep_prunes_old_checkpoints(tmp_path):
    model = build_tiny_model()
    opt = build_optimizer(list(model.parameters()), TrainConfig())
    for step in range(1, 5):
        save_checkpoint(tmp_path, TrainState(step=step), dict(model.named_parameters()), opt, {}, keep=2)
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["step-3", "step-4"]


def test_full_disk_during_save_keeps_newest_checkpoint(tmp_path, monkeypatch):
    import errno

    import safetensors.torch

    model = build_tiny_model()
    opt = build_optimizer(list(model.parameters()), TrainConfig())
    save_checkpoint(tmp_path, TrainState(step=1), dict(model.named_parameters()), opt, {})

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)  # what files.atomic_save_safetensors calls
    with pytest.raises(UserError, match="No space left"):
        save_checkpoint(tmp_path, TrainState(step=2), dict(model.named_parameters()), opt, {})
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-1"]  # no temp folder left
    load_checkpoint(tmp_path / "checkpoints" / "step-1", model, opt)


def test_unwritable_checkpoint_folder_is_a_user_error(tmp_path):
    model = build_tiny_model()
    opt = build_optimizer(list(model.parameters()), TrainConfig())
    (tmp_path / "checkpoints").write_text("a file where the folder should be")
    with pytest.raises(UserError, match="Could not write checkpoint"):
        save_checkpoint(tmp_path, TrainState(step=1), dict(model.named_parameters()), opt, {})


def test_lora_plus_groups_scale_b_learning_rate():
    from tunesmith.config import MethodConfig
    from tunesmith.methods.inject import apply_lora
    from tunesmith.methods.registry import lora_plus_groups
    from tunesmith.train.optim import set_lr

    model = build_tiny_model()
    cfg = MethodConfig(r=2, lora_plus_ratio=16)
    apply_lora(model, cfg)
    opt = build_optimizer(lora_plus_groups(model, cfg), TrainConfig(lr=1e-3))
    set_lr(opt, 1e-3)
    by_id = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert by_id[id(p)] == pytest.approx(1.6e-2 if ".lora_B." in name else 1e-3), name
    assert len(by_id) == sum(p.requires_grad for p in model.parameters())
