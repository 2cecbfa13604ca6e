import pytest
import torch

from conftest import build_tiny_model
from tunesmith.data.dataset import collate
from tunesmith.data.packing import collate_packed, plan_rows
from tunesmith.objectives.lm import token_loss_sum


def sample_examples(seed=0, n=6):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        length = int(torch.randint(4, 30, (1,), generator=g))
        ids = torch.randint(3, 300, (length,), generator=g).tolist()
        labels = [-100] * (length // 3) + ids[length // 3 :]
        out.append({"input_ids": ids, "labels": labels})
    return out


def test_plan_rows_respects_row_length_and_keeps_every_example():
    lengths = [10, 3, 7, 5, 9, 1]
    plan = plan_rows(lengths, 12)
    assert sorted(i for row in plan for i in row) == list(range(6))
    assert all(sum(lengths[i] for i in row) <= 12 for row in plan)
    assert len(plan) == 3  # 35 tokens need at least 3 rows of 12


@pytest.mark.parametrize("row_len", [32, 64, 1000])
def test_packed_per_sample_losses_equal_one_by_one(row_len):
    """Each sample's loss inside a packed batch equals its loss run alone: no sample sees another."""
    model = build_tiny_model()
    examples = sample_examples()
    packed = collate_packed(examples, pad_id=2, row_len=row_len)
    assert int(packed["real_tokens"]) == sum(len(e["input_ids"]) for e in examples)
    with torch.no_grad():
        hidden = model.base_model(input_ids=packed["input_ids"], position_ids=packed["position_ids"],
                                 use_cache=False).last_hidden_state
        logp = torch.log_softmax(model.lm_head(hidden).float(), -1)
        alone = [token_loss_sum(model, collate([e], 2)) for e in examples]
    # Walk the packed rows in the plan's order and pick out each sample's token losses.
    lengths = [len(e["input_ids"]) for e in examples]
    plan = plan_rows(lengths, max(row_len, max(lengths)))
    for r, row in enumerate(plan):
        start = 0
        for i in row:
            n = lengths[i]
            targets = packed["labels"][r, start + 1 : start + n]
            lp = logp[r, start : start + n - 1].gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
            loss = -(lp * (targets != -100)).sum()
            assert torch.allclose(loss, alone[i][0], atol=1e-4), (i, loss, alone[i][0])
            start += n


def test_packed_batch_loss_equals_padded_batch_loss():
    model = build_tiny_model()
    examples = sample_examples(seed=1, n=8)
    with torch.no_grad():
        padded = token_loss_sum(model, collate(examples, 2))
        packed = token_loss_sum(model, collate_packed(examples, 2, row_len=64))
    assert padded[1] == packed[1]
    assert torch.allclose(padded[0], packed[0], atol=1e-4)
