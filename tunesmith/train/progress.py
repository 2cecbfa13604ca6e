"""The phases of a training step on the progress bar: online RL's rollout (generate, score) and its update.

A GRPO or PPO step spends its time in two very different places: sampling completions token by token, and
the forward and backward of the loss over them. One tokens-per-second figure for the whole step hides which
one is slow, so the loop's one bar shows each phase apart:

    description   `train [generate]`, `train [score]`, `train [update]`: the phase running now
    postfix       gen_tok_s = completion tokens sampled / seconds in the generate phase
                  upd_tok_s = tokens through forward and backward / seconds in the update phase
                  (of the last step that had that phase: a PPO step that reuses its rollout has no generate)

The loop makes one `Phases` current for the run (`active(bar)`) and times the update itself; an objective
marks its own phases with `phase(name)` and counts what it generates with `tokens(n)` (sampling.py's
`progress` callback). Both are no-ops when no run is active (a test or a benchmark calling a rollout
directly). The rates also go to metrics.jsonl as `generate_tokens_per_s` and `update_tokens_per_s`.

For the chaos tests (tests/test_rl_chaos.py) every phase start is also logged by faults.log_phase.
"""

from __future__ import annotations

import contextlib
import time
from typing import Iterator

from tunesmith.train import faults

SHORT = {"generate": "gen_tok_s", "update": "upd_tok_s"}  # the phases whose rate the postfix shows

_ACTIVE: "Phases | None" = None


class Phases:
    """Per step: seconds spent and tokens counted in each phase; the bar's description names the running one."""

    def __init__(self, bar=None, desc: str = "train"):
        self.bar, self.desc = bar, desc
        self.step = 0
        self.seconds: dict[str, float] = {}
        self.counted: dict[str, int] = {}
        self.running: list[str] = []
        self.last: dict[str, float] = {}  # the latest rate of each phase, kept across steps for the postfix

    def begin_step(self, step: int) -> None:
        self.step, self.seconds, self.counted = step, {}, {}

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        self.running.append(name)
        self._show()
        faults.log_phase(self.step + 1, name)
        started = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - started
            self.running.pop()
            self._show()

    def tokens(self, n: int, name: str | None = None) -> None:
        """Count n tokens for `name` (default: the innermost running phase)."""
        name = name or (self.running[-1] if self.running else None)
        if name is not None:
            self.counted[name] = self.counted.get(name, 0) + int(n)

    def rates(self) -> dict[str, float]:
        """{"<phase>_tokens_per_s": tokens / seconds} of this step's phases that counted tokens."""
        out = {}
        for name, n in self.counted.items():
            if self.seconds.get(name):
                out[f"{name}_tokens_per_s"] = n / self.seconds[name]
                self.last[name] = out[f"{name}_tokens_per_s"]
        return out

    def postfix(self) -> dict[str, str]:
        """The bar's rate entries: gen_tok_s, upd_tok_s (the latest of each)."""
        return {SHORT[k]: f"{v:.0f}" for k, v in self.last.items() if k in SHORT}

    def _show(self) -> None:
        if self.bar is not None:
            self.bar.set_description(f"{self.desc} [{self.running[-1]}]" if self.running else self.desc,
                                     refresh=True)


@contextlib.contextmanager
def active(bar=None) -> Iterator[Phases]:
    """Make a Phases over `bar` current for the block (the loop's run)."""
    global _ACTIVE
    previous, _ACTIVE = _ACTIVE, Phases(bar)
    try:
        yield _ACTIVE
    finally:
        _ACTIVE = previous


def phase(name: str):
    """Context manager: time the block as phase `name` of the current step (a no-op outside a run)."""
    return _ACTIVE.phase(name) if _ACTIVE is not None else contextlib.nullcontext()


def tokens(n: int) -> None:
    """Count n tokens produced in the running phase (a no-op outside a run)."""
    if _ACTIVE is not None:
        _ACTIVE.tokens(n)


def current() -> Phases:
    """The run's Phases, or a fresh one that shows nothing (a step run outside `active`)."""
    return _ACTIVE if _ACTIVE is not None else Phases()
