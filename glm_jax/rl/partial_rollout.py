"""Partial rollouts: a generation that a weight update interrupts continues with the new
weights (slime's --partial-rollout), each token stamped with the version that sampled it.

The rows are generated in chunks of `chunk_tokens` tokens. Before every chunk the engine
asks for the newest published weights; the unfinished rows (all of the same completion
length: a row leaves only by an EOS or at max_new_tokens) are continued from their prompt +
completion so far, re-prefilled under those weights, which is exact: the continuation's
tokens are drawn from p_new(token | prompt, completion so far), and the recorded
log-probability of every token is the one of the weights that drew it. The price of
exactness without a KV cache that survives a weight change is one prefill per chunk
(cheap next to decoding on the short chunks it replaces; a chunk as long as
max_new_tokens is the ordinary one-shot rollout).

A chunk continues only the unfinished rows, padded to a power-of-two row count with
copies of them (whose tokens are thrown away): the jitted prefill and decode then see few
distinct batch shapes (each new shape compiles), and the copies stop at an EOS like the
rows they copy, so they do not keep a chunk decoding after its real rows are done.

The router choices kept for routing replay are the last chunk's: its prefill re-routes
every earlier token under the newest weights the row saw, which are the weights closest to
the trainer's (a token sampled under older weights has no single routing that fits both).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import numpy as np

from glm_jax.model.transformer import GlmForCausalLM
from glm_jax.rl.rollout import Rollout, rollout

__all__ = ["chunked_rollout"]

WeightsSource = Callable[[], tuple[GlmForCausalLM, int]]  # () -> (model, policy version)


def chunk_seed(seed: int, chunk: int) -> int:
    """The sampling seed of chunk `chunk` of a rollout seeded `seed`."""
    return int(np.random.SeedSequence([seed, chunk]).generate_state(1)[0] >> 1)


def chunked_rollout(weights: WeightsSource, prompts: Sequence[Sequence[int]], *,
                    samples_per_prompt: int, max_new_tokens: int, chunk_tokens: int,
                    temperature: float | Sequence[float], eos_ids: Sequence[int], seed: int,
                    pad_id: int, speculative: str = "none", record_routing: bool = True,
                    on_chunk: Callable[[int], None] | None = None) -> Rollout:
    """glm_jax.rl.rollout.rollout, in chunks of `chunk_tokens` new tokens, each chunk with
    the model `weights()` returns at its start (see the module doc). The Rollout's
    `policy_version` says, per completion token, which version drew it. `on_chunk(c)` is
    called after chunk c (c = 0, 1, ...), e.g. to publish weights between chunks.
    Raises ValueError for chunk_tokens < 1 (and what rollout rejects)."""
    if not isinstance(chunk_tokens, int) or chunk_tokens < 1:
        raise ValueError(f"chunk_tokens={chunk_tokens!r}: must be a positive integer")
    p, g = len(prompts), samples_per_prompt
    temps = np.asarray(temperature, np.float32)
    temps = np.full(p, temps, np.float32) if temps.ndim == 0 else temps
    if temps.shape != (p,):
        raise ValueError(f"temperature={temperature!r}: one number or one per prompt ({p})")
    rows = [list(map(int, prompts[i])) for i in range(p) for _ in range(g)]
    row_temps = np.repeat(temps, g)
    n = len(rows)
    completions: list[list[int]] = [[] for _ in range(n)]
    logprobs: list[list[float]] = [[] for _ in range(n)]
    versions: list[list[int]] = [[] for _ in range(n)]
    routing: list[np.ndarray | None] = [None] * n
    done = np.zeros(n, bool)
    eos = set(int(e) for e in eos_ids)
    clock = time.perf_counter()
    chunk = 0
    while not done.all():
        model, version = weights()
        active = np.flatnonzero(~done)
        made = len(completions[active[0]])
        # The same max_new_tokens every chunk (one cache size); the last chunk's surplus
        # tokens are dropped below.
        asked = min(chunk_tokens, max_new_tokens)
        bucket = min(1 << (len(active) - 1).bit_length(), n)
        padded = np.resize(active, bucket)  # the active rows, then copies of them
        out = rollout(model, [rows[r] + completions[r] for r in padded], samples_per_prompt=1,
                      max_new_tokens=asked, temperature=row_temps[padded], eos_ids=eos_ids,
                      seed=chunk_seed(seed, chunk), pad_id=pad_id, speculative=speculative,
                      record_routing=record_routing, policy_version=version)
        room = min(asked, max_new_tokens - made)  # the tokens this chunk may add to a row
        for i, r in enumerate(active):  # row i of the chunk continues row r
            start = int(out.prompt_lengths[i])
            m = min(int(out.completion_lengths[i]), room)
            new = out.tokens[i, start:start + m].tolist()
            completions[r] += new
            logprobs[r] += out.logprobs[i, start:start + m].tolist()
            versions[r] += [version] * m
            if out.routed_experts is not None:
                routing[r] = np.asarray(out.routed_experts[i, :start + m])
            if m < room or (new and new[-1] in eos) or len(completions[r]) >= max_new_tokens:
                done[r] = True
        if on_chunk is not None:
            on_chunk(chunk)
        chunk += 1
    seconds = time.perf_counter() - clock

    prompt_lengths = np.array([len(r) for r in rows], np.int32)
    width = int(prompt_lengths.max()) + max_new_tokens
    tokens = np.full((n, width), pad_id, np.int32)
    lp = np.zeros((n, width), np.float32)
    ver = np.full((n, width), -1, np.int32)
    for r in range(n):
        s, m = len(rows[r]), len(completions[r])
        tokens[r, :s] = rows[r]
        tokens[r, s:s + m] = completions[r]
        lp[r, s:s + m] = logprobs[r]
        ver[r, s:s + m] = versions[r]
    experts = None
    if record_routing:
        # Past a row's end the replayed choice is the first k experts (never trained on).
        k = routing[0].shape[-1]
        experts = np.broadcast_to(np.arange(k, dtype=np.int32),
                                  (n, width) + routing[0].shape[1:]).copy()
        for r in range(n):
            experts[r, :len(routing[r])] = routing[r]
    return Rollout(tokens=tokens, prompt_lengths=prompt_lengths,
                   completion_lengths=np.array([len(c) for c in completions], np.int32),
                   logprobs=lp, routed_experts=experts, temperature=row_temps,
                   prompt_index=np.repeat(np.arange(p, dtype=np.int32), g),
                   policy_version=ver, seconds=seconds,
                   generated_tokens=int(sum(len(c) for c in completions)))
