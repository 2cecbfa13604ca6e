"""data.group_by_length: micro-batches of similar length, in an order that is still a function of (seed, epoch)."""

from __future__ import annotations

import pytest
import torch

from conftest import build_tiny_model
from test_loop import examples, run_config
from tunesmith.config import load_config
from tunesmith.data.dataset import epoch_order
from tunesmith.data.grouping import length_grouped_order, padding
from tunesmith.errors import UserError
from tunesmith.objectives.lm import token_loss_sum
from tunesmith.train.loop import BatchSource, Schedule, train


def long_tailed(n: int, seed: int = 0) -> list[int]:
    """Mostly short rows and a few long ones, like instruction data."""
    g = torch.Generator().manual_seed(seed)
    return (torch.empty(n).log_normal_(4.0, 0.8, generator=g).clamp(4, 2048)).long().tolist()


def test_order_is_a_seeded_permutation_that_changes_per_epoch():
    lengths = long_tailed(1003)
    order = length_grouped_order(lengths, batch_size=8, seed=3, epoch=0)
    assert sorted(order) == list(range(1003))
    assert order == length_grouped_order(lengths, 8, 3, 0)
    assert order != length_grouped_order(lengths, 8, 3, 1)
    assert order != length_grouped_order(lengths, 8, 4, 0)


def test_padding_falls_and_rows_stay_local():
    lengths, bs = long_tailed(4000), 8
    plain = epoch_order(len(lengths), 0, 0)
    grouped = length_grouped_order(lengths, bs, 0, 0)
    assert padding(lengths, grouped, bs) < 0.2 * padding(lengths, plain, bs)
    # every row stays within its 50-batch mega-batch of the epoch's permutation: still a shuffle
    span = 50 * bs
    for start in range(0, len(plain), span):
        assert sorted(grouped[start : start + span]) == sorted(plain[start : start + span])


def test_short_last_micro_batch_stays_last():
    lengths = [1] * 5 + [100] * 16  # 21 rows in micro-batches of 4: the short one holds the shortest row
    order = length_grouped_order(lengths, batch_size=4, seed=0, epoch=0)
    assert len(order) == 21 and [lengths[i] for i in order[20:]] == [1]
    for start in range(0, 20, 4):
        assert len({lengths[i] for i in order[start : start + 4]}) == 1  # no batch mixes 1 and 100


def test_batch_source_serves_grouped_micro_batches():
    rows = examples(40)
    cfg = load_config(None, ["train.batch_size=4", "data.packing=false"])
    schedule = Schedule.from_config(len(rows), cfg)
    width = lambda source: sum(source.micro_batch(k)["input_ids"].numel() for k in range(schedule.batches_per_epoch))
    plain = BatchSource(rows, schedule, 0, 2, torch.device("cpu"))
    grouped = BatchSource(rows, schedule, 0, 2, torch.device("cpu"), group_by_length=True)
    assert width(grouped) < width(plain)  # fewer padded positions for the same rows
    assert sorted(grouped.epoch_order(0)) == list(range(40))


def test_grouping_with_packing_is_rejected():
    with pytest.raises(UserError, match="group_by_length"):
        load_config(None, ["data.group_by_length=true", "data.packing=true"])


def test_resumed_grouped_run_is_bit_exact(tmp_path):
    """A run that crashes after its step-2 checkpoint and resumes ends where an uninterrupted one does."""
    rows = examples(10)  # 5 micro-batches of 2 per epoch: the 6 steps of 2 cross two epoch boundaries
    overrides = dict(max_steps=6, batch_size=2, grad_accum=2, lr=1e-2, save_every=2, seed=5)

    def config(run_dir, **extra):
        cfg = run_config(run_dir, **overrides, **extra)
        cfg.data.packing = False
        cfg.data.group_by_length = True
        return cfg

    straight = build_tiny_model()
    train(straight, rows, [], config(tmp_path / "a"), tmp_path / "a", pad_id=2)

    calls = [0]

    def crash_in_step_4(model, batch):
        calls[0] += 1
        if calls[0] == 7:  # the first micro-batch of step 4 (2 per step)
            raise RuntimeError("simulated crash")
        return token_loss_sum(model, batch)

    with pytest.raises(RuntimeError, match="simulated"):
        train(build_tiny_model(), rows, [], config(tmp_path / "b"), tmp_path / "b", pad_id=2, loss_fn=crash_in_step_4)
    resumed, served = build_tiny_model(), []
    counted = lambda model, batch: served.append(1) or token_loss_sum(model, batch)
    state = train(resumed, rows, [], config(tmp_path / "b", resume=True), tmp_path / "b", pad_id=2, loss_fn=counted)
    assert state.step == 6 and len(served) == 8  # steps 3 to 6 only: it resumed from step 2
    for (name, a), b in zip(straight.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), name
