"""The asynchronous mode's two pieces: a rollout worker that generates batches continuously
in a background thread, and the staleness bound the trainer applies to what it receives.

The worker calls `make_batch(k)` for k = start, start + 1, ... (one RL step's collected,
scored groups each; glm_jax.rl.sampling.collect) and puts the results in a bounded queue:
when the trainer falls `queue_size` batches behind, the worker waits, so it is never more
than that many batches ahead. JAX dispatch is thread-safe, and the rollout mesh's devices
are not the trainer's, so the two run at the same time (slime's disaggregated mode, with a
thread where slime has a separate engine).

Staleness (`drop_stale`): a token drawn by policy version u and trained on at version v is
v - u versions stale. A group whose oldest completion token is more than `max_staleness`
versions stale is dropped (its batch slots stay, masked out of the loss as the dynamic
sampler's padding groups are) and counted. What it lets through is corrected as in the
synchronous mode: the ratio is taken against the trainer's recomputed log-probabilities and
truncated importance sampling against the rollout's recorded ones.
"""

from __future__ import annotations

import dataclasses
import queue
import threading
from collections.abc import Callable

import numpy as np

from glm_jax.rl.sampling import Collected

__all__ = ["RolloutWorker", "StaleStats", "drop_stale"]


class RolloutWorker:
    """`make_batch(k)` for k = start, start + 1, ... in a daemon thread, into a queue of
    `queue_size` batches. `get()` returns the next one (re-raising the worker's error, if
    it failed); `close()` stops the worker after its current batch."""

    def __init__(self, make_batch: Callable[[int], Collected], *, queue_size: int,
                 start: int = 0):
        if queue_size < 1:
            raise ValueError(f"queue_size={queue_size}: must be >= 1")
        self._make_batch = make_batch
        self._queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._next = start
        self._thread = threading.Thread(target=self._run, name="rl-rollout", daemon=True)

    def start(self) -> RolloutWorker:
        self._thread.start()
        return self

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                batch = self._make_batch(self._next)
                self._next += 1
                while not self._stop.is_set():
                    try:
                        self._queue.put(batch, timeout=0.1)
                        break
                    except queue.Full:
                        continue
        except BaseException as e:  # handed to the trainer's thread by get()
            self._error = e

    def get(self) -> Collected:
        """The next batch (waits for it). Raises the worker's exception if it died."""
        while True:
            if self._error is not None:
                raise self._error
            try:
                return self._queue.get(timeout=0.1)
            except queue.Empty:
                if not self._thread.is_alive() and self._error is None:
                    raise RuntimeError("the rollout worker stopped without a batch")

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


@dataclasses.dataclass
class StaleStats:
    groups: int  # groups dropped for staleness
    samples: int  # their samples
    max_trained: int  # the largest staleness among trained tokens (0 if none trained)
    mean_trained: float  # mean staleness over trained tokens (0.0 if none)


def _oldest(versions: np.ndarray, mask: np.ndarray) -> int:
    """The oldest version among the completion tokens of the rows (mask: completion)."""
    v = versions[mask]
    return int(v.min()) if v.size else np.iinfo(np.int32).max


def drop_stale(collected: Collected, *, samples: int, version: int, max_staleness: int
               ) -> tuple[Collected, StaleStats]:
    """`collected` with every kept group whose oldest completion token is more than
    `max_staleness` versions older than `version` moved to the padding groups (masked out
    of the loss; the batch keeps its shape), and the counts. Groups are whole: their
    advantages are relative to each other. Raises ValueError for max_staleness < 0."""
    if max_staleness < 0:
        raise ValueError(f"max_staleness={max_staleness}: must be >= 0")
    fresh, stale = [], []
    ages = []
    for s, p in collected.kept:
        r = collected.rounds[s].rollout
        rows = slice(p * samples, (p + 1) * samples)
        versions = np.asarray(r.policy_version)[rows]
        mask = np.asarray(r.completion_mask)[rows]
        if version - _oldest(versions, mask) > max_staleness:
            stale.append((s, p))
        else:
            fresh.append((s, p))
            ages.append(version - versions[mask])
    ages_all = np.concatenate(ages) if ages else np.zeros(0, np.int64)
    out = Collected(collected.rounds, fresh, collected.padded + stale,
                    dataclasses.replace(collected.stats,
                                        padded_groups=collected.stats.padded_groups
                                        + len(stale)))
    return out, StaleStats(groups=len(stale), samples=len(stale) * samples,
                           max_trained=int(ages_all.max()) if ages_all.size else 0,
                           mean_trained=float(ages_all.mean()) if ages_all.size else 0.0)
