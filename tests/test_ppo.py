"""PPO (issue 12): the reward model as a reward function, the value head, PPO's per-token rewards and statistics
against TRL 0.x's PPOTrainer (TRL 1.x no longer ships it: its code is reproduced below), and tiny PPO runs."""

from __future__ import annotations

import json
from functools import partial

import pytest
import torch

from conftest import build_tiny_model, build_tiny_tokenizer
from tunesmith.errors import UserError
from tunesmith.rl import value_head
from tunesmith.rl.reward_model import RewardModelFunction

TOL = dict(atol=1e-10, rtol=1e-10)


def tiny_reward_model(folder, seed: int = 3):
    """The tiny model with a reward head, saved as the reward objective exports it (a sequence classifier)."""
    from tunesmith.objectives.reward import add_score_head, save_sequence_classifier

    model = build_tiny_model(seed=seed)
    torch.manual_seed(seed)
    add_score_head(model)
    with torch.no_grad():
        model.score.weight.mul_(50)  # scores spread well beyond the 1e-5 the test compares at
    save_sequence_classifier(model, build_tiny_tokenizer(), folder)
    return folder


# --- the reward model as a reward function -----------------------------------------------------------------


def test_reward_model_function_scores_exactly_as_tunesmith_score(tmp_path):
    from tunesmith.commands.score import score_file

    folder = tiny_reward_model(tmp_path / "rm")
    rows = [{"prompt": "What is the capital of France?", "completion": "Paris."},
            {"prompt": "hello world", "completion": '{"name": "Ada", "age": 36}'},
            {"prompt": "The quick brown fox", "completion": "jumps over the lazy dog."}]
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    expected, _ = score_file(str(folder), str(tmp_path / "rows.jsonl"), batch_size=2)
    reward = RewardModelFunction(folder, batch_size=2)
    prompts, completions = [r["prompt"] for r in rows], [r["completion"] for r in rows]
    got = reward(prompts, completions, completion_ids=[[1]] * 3, extra=[0, 1, 2])
    assert got == pytest.approx([r["score"] for r in expected], abs=1e-5)
    assert max(got) - min(got) > 1e-3  # the rows score differently: the comparison means something
    # TRL's conversational form: prompts and completions as message lists
    as_messages = reward([[{"role": "user", "content": p}] for p in prompts],
                         [[{"role": "assistant", "content": c}] for c in completions])
    assert as_messages == pytest.approx(got, abs=1e-6)


def test_reward_model_function_refuses_a_folder_without_a_model(tmp_path):
    with pytest.raises(UserError, match="no config.json"):
        RewardModelFunction(tmp_path)


# --- the value head ----------------------------------------------------------------------------------------


def test_value_head_is_trainable_saved_and_loaded(tmp_path):
    model = build_tiny_model()
    value_head.add_value_head(model)
    head = model.value_head
    assert head.weight.requires_grad and head.weight.shape == (1, 32) and head.bias is None
    assert 0.005 < float(head.weight.detach().std()) < 0.05  # N(0, initializer_range 0.02), as the reward head
    hidden = torch.randn(2, 5, 32)
    values = value_head.token_values(model, hidden)
    torch.testing.assert_close(values, (hidden @ head.weight.T).squeeze(-1))
    path = value_head.save_value_head(model, tmp_path / "adapter")
    assert path.name == "value_head.safetensors"
    other = build_tiny_model()
    value_head.load_value_head(other, tmp_path / "adapter")
    assert torch.equal(other.value_head.weight, head.weight)


def test_value_head_starts_from_the_reward_models_score_head(tmp_path):
    from safetensors.torch import load_file

    folder = tiny_reward_model(tmp_path / "rm")
    model = build_tiny_model()
    value_head.add_value_head(model, "reward_model", str(folder))
    assert torch.equal(model.value_head.weight, load_file(folder / "model.safetensors")["score.weight"])
    wider = build_tiny_model()
    wider.config.hidden_size = 64  # another base: refused, with the option to use instead
    with pytest.raises(UserError, match="value_init=normal"):
        value_head.add_value_head(wider, "reward_model", str(folder))


# --- PPO's math against TRL 0.x's PPOTrainer (trl/trainer/ppo_trainer.py and trl/core.py before TRL 1.0) --------


def trl0_masked_mean(values, mask):
    return (values * mask).sum() / mask.sum()


def trl0_masked_var(values, mask):
    mean = trl0_masked_mean(values, mask)
    variance = trl0_masked_mean((values - mean) ** 2, mask)
    return variance * mask.sum() / (mask.sum() - 1)


def trl0_masked_whiten(values, mask, shift_mean=True):
    mean, var = trl0_masked_mean(values, mask), trl0_masked_var(values, mask)
    whitened = (values - mean) * torch.rsqrt(var + 1e-8)
    return whitened if shift_mean else whitened + mean


def trl0_compute_rewards(scores, logprobs, ref_logprobs, masks, kl_coef):
    """PPOTrainer.compute_rewards with kl_penalty="kl"."""
    rewards, non_score_rewards = [], []
    for score, logprob, ref_logprob, mask in zip(scores, logprobs, ref_logprobs, masks):
        kl = logprob - ref_logprob
        non_score_reward = -kl_coef * kl
        non_score_rewards.append(non_score_reward)
        reward = non_score_reward.clone()
        last_non_masked_index = mask.nonzero()[-1]
        reward[last_non_masked_index] += score
        rewards.append(reward)
    return torch.stack(rewards), torch.stack(non_score_rewards)


def trl0_compute_advantages(values, rewards, mask, gamma, lam, whiten_rewards, remask=False):
    """PPOTrainer.compute_advantages; remask: zero the whitened rewards off the mask again (TRL 0.x leaves the
    padding at the rewards' mean there, which GAE then carries into the completion's advantages)."""
    lastgaelam, advantages_reversed = 0, []
    gen_len = rewards.shape[-1]
    values, rewards = values * mask, rewards * mask
    if whiten_rewards:
        rewards = trl0_masked_whiten(rewards, mask, shift_mean=False)
        rewards = rewards * mask if remask else rewards
    for t in reversed(range(gen_len)):
        nextvalues = values[:, t + 1] if t < gen_len - 1 else 0.0
        delta = rewards[:, t] + gamma * nextvalues - values[:, t]
        lastgaelam = delta + gamma * lam * lastgaelam
        advantages_reversed.append(lastgaelam)
    advantages = torch.stack(advantages_reversed[::-1]).transpose(0, 1)
    returns = advantages + values
    return values, trl0_masked_whiten(advantages, mask), returns


def trl0_loss(old_logprobs, values, logits, vpreds, logprobs, mask, advantages, returns, cliprange, cliprange_value,
              vf_coef):
    """PPOTrainer.loss (its stats as a flat dict, the names it logged) and record_step_stats' var_explained."""
    vpredclipped = torch.clamp(vpreds, values - cliprange_value, values + cliprange_value)
    vf_losses1, vf_losses2 = (vpreds - returns) ** 2, (vpredclipped - returns) ** 2
    vf_loss = 0.5 * trl0_masked_mean(torch.max(vf_losses1, vf_losses2), mask)
    vf_clipfrac = trl0_masked_mean(torch.gt(vf_losses2, vf_losses1).double(), mask)
    ratio = torch.exp(logprobs - old_logprobs)
    pg_losses = -advantages * ratio
    pg_losses2 = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    pg_loss = trl0_masked_mean(torch.max(pg_losses, pg_losses2), mask)
    pg_clipfrac = trl0_masked_mean(torch.gt(pg_losses2, pg_losses).double(), mask)
    pd = torch.softmax(logits, dim=-1)
    entropy = trl0_masked_mean(torch.logsumexp(logits, dim=-1) - torch.sum(pd * logits, dim=-1), mask)
    approxkl = 0.5 * trl0_masked_mean((logprobs - old_logprobs) ** 2, mask)
    error = trl0_masked_mean((vpreds - returns) ** 2, mask)
    return {"loss/total": pg_loss + vf_coef * vf_loss, "loss/policy": pg_loss, "loss/value": vf_loss,
            "policy/clipfrac": pg_clipfrac, "val/clipfrac": vf_clipfrac, "policy/entropy": entropy,
            "policy/approxkl": approxkl, "val/var_explained": 1 - error / trl0_masked_var(returns, mask)}


def rollout_tensors(seed=0, b=5, t=6):
    """float64 per-token tensors of B completions of different lengths (right-padded) and their mask."""
    g = torch.Generator().manual_seed(seed)
    mask = (torch.arange(t) < torch.tensor([t, 1, t - 2, 3, t - 1][:b])[:, None]).double()
    draw = lambda scale=1.0: torch.randn(b, t, generator=g, dtype=torch.float64) * scale  # noqa: E731
    logps = -torch.rand(b, t, generator=g, dtype=torch.float64) * 3
    return dict(mask=mask, logps=logps, old=logps + draw(0.3), ref=logps + draw(0.3), values=draw(), vpreds=draw(),
                scores=torch.randn(b, generator=g, dtype=torch.float64), logits=draw()[..., None] * draw()[:, :1, None])


def test_per_token_rewards_equal_trl0_compute_rewards():
    from tunesmith.objectives.ppo import per_token_rewards

    x = rollout_tensors()
    rewards, kl = per_token_rewards(x["scores"], x["logps"], x["ref"], x["mask"], 0.05)
    expected, non_score = trl0_compute_rewards(x["scores"], x["logps"] * x["mask"], x["ref"] * x["mask"], x["mask"],
                                               0.05)
    torch.testing.assert_close(rewards, expected * x["mask"], **TOL)
    torch.testing.assert_close(-0.05 * kl, non_score * x["mask"], **TOL)
    ends = x["mask"].sum(1).long() - 1  # the score sits on each completion's last token, also a 1-token one
    assert torch.allclose(rewards[torch.arange(5), ends] + 0.05 * kl[torch.arange(5), ends], x["scores"])


@pytest.mark.parametrize("whiten_rewards", [False, True])
def test_advantages_and_returns_equal_trl0_compute_advantages(whiten_rewards):
    from tunesmith.objectives.ppo import advantages_and_returns, per_token_rewards

    x = rollout_tensors(seed=1)
    rewards, _ = per_token_rewards(x["scores"], x["logps"], x["ref"], x["mask"], 0.1)
    advantages, returns = advantages_and_returns(rewards, x["values"] * x["mask"], x["mask"], 0.9, 0.8, whiten_rewards)
    _, trl_adv, trl_returns = trl0_compute_advantages(x["values"], rewards, x["mask"], 0.9, 0.8, whiten_rewards,
                                                      remask=True)
    torch.testing.assert_close(advantages, trl_adv * x["mask"], **TOL)
    torch.testing.assert_close(returns * x["mask"], trl_returns * x["mask"], **TOL)
    assert abs(float(trl0_masked_mean(advantages, x["mask"]))) < 1e-12  # whitened: mean 0 over the tokens
    if whiten_rewards:  # TRL 0.x as it was: the padding's whitened rewards leak into the advantages; not here
        _, leaky, _ = trl0_compute_advantages(x["values"], rewards, x["mask"], 0.9, 0.8, True)
        assert (leaky * x["mask"] - advantages).abs().max() > 1e-3


def test_ppo_token_losses_and_statistics_equal_trl0_loss():
    from tunesmith.objectives.ppo import explained_variance, token_losses
    from tunesmith.rl.losses import masked_mean

    x = rollout_tensors(seed=2)
    g = torch.Generator().manual_seed(2)
    advantages, returns = (torch.randn(5, 6, generator=g, dtype=torch.float64) for _ in range(2))
    pg, vf, parts = token_losses(x["logps"], x["old"], advantages, x["vpreds"], x["values"], returns, 0.2, 0.2, 0.2)
    logprobs = torch.log_softmax(x["logits"], -1)
    expected = trl0_loss(x["old"], x["values"], x["logits"], x["vpreds"], x["logps"], x["mask"], advantages, returns,
                         0.2, 0.2, 0.1)
    m = x["mask"]
    torch.testing.assert_close(masked_mean(pg + 0.1 * vf, m), expected["loss/total"], **TOL)
    torch.testing.assert_close(masked_mean(pg, m), expected["loss/policy"], **TOL)
    torch.testing.assert_close(masked_mean(vf, m), expected["loss/value"], **TOL)
    torch.testing.assert_close(masked_mean(parts["clipped"].double(), m), expected["policy/clipfrac"], **TOL)
    torch.testing.assert_close(masked_mean(parts["value_clipped"].double(), m), expected["val/clipfrac"], **TOL)
    torch.testing.assert_close(masked_mean(-(logprobs.exp() * logprobs).sum(-1), m), expected["policy/entropy"], **TOL)
    torch.testing.assert_close(masked_mean(0.5 * (x["logps"] - x["old"]) ** 2, m), expected["policy/approxkl"], **TOL)
    torch.testing.assert_close(explained_variance(x["vpreds"], returns, m), expected["val/var_explained"], **TOL)
    assert 0 < float(expected["policy/clipfrac"]) < 1 and 0 < float(expected["val/clipfrac"]) < 1


# --- tiny PPO runs through the loop --------------------------------------------------------------------------

def letter_reward(prompts, completions, **columns):
    """The toy reward: the share of the completion's characters that are lowercase letters (dense enough for a tiny
    random model to learn in a few steps)."""
    return [sum(ch.islower() for ch in c) / max(1, len(c)) for c in completions]


PROMPTS = ["What is the capital of France?", "hello world", "The quick brown fox", "0123456789",
           "jumps over the lazy dog", '{"name": "Ada"}']


def ppo_run(run_dir, monkeypatch, resume=False, kill_after=None, steps=4, lr=0.02, dropout=0.0, epochs=2, grad_accum=2):
    """A LoRA PPO run of the tiny model on PROMPTS (2 prompts x G 4, 6 new tokens, `epochs` passes x 1 minibatch of
    `grad_accum` micro-batches a rollout), rewarded by letter_reward; returns its checkpoint tensors."""
    from types import SimpleNamespace

    from conftest import killed_after
    from tunesmith.config import build_config
    from tunesmith.methods.registry import get_method
    from tunesmith.objectives import grpo, ppo
    from tunesmith.rl.rewards import Reward
    from tunesmith.train.checkpoint import checkpoint_tensors
    from tunesmith.train.loop import train

    cfg = build_config({"method": {"name": "lora", "r": 4, "alpha": 8, "dropout": dropout},
                        "objective": {"name": "ppo", "num_generations": 4, "max_new_tokens": 6, "ppo_epochs": epochs,
                                      "kl_coef": 0.01, "vf_coef": 0.5},
                        "train": {"max_steps": steps, "batch_size": 2 // grad_accum, "grad_accum": grad_accum,
                                  "save_every": 2, "lr": lr,
                                  "resume": resume, "log_every": 1},
                        "output": {"dir": str(run_dir)}})
    tok = build_tiny_tokenizer()
    examples = [grpo.encode({"prompt": p}, "prompt", tok, cfg.data) for p in PROMPTS]
    model, method = build_tiny_model(), get_method("lora")
    torch.manual_seed(0)
    method.apply(model, cfg.method)
    ppo.add_head(model, cfg)
    objective = ppo.bind(cfg.objective, [Reward("letter", letter_reward)], method.disable, None)
    objective = objective.bind_run(cfg, tok, run_dir, SimpleNamespace(train=examples))
    with killed_after(monkeypatch, kill_after):
        train(model, examples, [], cfg, run_dir, pad_id=tok.pad_token_id, objective=objective)
    return checkpoint_tensors(model)


def test_ppo_run_raises_the_score_of_a_toy_reward(tmp_path, monkeypatch):
    tensors = ppo_run(tmp_path, monkeypatch, steps=16, lr=0.05, epochs=4, grad_accum=1)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    print([round(r["score"], 3) for r in records[::4]])
    assert len(records) == 16 and all(torch.isfinite(torch.tensor(r["loss"])) for r in records)
    for name in ("policy_loss", "value_loss", "clipfrac", "value_clipfrac", "entropy", "approx_kl",
                 "explained_variance", "score", "kl", "completion_length"):
        assert all(name in r for r in records), name
    scores = [r["score"] for r in records[::4]]  # of the 4 rollouts (measured: 0.327, 0.248, 0.369, 0.390)
    assert scores[-1] > scores[0] + 0.04 and sum(scores[2:]) > sum(scores[:2]) + 0.1, scores
    assert records[0]["approx_kl"] == 0 and records[0]["clipfrac"] == 0  # step 0: the policy is the sampling one
    assert "value_head.weight" in tensors
    assert (tmp_path / "rollout").is_dir()


def test_a_killed_ppo_run_resumes_bit_exact_from_the_middle_of_a_rollout(tmp_path, monkeypatch):
    """Killed after step 2 of a rollout that serves 4 steps (ppo_epochs 4): the resumed run reads the rollout back
    from output.dir/rollout and ends bit for bit as the uninterrupted one, through the next rollout."""
    from conftest import assert_resumes_bit_exact

    run = partial(ppo_run, steps=6, epochs=4, grad_accum=2)
    records = assert_resumes_bit_exact(run, tmp_path, monkeypatch)
    assert len(records) == 6 and all(r["loss"] == r["loss"] for r in records)
