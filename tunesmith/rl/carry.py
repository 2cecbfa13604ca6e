"""What an online-RL objective carries from one step to the next, saved in every checkpoint.

Sampling needs no saved generator: each rollout's generator is a function of (train.seed, step)
(loop.rollout_generator), and PPO's minibatch order seed lives in its rollout buffer. What does carry over:

    reward_calls   how many times the training rollouts have called the rewards (each draw of completions,
                   dynamic sampling's redraws included); passed to every reward as
                   trainer_state.reward_calls, beside trainer_state.global_step (TRL passes a
                   `trainer_state` too, so a reward that reads global_step works unchanged). Validation
                   calls get the latest values and are not counted
    global_step    the step of the latest counted call (what validation passes)
    redraws        flat groups drawn again by objective.dynamic_sampling so far
    flat_streak    steps in a row with FLAT_SHARE of the groups flat (GRPO's no-signal warning)
    rewards        the state of each reward that keeps one: an object with state_dict() -> a JSON-able dict and
                   load_state_dict(dict) (say a reward with a curriculum or a cache of its own)

The loop puts `state_dict()` into the checkpoint's state.json (TrainState.objective) and hands it back through
`load_state_dict` on resume, so a resumed run calls its rewards with the same counters and state as the
uninterrupted one, and the no-signal warning fires at the same step.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial


@dataclass(frozen=True)
class TrainerInfo:
    """The `trainer_state` keyword a reward gets: the steps done before this rollout and the reward calls so
    far (this one excluded)."""

    global_step: int
    reward_calls: int


class Carry:
    """The objective's state between steps (module docstring); `streak` is a one-element list, the counter the
    no-signal warning (grpo.no_signal_warning) updates in place."""

    def __init__(self, rewards=()):
        self.rewards = list(rewards)
        self.reward_calls = 0
        self.global_step = 0
        self.redraws = 0
        self.streak = [0]

    def called(self, step: int) -> TrainerInfo:
        """Count one call of the rewards at `step`; the trainer_state to pass to them."""
        info = TrainerInfo(global_step=step, reward_calls=self.reward_calls)
        self.reward_calls += 1
        self.global_step = step
        return info

    def latest(self) -> TrainerInfo:
        """The trainer_state of a call that is not counted (validation): the latest step and count."""
        return TrainerInfo(global_step=self.global_step, reward_calls=self.reward_calls)

    def state_dict(self) -> dict:
        own = {}
        for reward in self.rewards:
            target = stateful(reward.function)
            if target is not None:
                own[reward.name] = target.state_dict()
        return {"reward_calls": self.reward_calls, "global_step": self.global_step, "redraws": self.redraws,
                "flat_streak": self.streak[0], "rewards": own}

    def load_state_dict(self, state: dict) -> None:
        """Restore a checkpoint's counters; an older checkpoint without them starts them at 0."""
        self.reward_calls = int(state.get("reward_calls", 0))
        self.global_step = int(state.get("global_step", 0))
        self.redraws = int(state.get("redraws", 0))
        self.streak[0] = int(state.get("flat_streak", 0))
        saved = state.get("rewards", {})
        for reward in self.rewards:
            target = stateful(reward.function)
            if target is not None and reward.name in saved:
                target.load_state_dict(saved[reward.name])


def stateful(function):
    """The object behind a reward (through functools.partial's bound options) if it keeps a state, else None."""
    target = function.func if isinstance(function, partial) else function
    if callable(getattr(target, "state_dict", None)) and callable(getattr(target, "load_state_dict", None)):
        return target
    return None
