"""What a person watching an RL run sees: a tqdm bar (rate, ETA) with the step's reward,
level, temperature and wall-time split on a terminal; one plain line per step otherwise (a
log file). The first step of a process compiles the rollout and train programs, so it is
announced and has no throughput."""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO

from tqdm import tqdm


class RLProgress:
    def __init__(self, *, total: int, start: int, enabled: bool,
                 interactive: bool | None = None, out: TextIO | None = None):
        self.out = out or sys.stdout
        self.total, self.start, self.enabled = total, start, enabled
        self.interactive = self.out.isatty() if interactive is None else interactive
        self._bar: tqdm | None = None
        self._t0 = time.perf_counter()
        if enabled:
            print("first RL step (compiles the rollout and train programs)...",
                  file=self.out, flush=True)

    @staticmethod
    def summary(record: dict[str, Any]) -> dict[str, str]:
        shown = {"reward": f"{record['reward']:.3f}", "level": record["level_name"],
                 "T": f"{record['temperature']:.2f}",
                 "filtered": f"{record['filtered_groups']}",
                 "len": f"{record['response_length']:.0f}"}
        if record.get("trainer_tokens_per_sec") is not None:
            shown["train_tok_s"] = f"{record['trainer_tokens_per_sec']:.0f}"
        return shown

    def step(self, step: int, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        if step == self.start + 1:
            print(f"first step took {record['step_seconds']:.1f} s", file=self.out, flush=True)
            self._t0 = time.perf_counter()
            if self.interactive:
                self._bar = tqdm(total=self.total, initial=step, desc="rl", unit="step",
                                 dynamic_ncols=True, file=self.out)
                self._bar.set_postfix(self.summary(record))
                return
        if self._bar is not None:
            self._bar.set_postfix(self.summary(record))
            self._bar.update(1)
            return
        parts = [f"step {step}/{self.total}"] + [f"{k} {v}" for k, v in
                                                 self.summary(record).items()]
        parts.append(f"rollout {record['rollout_share']:.0%} / reward "
                     f"{record['reward_share']:.0%} / train {record['train_share']:.0%}")
        done = step - self.start - 1
        if done > 0 and step < self.total:
            eta = (time.perf_counter() - self._t0) / done * (self.total - step)
            parts.append(f"ETA {eta:.0f}s")
        print(" | ".join(parts), file=self.out, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
