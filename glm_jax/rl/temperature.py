"""The sampling temperature: raised when the reward plateaus, up to a cap.

Rule (once per RL update, with that update's mean reward r):
    smoothed = r on the first update, else smoothing * smoothed + (1 - smoothing) * r;
    if smoothed > best + min_delta: best = smoothed, stale = 0   (still improving)
    else: stale += 1
    if stale >= patience and temperature < max_temperature:      (a plateau)
        temperature = min(temperature + step, max_temperature)
        best = smoothed, stale = 0     (the next rise needs another `patience` flat updates)
At the cap the temperature stays. Sampling hotter explores more when the policy has stopped
improving on what it already samples; the cap keeps samples from turning to noise.
`restart` forgets the reward history and keeps the temperature: call it when the task gets
harder (a curriculum level change), whose reward drop is not a plateau.

The state is a frozen dataclass of floats and ints; `to_dict` / `from_dict` round-trip it
exactly through JSON (Python writes floats with all their digits).
"""

from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass(frozen=True)
class TemperatureState:
    temperature: float
    smoothed: float | None = None  # smoothed mean reward; None before the first update
    best: float | None = None
    stale: int = 0  # updates since `best` last improved

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TemperatureState:
        return cls(**d)


@dataclasses.dataclass(frozen=True)
class PlateauTemperature:
    """The rule's constants; see the module doc."""

    initial: float = 1.0
    max_temperature: float = 1.3
    step: float = 0.05
    patience: int = 5
    min_delta: float = 0.01
    smoothing: float = 0.5

    def __post_init__(self):
        if not (0 < self.initial <= self.max_temperature and self.step > 0
                and self.patience >= 1 and self.min_delta >= 0 and 0 <= self.smoothing < 1):
            raise ValueError(f"{self}: need 0 < initial <= max_temperature, step > 0, "
                             "patience >= 1, min_delta >= 0, 0 <= smoothing < 1")

    def init(self) -> TemperatureState:
        return TemperatureState(self.initial)

    def update(self, state: TemperatureState, mean_reward: float) -> TemperatureState:
        """The state after one update whose mean reward was `mean_reward` (pure)."""
        r = float(mean_reward)
        smoothed = r if state.smoothed is None else (
            self.smoothing * state.smoothed + (1 - self.smoothing) * r)
        if state.best is None or smoothed > state.best + self.min_delta:
            best, stale = smoothed, 0
        else:
            best, stale = state.best, state.stale + 1
        temperature = state.temperature
        if stale >= self.patience and temperature < self.max_temperature:
            temperature = min(temperature + self.step, self.max_temperature)
            best, stale = smoothed, 0
        return TemperatureState(temperature, smoothed, best, stale)

    @staticmethod
    def restart(state: TemperatureState) -> TemperatureState:
        """Same temperature, no reward history (e.g. after a curriculum level change)."""
        return TemperatureState(state.temperature)
