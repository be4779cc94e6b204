"""One RL step's data: rollout rounds with dynamic-sampling refill, then the trainer batch.

Dynamic sampling (DAPO; Yu et al. 2025, sec. 3.2; slime's --over-sampling-batch-size and
--dynamic-sampling-filter-path): a group whose G rewards are all equal has zero advantage
and teaches nothing. The first round samples `prompts` prompts; its groups with signal are
kept; while fewer than `prompts` groups are kept, refill rounds sample
`over_sampling_prompts` more, until `max_extra_prompts` extra prompts have been spent. The
batch keeps a fixed shape (the train step compiles once): if the budget runs out first, the
missing groups are filled with filtered ones whose loss mask is zero (they cost compute,
never gradient); surplus kept groups beyond `prompts` are dropped. Everything filtered,
filled or dropped is counted in `CollectStats`.

The batch layout is glm_jax.rl.policy_loss's (every [B, T] array aligned with `tokens`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax.numpy as jnp
import numpy as np

from glm_jax.rl import objective
from glm_jax.rl.levels import Prompt
from glm_jax.rl.rewards import RewardResult


@dataclasses.dataclass
class ScoredRound:
    """One rollout round, scored. Rows are P prompts x G samples (a prompt's G samples are
    consecutive rows, as glm_jax.rl.rollout returns them)."""

    rollout: Any  # glm_jax.rl.rollout.Rollout
    prompts: list[Prompt]  # [P]
    results: list[RewardResult]  # [P * G]
    rollout_seconds: float  # wall time of the rollout call (host work included)
    reward_seconds: float

    @property
    def rewards(self) -> np.ndarray:
        """[P, G] float32."""
        return np.array([r.reward for r in self.results], np.float32).reshape(
            len(self.prompts), -1)


@dataclasses.dataclass
class CollectStats:
    rounds: int = 0  # rollout rounds (1 = no refill)
    prompts_sampled: int = 0  # over all rounds
    filtered_groups: int = 0  # all-equal groups seen (no signal)
    filtered_all_pass: int = 0  # of those: every sample right
    filtered_all_fail: int = 0  # of those: every sample wrong
    surplus_groups: int = 0  # kept groups beyond the batch (not trained)
    padded_groups: int = 0  # batch slots filled with a filtered group (loss mask 0)
    rollout_seconds: float = 0.0
    reward_seconds: float = 0.0
    generated_tokens: int = 0


@dataclasses.dataclass
class Collected:
    """The groups of one step's batch, in batch order: (round, prompt index) pairs, the first
    `len(kept)` with signal, then the padding ones."""

    rounds: list[ScoredRound]
    kept: list[tuple[int, int]]
    padded: list[tuple[int, int]]
    stats: CollectStats

    def all_results(self) -> list[RewardResult]:
        """Every sample scored this step (filtered groups included), round by round."""
        return [r for s in self.rounds for r in s.results]

    def all_rewards(self) -> np.ndarray:
        return np.concatenate([s.rewards.reshape(-1) for s in self.rounds])

    def completion_lengths(self) -> np.ndarray:
        return np.concatenate([np.asarray(s.rollout.completion_lengths) for s in self.rounds])


RunRound = Callable[[int, int], ScoredRound]  # (round index, prompts) -> scored round


def collect(run_round: RunRound, *, prompts: int, over_sampling_prompts: int,
            max_extra_prompts: int, atol: float = 0.0) -> Collected:
    """Rollout rounds until `prompts` groups with signal are kept or the refill budget
    (`max_extra_prompts` prompts beyond the first round's) is spent; see the module doc.
    Raises ValueError for a non-positive `prompts` or `over_sampling_prompts`."""
    if prompts < 1 or over_sampling_prompts < 1 or max_extra_prompts < 0:
        raise ValueError(f"prompts={prompts}, over_sampling_prompts={over_sampling_prompts}, "
                         f"max_extra_prompts={max_extra_prompts}: need >= 1, >= 1, >= 0")
    stats = CollectStats()
    rounds: list[ScoredRound] = []
    kept: list[tuple[int, int]] = []
    filtered: list[tuple[int, int]] = []
    extra_left = max_extra_prompts
    ask = prompts
    while True:
        scored = run_round(len(rounds), ask)
        rounds.append(scored)
        stats.rounds += 1
        stats.prompts_sampled += ask
        stats.rollout_seconds += scored.rollout_seconds
        stats.reward_seconds += scored.reward_seconds
        stats.generated_tokens += int(scored.rollout.generated_tokens)
        rewards = scored.rewards
        keep = np.asarray(objective.dynamic_sampling_keep(jnp.asarray(rewards), atol))
        for p in range(len(scored.prompts)):
            if keep[p]:
                kept.append((len(rounds) - 1, p))
            else:
                filtered.append((len(rounds) - 1, p))
                stats.filtered_groups += 1
                stats.filtered_all_pass += int(rewards[p].min() > 0)
                stats.filtered_all_fail += int(rewards[p].max() <= 0)
        if len(kept) >= prompts or extra_left == 0:
            break
        ask = min(over_sampling_prompts, extra_left)
        extra_left -= ask
    stats.surplus_groups = max(len(kept) - prompts, 0)
    kept = kept[:prompts]
    padded = filtered[:prompts - len(kept)]
    stats.padded_groups = len(padded)
    return Collected(rounds, kept, padded, stats)


def _fit(x: np.ndarray, width: int, fill) -> np.ndarray:
    """Right-pad (or check) axis 1 of x to `width`."""
    if x.shape[1] > width:
        raise ValueError(f"rollout rows of {x.shape[1]} tokens do not fit train.seq_len="
                         f"{width}; raise it or lower rl.max_new_tokens")
    pad = [(0, 0)] * x.ndim
    pad[1] = (0, width - x.shape[1])
    return np.pad(x, pad, constant_values=fill)


def build_batch(collected: Collected, *, samples: int, seq_len: int, pad_id: int,
                eps_low: float, eps_high: float, normalize_std: bool = True
                ) -> dict[str, np.ndarray]:
    """The trainer batch of the collected groups (B = groups * samples rows of `seq_len`):

      tokens [B, T] int32, loss_mask [B, T] int32 (the completion tokens of kept groups),
      advantages [B] float32 (group-relative over each kept group; 0 for padding groups),
      rollout_logprobs [B, T] float32 (the rollout engine's), temperature [B] float32,
      eps_low / eps_high [B] float32, and routed_experts [B, T, layers, k] int32 when every
      round recorded it. old_logprobs is the caller's to add (the trainer's recomputation,
      or rollout_logprobs).
    Raises ValueError when a rollout row is longer than seq_len."""
    groups = collected.kept + collected.padded
    n_kept = len(collected.kept)
    rows = [(s, p * samples + g) for s, p in groups for g in range(samples)]
    rounds = collected.rounds

    def gather(field: str, fill, width: int | None = seq_len) -> np.ndarray:
        parts = []
        for s, r in rows:
            x = np.asarray(getattr(rounds[s].rollout, field))[r:r + 1]
            parts.append(_fit(x, width, fill) if width is not None else x)
        return np.concatenate(parts)

    tokens = gather("tokens", pad_id).astype(np.int32)
    prompt_len = gather("prompt_lengths", 0, None).astype(np.int32)
    completion_len = gather("completion_lengths", 0, None).astype(np.int32)
    pos = np.arange(seq_len)[None, :]
    loss_mask = ((pos >= prompt_len[:, None])
                 & (pos < (prompt_len + completion_len)[:, None])).astype(np.int32)
    loss_mask[n_kept * samples:] = 0
    advantages = np.zeros(len(rows), np.float32)
    if n_kept:
        rewards = np.stack([rounds[s].rewards[p] for s, p in collected.kept])
        adv = objective.group_advantages(jnp.asarray(rewards), normalize_std=normalize_std)
        advantages[:n_kept * samples] = np.asarray(adv).reshape(-1)
    batch = {
        "tokens": tokens, "loss_mask": loss_mask, "advantages": advantages,
        "rollout_logprobs": gather("logprobs", 0.0).astype(np.float32),
        "temperature": gather("temperature", 1.0, None).astype(np.float32),
        "eps_low": np.full(len(rows), eps_low, np.float32),
        "eps_high": np.full(len(rows), eps_high, np.float32),
    }
    if all(s.rollout.routed_experts is not None for s in rounds):
        # Past a row's end (positions no token attends from) the replayed choice is the
        # first k experts: any valid, distinct ids do; they are never trained on.
        k = np.asarray(rounds[0].rollout.routed_experts).shape[-1]
        parts = []
        for s, r in rows:
            x = np.asarray(rounds[s].rollout.routed_experts)[r:r + 1].astype(np.int32)
            filler = np.broadcast_to(np.arange(k, dtype=np.int32),
                                     (1, seq_len - x.shape[1]) + x.shape[2:])
            parts.append(np.concatenate([x, filler], axis=1) if x.shape[1] < seq_len
                         else _fit(x, seq_len, 0))
        batch["routed_experts"] = np.concatenate(parts)
    return batch

