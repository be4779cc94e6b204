"""The difficulty curriculum: prompts come from the current level, and the level advances
when its pass rate reaches a threshold.

Rule (applied once per RL update with that update's results on the current level):
    the pass rate = passes / attempts over the last `window` updates spent on this level;
    when those updates hold >= `min_attempts` attempts and the rate >= `threshold`, the
    level goes up by one (the window restarts empty); the last level is never left.
A "pass" is whatever the run counts as solved (e.g. a sample with reward 1); attempts are
samples, so a batch of P prompts x G samples adds P * G attempts.

The state is a frozen dataclass of ints and tuples: `to_dict` / `from_dict` give a plain,
JSON-safe dict, so a checkpoint restores it exactly and the run continues on the same level
with the same window.
"""

from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass(frozen=True)
class CurriculumState:
    level: int = 0  # 0 = easiest
    passes: tuple[int, ...] = ()  # per update on this level, the last `window` of them
    attempts: tuple[int, ...] = ()
    updates: int = 0  # updates seen, all levels
    entered_at: tuple[int, ...] = (0,)  # the update at which each level so far was entered

    @property
    def pass_rate(self) -> float | None:
        """The current level's pass rate over the window; None before any attempt."""
        total = sum(self.attempts)
        return sum(self.passes) / total if total else None

    def to_dict(self) -> dict[str, Any]:
        return {"level": self.level, "passes": list(self.passes),
                "attempts": list(self.attempts), "updates": self.updates,
                "entered_at": list(self.entered_at)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CurriculumState:
        return cls(level=int(d["level"]), passes=tuple(d["passes"]),
                   attempts=tuple(d["attempts"]), updates=int(d["updates"]),
                   entered_at=tuple(d["entered_at"]))


@dataclasses.dataclass(frozen=True)
class Curriculum:
    """The rule's constants; see the module doc."""

    num_levels: int
    threshold: float = 0.8
    window: int = 4
    min_attempts: int = 64

    def __post_init__(self):
        if self.num_levels < 1 or self.window < 1 or self.min_attempts < 1:
            raise ValueError(f"{self}: num_levels, window and min_attempts must be >= 1")
        if not 0 < self.threshold <= 1:
            raise ValueError(f"Curriculum.threshold={self.threshold}: must be in (0, 1]")

    def init(self) -> CurriculumState:
        return CurriculumState()

    def update(self, state: CurriculumState, passes: int, attempts: int) -> CurriculumState:
        """The state after one update's results on `state.level` (pure).
        Raises ValueError unless 0 <= passes <= attempts."""
        if not 0 <= passes <= attempts:
            raise ValueError(f"passes={passes}, attempts={attempts}: need 0 <= passes <= attempts")
        updates = state.updates + 1
        window_passes = (state.passes + (passes,))[-self.window:]
        window_attempts = (state.attempts + (attempts,))[-self.window:]
        total = sum(window_attempts)
        ready = total >= self.min_attempts and sum(window_passes) >= self.threshold * total
        if ready and state.level + 1 < self.num_levels:
            return CurriculumState(level=state.level + 1, updates=updates,
                                   entered_at=state.entered_at + (updates,))
        return dataclasses.replace(state, passes=window_passes, attempts=window_attempts,
                                   updates=updates)
