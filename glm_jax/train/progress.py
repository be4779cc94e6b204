"""What a person watching a training run sees.

On a terminal: a tqdm bar (rate, ETA) with the latest loss, tokens/s and MFU. Otherwise
(stdout redirected to a file, a batch scheduler's log): one plain line every `log_every`
steps, because a carriage-return bar in a log file is one unreadable line. Either way the
first step is announced as "compiling the train step..." with the time it took, and
throughput appears only once there is a timed window (the first step includes the
compilation, so it has no honest tokens/s).
"""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO

from tqdm import tqdm


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    return f"{minutes // 60}h{minutes % 60:02d}m"


class TrainProgress:
    """enabled: this process reports (process 0, progress wanted). interactive: None picks
    a bar when stdout is a terminal."""

    def __init__(self, *, total: int, start: int, enabled: bool,
                 interactive: bool | None = None, out: TextIO | None = None):
        self.out = out or sys.stdout
        self.total, self.start, self.enabled = total, start, enabled
        self.interactive = self.out.isatty() if interactive is None else interactive
        self._bar: tqdm | None = None
        self._t0 = time.perf_counter()
        self._compiling: float | None = None

    def compiling(self) -> None:
        """Call just before the first step is dispatched."""
        if self.enabled:
            print("compiling the train step...", file=self.out, flush=True)
        self._compiling = time.perf_counter()

    def _compiled(self) -> None:
        if self._compiling is not None and self.enabled:
            print(f"compiled and ran the first step in "
                  f"{time.perf_counter() - self._compiling:.1f} s", file=self.out, flush=True)
        self._compiling = None
        self._t0 = time.perf_counter()  # the ETA counts from the compiled program
        if self.enabled and self.interactive:
            self._bar = tqdm(total=self.total, initial=self.start + 1, desc="train",
                             unit="step", dynamic_ncols=True, file=self.out)

    def step(self, step: int, record: dict[str, Any] | None) -> None:
        """After every step; `record` (the metrics) on the steps that log, else None."""
        if record is not None and self._compiling is not None:
            self._compiled()  # the first step is always a logging step
            if self._bar is not None:
                self._bar.set_postfix(self._postfix(record))
            else:
                self._line(step, record)
            return
        if self._bar is not None:
            if record is not None:
                self._bar.set_postfix(self._postfix(record))
            self._bar.update(1)
        elif record is not None:
            self._line(step, record)

    @staticmethod
    def _postfix(record: dict[str, Any]) -> dict[str, str]:
        shown = {"loss": f"{record['loss']:.3f}"}
        if record.get("eval_loss") is not None:
            shown["eval"] = f"{record['eval_loss']:.3f}"
        if record.get("tokens_per_sec") is not None:
            shown["tok_s"] = f"{record['tokens_per_sec']:.0f}"
            shown["mfu"] = f"{record['mfu']:.1%}"
        return shown

    def _line(self, step: int, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        parts = [f"step {step}/{self.total}", f"loss {record['loss']:.4f}"]
        if record.get("eval_loss") is not None:
            parts.append(f"eval loss {record['eval_loss']:.4f}")
        if record.get("tokens_per_sec") is not None:
            parts += [f"{record['tokens_per_sec']:.0f} tokens/s", f"MFU {record['mfu']:.1%}"]
        parts.append(f"lr {record['lr']:.2e}")
        done = step - self.start - 1  # steps since the compiled program started
        elapsed = time.perf_counter() - self._t0
        if done > 0 and step < self.total:
            parts.append(f"ETA {_duration(elapsed / done * (self.total - step))}")
        print(" | ".join(parts), file=self.out, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
