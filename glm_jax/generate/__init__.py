"""Text generation: KV-cache decoding and MTP speculative decoding.

    out = glm_jax.generate(model, [[257, 104, 105], [257, 120]], max_new_tokens=64,
                           eos_ids=(256,), speculative="mtp")
    out.tokens[b, :out.lengths[b]], out.acceptance_rate

Prompts of different lengths come as a list of token lists, or as a padded [B, T] array with
its `attention_mask` (1 = token, 0 = padding; left, right or anywhere, as a tokenizer gives
it). Either way each row's tokens are packed to the left of one internal batch; every row
keeps its own write index into a preallocated KV cache (glm_jax.kv_cache), so RoPE
positions are those of an unpadded run: the tokens transformers' `generate` gives for the
same ids and mask (left padding; for right padding, what it gives for each prompt alone). One jitted prefill, then one jitted decode step per call shape (1 token per
step, or 2 with MTP), reused for every token: nothing recompiles per token.

MTP speculation: the MTP layer drafts token p+1 from the main model's hidden state at p-1
(after the final norm) and the embedding of the token at p. One main-model call verifies
[token p, draft] (2 positions): the model's own choice x0 for p+1 is always kept; when it
equals the draft, the choice x1 for p+2 made from the draft's position is kept too. So the
greedy output is identical to plain greedy decoding, and with sampling every token is still
drawn from the main model's distribution (the draft only decides how many tokens a step
yields). The MTP layer has its own KV cache, written in the same step.

For reinforcement learning (glm_jax.rl.rollout): `temperature` may differ per row (one
compiled step serves any mix; 0 = greedy), every kept token comes with its log-probability
under softmax(logits / T), computed in the same jitted step from the logits it was drawn
from (with MTP, x0's from the first verified position and x1's from the second), and
`record_routing=True` records the experts every main-model MoE layer chose for every token:
the prompt's in the prefill, a generated token's in the step that feeds it to the model.
"""

from __future__ import annotations

import dataclasses
import functools
import time
import warnings
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from glm_jax.kv_cache import KVCache, init_cache
from glm_jax.model.transformer import GlmForCausalLM

__all__ = ["GenerateOutput", "generate", "sample", "scale_by_temperature"]


@dataclasses.dataclass
class GenerateOutput:
    tokens: np.ndarray  # [B, max_new_tokens] int32: generated tokens; past lengths[b]: pad_id
    lengths: np.ndarray  # [B] int32: tokens generated per row (an EOS, if hit, included)
    steps: int  # decode-step calls after the prefill
    drafted: int  # MTP drafts checked (rows still generating); 0 without speculation
    accepted: int  # of those, drafts the main model agreed with
    prefill_seconds: float  # wall clock, compilation included on a first call
    decode_seconds: float
    step_seconds: np.ndarray  # [steps] wall clock of each decode step (the first compiles)
    step_tokens: np.ndarray  # [steps] tokens kept by each step, all rows
    # [B, max_new_tokens] float32, aligned with `tokens`: log p(token | everything before)
    # under softmax(logits / T) of the row's temperature T (T = 1 for a greedy row), before
    # any top-k / top-p filter; 0 past lengths[b].
    logprobs: np.ndarray | None = None
    # With record_routing: [B, P + max_new_tokens, num_moe_layers, k] int32, P the longest
    # prompt: the experts each main-model MoE layer chose for every token of row b, its
    # prompt at 0..len_b-1 (the prefill's choice) and its generated tokens from len_b on
    # (the choice of the step that fed the token in); past a row's tokens: 0, 1, .., k-1.
    routed_experts: np.ndarray | None = None

    def decode_tokens_per_second(self, skip: int = 1) -> float:
        """Tokens kept per second of decoding, leaving out the first `skip` steps (the
        first call of a shape compiles in its first step)."""
        seconds = self.step_seconds[skip:].sum()
        return float(self.step_tokens[skip:].sum() / seconds) if seconds > 0 else float("nan")

    @property
    def acceptance_rate(self) -> float | None:
        return self.accepted / self.drafted if self.drafted else None

    def row(self, b: int) -> list[int]:
        return self.tokens[b, :self.lengths[b]].tolist()


@dataclasses.dataclass(frozen=True)
class _Sampling:
    greedy: bool  # every row at temperature 0: argmax only, no random draw
    top_k: int | None
    top_p: float


def sample(logits: jax.Array, key: jax.Array, temperature: float = 0.0,
           top_k: int | None = None, top_p: float = 1.0) -> jax.Array:
    """Token ids [...] from logits [..., V]: argmax when temperature == 0, else a draw from
    softmax(logits / temperature) restricted to the top_k tokens and the top_p nucleus."""
    if temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits.astype(jnp.float32) / temperature
    if top_k is not None:
        kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p < 1.0:
        order = jnp.argsort(-logits, axis=-1)
        sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        # Keep a token when the mass before it is < top_p: the top token always survives.
        keep_sorted = (jnp.cumsum(probs, axis=-1) - probs) < top_p
        keep = jnp.zeros_like(keep_sorted).at[
            tuple(jnp.indices(order.shape)[:-1]) + (order,)].set(keep_sorted)
        logits = jnp.where(keep, logits, -jnp.inf)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def scale_by_temperature(logits: jax.Array, temperature: jax.Array) -> jax.Array:
    """logits [B, ..., V] / each row's temperature [B], in float32; a greedy row (temperature
    0) is scored at temperature 1. The one rule for the distribution a row's tokens are
    scored under, shared by the sampler's log-probabilities and the RL trainer's."""
    t = jnp.where(temperature > 0, temperature, 1.0).astype(jnp.float32)
    return logits.astype(jnp.float32) / t.reshape(t.shape + (1,) * (logits.ndim - 1))


def _draw(logits: jax.Array, key: jax.Array, s: _Sampling, temperature: jax.Array
          ) -> tuple[jax.Array, jax.Array]:
    """Tokens [B, ...] from logits [B, ..., V] at each row's temperature [B] (argmax where it
    is 0), and their log-probabilities [B, ...] float32 under softmax(logits / T), before
    top-k / top-p (the distribution the trainer recomputes)."""
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    scaled = scale_by_temperature(logits, temperature)
    if s.greedy:
        token = greedy
    else:  # the row's scaled logits at temperature 1: the same values `sample` divides to
        drawn = sample(scaled, key, 1.0, s.top_k, s.top_p)
        row_greedy = (temperature == 0).reshape(temperature.shape + (1,) * (logits.ndim - 2))
        token = jnp.where(row_greedy, greedy, drawn)
    logp = jax.nn.log_softmax(scaled, axis=-1)
    return token, jnp.take_along_axis(logp, token[..., None], axis=-1)[..., 0]


def _at(x: jax.Array, i: jax.Array) -> jax.Array:
    """x [B, T, ...] at time i[b] of each row -> [B, ...]."""
    return jax.vmap(lambda row, j: row[j])(x, i)


def _slots(index: jax.Array, ids: jax.Array) -> jax.Array:
    """[B, T] positions (= cache slots) of tokens `ids` written from slot index[b] on."""
    return index[:, None] + jnp.arange(ids.shape[1], dtype=index.dtype)[None, :]


def _forward(model: GlmForCausalLM, ids: jax.Array, cache: KVCache, index: jax.Array):
    """The model on `ids` [B, T] at slots index[b].. -> (logits, hidden states, expert ids
    [B, T, num_moe_layers, k], cache)."""
    out = model(ids, positions=_slots(index, ids), cache=cache)
    return out.logits, out.hidden_states, out.routed_experts, out.cache


def _placement(state) -> jax.sharding.Sharding:
    """Where the cache and the step outputs live: replicated over the weights' mesh, or on
    their one device. Pinning every output to it keeps each step's argument shardings the
    same from call to call, so the step compiles once (left to XLA, the prefill's outputs
    and a step's outputs can come back with different shardings)."""
    for x in jax.tree.leaves(state):
        if isinstance(x.sharding, jax.sharding.NamedSharding):
            return jax.sharding.NamedSharding(x.sharding.mesh, jax.sharding.PartitionSpec())
    return jax.sharding.SingleDeviceSharding(next(iter(jax.tree.leaves(state)[0].devices())))


def _pin(tree, placement):
    return jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x, placement), tree)


@functools.partial(jax.jit, static_argnames=("graphdef", "sampling", "draft", "placement"),
                   donate_argnames=("cache",))
def _prefill(graphdef, state, prompt, lengths, cache: KVCache, key, temperature, *,
             sampling: _Sampling, draft: bool, placement):
    """The whole right-padded prompt at slots 0..T-1. Returns (first generated token [B],
    its log-probability [B], MTP draft of the token after it [B] (or zeros), the prompt's
    expert ids [B, T, L, k], cache)."""
    model = nnx.merge(graphdef, state)
    b = prompt.shape[0]
    zeros = jnp.zeros((b,), jnp.int32)
    logits, hidden, routing, cache = _forward(model, prompt, cache, zeros)
    last = lengths - 1
    token, logp = _draw(_at(logits, last), key, sampling, temperature)
    if not draft:
        return _pin((token, logp, zeros, routing, cache), placement)
    # MTP position i reads token i + 1: the prompt shifted left, with the new token at the
    # last prompt position. Slots past a row's length get junk that the mask hides.
    next_ids = jnp.concatenate([prompt[:, 1:], prompt[:, -1:]], axis=1)
    next_ids = jax.vmap(lambda row, j, tok: row.at[j].set(tok))(next_ids, last, token)
    mtp_logits, cache = model.mtp_draft(next_ids, hidden, positions=_slots(zeros, next_ids),
                                        cache=cache)
    draft_ids = jnp.argmax(_at(mtp_logits, last), axis=-1).astype(jnp.int32)
    return _pin((token, logp, draft_ids, routing, cache), placement)


@functools.partial(jax.jit, static_argnames=("graphdef", "sampling", "placement"),
                   donate_argnames=("cache",))
def _decode_step(graphdef, state, token, index, cache: KVCache, key, temperature, *,
                 sampling: _Sampling, placement):
    """Plain decoding: token [B] at slot index[b] -> (next token [B], its log-probability
    [B], the fed token's expert ids [B, L, k], cache)."""
    model = nnx.merge(graphdef, state)
    logits, _, routing, cache = _forward(model, token[:, None], cache, index)
    token, logp = _draw(logits[:, 0], key, sampling, temperature)
    return _pin((token, logp, routing[:, 0], cache), placement)


@functools.partial(jax.jit, static_argnames=("graphdef", "sampling", "placement"),
                   donate_argnames=("cache",))
def _speculative_step(graphdef, state, token, draft, index, cache: KVCache, key, temperature,
                      *, sampling: _Sampling, placement):
    """Verify [token, draft] at slots index, index+1 and draft again.
    Returns (chosen [B, 2], their log-probabilities [B, 2], accepted [B], new draft [B],
    expert ids of [token, draft] [B, 2, L, k], cache): chosen[:, 0] = x0 is the model's
    token for index+1; when accepted (x0 == draft), chosen[:, 1] = x1 is its token for
    index+2, drawn from the logits at the draft's position (then the draft is x0)."""
    model = nnx.merge(graphdef, state)
    logits, hidden, routing, cache = _forward(model, jnp.stack([token, draft], axis=1), cache,
                                              index)
    chosen, logp = _draw(logits, key, sampling, temperature)  # [B, 2] each
    accepted = chosen[:, 0] == draft
    # MTP at slot index reads (hidden at index, x0): right in both cases. At index+1 it reads
    # (hidden at index+1, x1), valid only when the draft was accepted; otherwise that slot is
    # rewritten by the next step before anything attends to it.
    mtp_logits, cache = model.mtp_draft(chosen, hidden, positions=_slots(index, chosen),
                                        cache=cache)
    new_draft = jnp.argmax(_at(mtp_logits, accepted.astype(jnp.int32)), axis=-1)
    return _pin((chosen, logp, accepted, new_draft.astype(jnp.int32), routing, cache),
                placement)


def _as_batch(input_ids, pad_id: int, attention_mask=None, known_pad: int | None = None
              ) -> tuple[np.ndarray, np.ndarray]:
    """A 2-D array (with its attention mask, if padded), or a list of 1-D token sequences
    of any lengths -> (right-padded [B, T] int32, lengths [B])."""
    if attention_mask is not None:
        ids, mask = np.asarray(input_ids), np.asarray(attention_mask)
        if ids.ndim != 2 or mask.shape != ids.shape:
            raise ValueError(f"attention_mask has shape {list(mask.shape)}; it must be the "
                             f"[B, T] shape of input_ids, {list(ids.shape)}")
        if not np.isin(mask, (0, 1)).all():
            raise ValueError("attention_mask must hold only 1 (token) and 0 (padding)")
        # Masked slots are dropped wherever they are: transformers numbers positions by the
        # cumulative sum of the mask and hides masked keys, which is the same as their absence.
        rows = [r[m.astype(bool)] for r, m in zip(ids, mask)]
    elif isinstance(input_ids, (np.ndarray, jax.Array)) and np.ndim(input_ids) == 2:
        rows = list(np.asarray(input_ids))
        if known_pad is not None and (np.asarray(input_ids) == known_pad).any():
            warnings.warn(
                f"input_ids contains the pad id {known_pad} but no attention_mask was given: "
                "every token counts as prompt, padding included; pass attention_mask (1 = "
                "token, 0 = padding), e.g. the tokenizer's, or a list of unpadded prompts",
                stacklevel=3)
    elif isinstance(input_ids, Sequence) and input_ids and all(
            np.ndim(r) == 1 for r in input_ids):
        rows = [np.asarray(r) for r in input_ids]
    else:
        raise ValueError("input_ids must be a [B, T] array or a non-empty list of 1-D token "
                         "sequences")
    lengths = np.array([len(r) for r in rows], np.int32)
    if (lengths == 0).any():
        raise ValueError(f"input_ids: empty prompt in row(s) {np.flatnonzero(lengths == 0)}")
    batch = np.full((len(rows), lengths.max()), pad_id, np.int32)
    for b, r in enumerate(rows):
        if not np.issubdtype(r.dtype, np.integer):
            raise ValueError(f"input_ids row {b}: token ids must be integers, got {r.dtype}")
        batch[b, :len(r)] = r
    return batch, lengths


def _temperatures(temperature, b: int) -> np.ndarray:
    """One temperature, or one per row -> [B] float32; ValueError if negative or misshaped."""
    temps = np.asarray(temperature, np.float32)
    if temps.ndim == 0:
        temps = np.full(b, temps, np.float32)
    if temps.shape != (b,) or not np.isfinite(temps).all() or (temps < 0).any():
        raise ValueError(f"temperature={temperature!r}: must be one number >= 0 or one per "
                         f"prompt ({b} numbers >= 0)")
    return temps


class _RoutingRecord:
    """The expert ids of every real token of every row, filled as tokens are fed to the
    model: the prompt by the prefill, a generated token by the step that takes it as input
    (the step after it was drawn; a final step feeds the last ones)."""

    def __init__(self, b: int, width: int, layers: int, k: int, lengths: np.ndarray):
        # Past a row's tokens: k distinct ids, a harmless replay for padding positions.
        self.ids = np.broadcast_to(np.arange(k, dtype=np.int32), (b, width, layers, k)).copy()
        self.done = lengths.copy()  # slots recorded so far: [0, done[b])

    def prefill(self, routing: np.ndarray, lengths: np.ndarray) -> None:
        for r, n in enumerate(lengths):
            self.ids[r, :n] = routing[r, :n]

    def step(self, routing: np.ndarray, index: np.ndarray, real: np.ndarray,
             fed: np.ndarray) -> None:
        """routing [B, S, L, k] of the S tokens fed at slots index[b].. of this step; the
        token at slot s is recorded when it is the next unrecorded one of its row, is a real
        token (s < real[b]: the row's prompt + generated length after the step) and, for
        s > index[b] (a draft), was kept (fed[b, s - index[b]])."""
        for r in range(routing.shape[0]):
            for p in range(routing.shape[1]):
                slot = index[r] + p
                if slot == self.done[r] and slot < real[r] and fed[r, p]:
                    self.ids[r, slot] = routing[r, p]
                    self.done[r] += 1

    def missing(self, real: np.ndarray) -> bool:
        return bool((self.done < real).any())


def _under_model_mesh(fn: Callable) -> Callable:
    """Runs `fn(model, ...)` under the mesh the model was placed on (`GlmForCausalLM(...,
    mesh=)` or `sharding.rules.shard_model`), as the trainer runs its step: an
    expert-parallel model then decodes without its caller entering the mesh."""
    @functools.wraps(fn)
    def under_mesh(model, *args, **kwargs):
        mesh = getattr(model, "mesh", None)
        if mesh is None:
            return fn(model, *args, **kwargs)
        with jax.set_mesh(mesh):
            return fn(model, *args, **kwargs)
    return under_mesh


@_under_model_mesh
def generate(model: GlmForCausalLM, input_ids, *, max_new_tokens: int,
             temperature: float | Sequence[float] = 0.0, top_p: float = 1.0,
             top_k: int | None = None, eos_ids: Sequence[int] = (), seed: int = 0,
             speculative: str = "none", pad_id: int | None = None, attention_mask=None,
             record_routing: bool = False,
             on_tokens: Callable[[list[list[int]]], None] | None = None) -> GenerateOutput:
    """Continue every prompt by up to `max_new_tokens` tokens; a row stops at any of
    `eos_ids` (the EOS is kept in its output). input_ids: [B, T] or a list of token lists of
    different lengths. attention_mask: [B, T] of 1 (token) / 0 (padding) for a padded
    input_ids, as from a tokenizer; without it every entry of a [B, T] array is a prompt
    token (a warning says so when it holds the pad id). temperature: one for all rows or
    one per row ([B]); 0 = greedy. speculative: "none", or "mtp"
    (needs num_nextn_predict_layers >= 1). pad_id: the padding id (default: the config's
    pad token); it also fills the output past each row's length (0 if neither is set).
    record_routing: also return every token's main-model expert choices
    (GenerateOutput.routed_experts; costs one more decode step to feed the last tokens).
    on_tokens, if given, is called after every step with each row's new tokens.
    Every kept token's log-probability comes with it (GenerateOutput.logprobs)."""
    cfg = model.config
    if speculative not in ("none", "mtp"):
        raise ValueError(f"speculative={speculative!r}: must be 'none' or 'mtp'")
    if speculative == "mtp" and cfg.num_mtp_layers < 1:
        raise ValueError("speculative='mtp' needs an MTP layer; this model has "
                         "num_nextn_predict_layers=0")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens!r}: must be a positive integer")
    if not 0 < top_p <= 1 or (top_k is not None and not 0 < top_k <= cfg.vocab_size):
        raise ValueError(f"top_p={top_p}, top_k={top_k}: need 0 < top_p <= 1, "
                         f"0 < top_k <= vocab_size")
    known_pad = pad_id if pad_id is not None else cfg.pad_token_id
    pad_id = known_pad if known_pad is not None else 0
    prompt, lengths = _as_batch(input_ids, pad_id, attention_mask, known_pad)
    if prompt.max() >= cfg.vocab_size or prompt.min() < 0:
        raise ValueError(f"input_ids: token ids must be in [0, {cfg.vocab_size})")
    mtp = speculative == "mtp"
    b, t = prompt.shape
    temps = _temperatures(temperature, b)
    # A row still generating has count < max_new_tokens tokens and its newest one at slot
    # len + count - 1, so a step writes at most slot len + max_new_tokens - 1 (the draft's
    # slot, with MTP). Finished rows are still fed (the batch moves together); their writes
    # may clamp at the end of the cache, which only ever touches their own finished row.
    # The routing record's final step feeds a row's last token at slot len + max_new - 1
    # with its draft one further: one more slot keeps that write from clamping onto it.
    graphdef, state = nnx.split(model)
    placement = _placement(state)
    put = functools.partial(jax.device_put, device=placement)
    cache = put(init_cache(model, b, t + max_new_tokens + int(mtp and record_routing),
                           with_mtp=mtp))
    sampling = _Sampling(bool((temps == 0).all()), top_k, float(top_p))
    key = put(jax.random.key(seed))
    temps_dev = put(temps)
    eos = np.array(sorted(set(int(e) for e in eos_ids)), np.int32)

    out = np.full((b, max_new_tokens), pad_id, np.int32)
    out_logp = np.zeros((b, max_new_tokens), np.float32)
    count = np.zeros(b, np.int32)
    done = np.zeros(b, bool)
    record = (_RoutingRecord(b, t + max_new_tokens, cfg.num_moe_layers,
                             cfg.num_experts_per_tok, lengths) if record_routing else None)

    def emit(rows: list[list[tuple[int, float]]]) -> int:
        fresh = []
        for r, toks in enumerate(rows):
            new = []
            for tok, logp in toks if not done[r] else ():
                out[r, count[r]], out_logp[r, count[r]] = tok, logp
                count[r] += 1
                new.append(tok)
                if tok in eos or count[r] >= max_new_tokens:
                    done[r] = True
                    break
            fresh.append(new)
        if on_tokens is not None:
            on_tokens(fresh)
        return sum(map(len, fresh))

    start = time.perf_counter()
    token, logp, draft, routing, cache = _prefill(
        graphdef, state, put(prompt), put(lengths), cache, put(jax.random.fold_in(key, 0)),
        temps_dev, sampling=sampling, draft=mtp, placement=placement)
    token_np, logp_np = np.asarray(token), np.asarray(logp)
    emit([[(int(x), float(lp))] for x, lp in zip(token_np, logp_np)])
    if record is not None:
        record.prefill(np.asarray(routing), lengths)
    prefill_seconds = time.perf_counter() - start

    start = time.perf_counter()
    index = lengths.copy()  # the slot of each row's newest token (not yet in the cache)
    steps = drafted = accepted = 0
    step_seconds, step_tokens = [], []
    # The loop runs while a row generates; with a routing record, once more to feed the
    # rows' last tokens (that step's draws are dropped: every row is done).
    while not done.all() or (record is not None and record.missing(lengths + count)):
        clock = time.perf_counter()
        steps += 1
        active = ~done
        step_key = put(jax.random.fold_in(key, steps))
        step_index = index
        if mtp:
            chosen, logp, acc, draft, routing, cache = _speculative_step(
                graphdef, state, token, draft, put(index), cache, step_key, temps_dev,
                sampling=sampling, placement=placement)
            chosen, logp, acc = np.asarray(chosen), np.asarray(logp), np.asarray(acc)
            drafted += int(active.sum())
            accepted += int((acc & active).sum())
            kept = emit([[(int(chosen[r, j]), float(logp[r, j])) for j in range(1 + acc[r])]
                         for r in range(b)])
            token = put(np.where(acc, chosen[:, 1], chosen[:, 0]))
            index = np.where(active, index + 1 + acc, index)
            fed = np.stack([np.ones(b, bool), acc], axis=1)
        else:
            token, logp, routing, cache = _decode_step(
                graphdef, state, token, put(index), cache, step_key, temps_dev,
                sampling=sampling, placement=placement)
            logp = np.asarray(logp)
            kept = emit([[(int(x), float(lp))] for x, lp in zip(np.asarray(token), logp)])
            index = np.where(active, index + 1, index)
            routing, fed = np.asarray(routing)[:, None], np.ones((b, 1), bool)
        if record is not None:
            record.step(np.asarray(routing), step_index, lengths + count, fed)
        step_tokens.append(kept)
        step_seconds.append(time.perf_counter() - clock)
    return GenerateOutput(tokens=out, lengths=count, steps=steps, drafted=drafted,
                          accepted=accepted, prefill_seconds=prefill_seconds,
                          decode_seconds=time.perf_counter() - start,
                          step_seconds=np.array(step_seconds), step_tokens=np.array(step_tokens),
                          logprobs=out_logp,
                          routed_experts=None if record is None else record.ids)
