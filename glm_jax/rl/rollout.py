"""The rollout engine: G sampled completions per prompt through glm_jax.generate, with what
the trainer needs to score them as the sampler did.

    batch = rollout(model, prompts, samples_per_prompt=8, max_new_tokens=256,
                    temperature=[0.7, 1.0], eos_ids=(256,), seed=step, pad_id=258)
    batch.tokens[n, :batch.prompt_lengths[n] + batch.completion_lengths[n]]

For every sampled token the engine keeps its log-probability under the distribution it was
drawn from (the row's logits / temperature, computed inside the jitted decode step from the
same logits the draw used), and with `record_routing` the experts every main-model MoE layer
chose for every token. The trainer's forward replays those choices
(`GlmForCausalLM.__call__(..., routed_experts=...)`), so a near-tie in a router that the
trainer's numerics break the other way does not turn into a different expert and a
corrupted probability ratio ("rollout routing replay"); what mismatch remains is corrected
by truncated importance sampling against `logprobs` (glm_jax.rl.objective).

The engine runs colocated with the trainer here (the same weights, one process). The
record is plain numpy with a `policy_version` per token, so an asynchronous engine that
runs a few weight versions behind can hand over the same record.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence

import numpy as np

from glm_jax.generate import generate
from glm_jax.model.transformer import GlmForCausalLM

__all__ = ["Rollout", "rollout"]


@dataclasses.dataclass
class Rollout:
    """N = prompts x samples_per_prompt rows; T = longest prompt + max_new_tokens.

    Every [N, T] array is aligned with `tokens`: position t describes token t."""

    tokens: np.ndarray  # [N, T] int32: prompt + completion, right-padded with pad_id
    prompt_lengths: np.ndarray  # [N] int32
    completion_lengths: np.ndarray  # [N] int32 (an EOS, if hit, included)
    # [N, T] float32: log p(token t | tokens < t) under softmax(logits / temperature) of the
    # row (temperature 1 for a greedy row; no top-k / top-p), 0 on prompt and padding.
    logprobs: np.ndarray
    # [N, T, num_moe_layers, k] int32: each main-model MoE layer's experts for every token
    # (prompt tokens: the prefill's choice); padding positions hold 0..k-1. None when not
    # recorded.
    routed_experts: np.ndarray | None
    temperature: np.ndarray  # [N] float32, the row's sampling temperature
    prompt_index: np.ndarray  # [N] int32: the prompt a row continues; a prompt's G samples
    # are G consecutive rows
    policy_version: np.ndarray  # [N, T] int32: the weights version of each completion
    # token, -1 on prompt and padding
    seconds: float  # wall time of the rollout, compilation of a first call included
    generated_tokens: int  # completion tokens, all rows
    acceptance_rate: float | None = None  # MTP drafts accepted / checked; None without

    @property
    def completion_mask(self) -> np.ndarray:
        """[N, T] bool: True on completion tokens (the ones a policy loss trains on)."""
        t = np.arange(self.tokens.shape[1])[None, :]
        start = self.prompt_lengths[:, None]
        return (t >= start) & (t < start + self.completion_lengths[:, None])

    def completion(self, n: int) -> list[int]:
        """Row n's completion tokens."""
        start = int(self.prompt_lengths[n])
        return self.tokens[n, start:start + int(self.completion_lengths[n])].tolist()

    @property
    def tokens_per_second(self) -> float:
        return self.generated_tokens / self.seconds if self.seconds > 0 else float("nan")


def rollout(model: GlmForCausalLM, prompts: Sequence[Sequence[int]], *,
            samples_per_prompt: int, max_new_tokens: int,
            temperature: float | Sequence[float], eos_ids: Sequence[int], seed: int,
            pad_id: int, speculative: str = "none", record_routing: bool = True,
            policy_version: int = 0) -> Rollout:
    """Sample `samples_per_prompt` completions of every prompt in one batched generation.

    prompts: P token-id sequences (any lengths >= 1). temperature: one for all prompts or
    one per prompt (>= 0; 0 = greedy). eos_ids: a row stops at any of them (kept).
    seed: the sampling seed (the same seed, weights and prompts give the same rollout).
    speculative: "none" or "mtp" (MTP speculative decoding: the same distribution per
    token, fewer model calls). record_routing: record every token's expert choices
    (costs one extra decode step). policy_version: the weights version stamped on every
    completion token.

    Raises ValueError for an empty prompt list or prompt, samples_per_prompt < 1, a temperature list
    of the wrong length or a negative temperature (and whatever generate rejects)."""
    if not prompts:
        raise ValueError("rollout: prompts is empty; pass at least one token-id sequence")
    if not isinstance(samples_per_prompt, int) or samples_per_prompt < 1:
        raise ValueError(f"samples_per_prompt={samples_per_prompt!r}: must be an integer >= 1")
    p, g = len(prompts), samples_per_prompt
    temps = np.asarray(temperature, np.float32)
    if temps.ndim == 0:
        temps = np.full(p, temps, np.float32)
    if temps.shape != (p,) or (temps < 0).any() or not np.isfinite(temps).all():
        raise ValueError(f"temperature={temperature!r}: must be one number >= 0 or one per "
                         f"prompt ({p} numbers >= 0)")
    empty = [i for i in range(p) if len(prompts[i]) == 0]
    if empty:
        raise ValueError(f"rollout: prompt(s) {empty} are empty; every prompt needs a token")
    rows = [np.asarray(prompts[i], np.int32) for i in range(p) for _ in range(g)]
    row_temps = np.repeat(temps, g)

    clock = time.perf_counter()
    out = generate(model, rows, max_new_tokens=max_new_tokens, temperature=row_temps,
                   eos_ids=eos_ids, seed=seed, speculative=speculative, pad_id=pad_id,
                   record_routing=record_routing)
    seconds = time.perf_counter() - clock

    n = p * g
    prompt_lengths = np.array([len(r) for r in rows], np.int32)
    width = int(prompt_lengths.max()) + max_new_tokens
    tokens = np.full((n, width), pad_id, np.int32)
    logprobs = np.zeros((n, width), np.float32)
    versions = np.full((n, width), -1, np.int32)
    for r, prompt in enumerate(rows):
        start, m = len(prompt), int(out.lengths[r])
        tokens[r, :start] = prompt
        tokens[r, start:start + m] = out.tokens[r, :m]
        logprobs[r, start:start + m] = out.logprobs[r, :m]
        versions[r, start:start + m] = policy_version
    return Rollout(tokens=tokens, prompt_lengths=prompt_lengths,
                   completion_lengths=out.lengths.astype(np.int32), logprobs=logprobs,
                   routed_experts=out.routed_experts, temperature=row_temps,
                   prompt_index=np.repeat(np.arange(p, dtype=np.int32), g),
                   policy_version=versions, seconds=seconds,
                   generated_tokens=int(out.lengths.sum()),
                   acceptance_rate=out.acceptance_rate)
