"""Preallocated KV caches and the cached forward passes of the main model and the MTP layer.

Layout: every cache is [layers, B, S_max, NKV, D] in the activation dtype, one per layer stack
(dense prefix, MoE layers) and one per MTP depth. Slot s of row b holds position s of that
row: prompts are RIGHT-padded, so a row's positions are its slots and RoPE sees exactly the
positions of an unpadded run. Each row has its own write index (`index[b]`, the slot of the
first token of the call); a call with T tokens writes slots index..index+T-1 and its token t
attends to slots <= index + t. Anything written beyond (padding of a shorter prompt, a
rejected draft) sits at slots the causal mask hides and is overwritten before it is ever
visible, so no padding mask is needed.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from glm_jax.model.norms_rope import rope_cos_sin
from glm_jax.model.transformer import GlmForCausalLM


@struct.dataclass
class KVCache:
    dense: tuple[jax.Array, jax.Array] | None  # (k, v) [num_dense_layers, B, S_max, NKV, D]
    moe: tuple[jax.Array, jax.Array] | None  # (k, v) [num_moe_layers, B, S_max, NKV, D]
    mtp: tuple[tuple[jax.Array, jax.Array], ...]  # per MTP depth (k, v) [B, S_max, NKV, D]

    @property
    def max_len(self) -> int:
        first = self.dense or self.moe
        return first[0].shape[2]


def init_cache(model: GlmForCausalLM, batch: int, max_len: int, *,
               with_mtp: bool = False) -> KVCache:
    """Zeroed caches for `batch` rows of `max_len` slots (prompt + generated + draft slack)."""
    cfg = model.config
    shape = (batch, max_len, cfg.num_key_value_heads, cfg.head_dim)

    def stack(n: int) -> tuple[jax.Array, jax.Array] | None:
        if not n:
            return None
        return (jnp.zeros((n, *shape), cfg.dtype), jnp.zeros((n, *shape), cfg.dtype))

    mtp = tuple((jnp.zeros(shape, cfg.dtype), jnp.zeros(shape, cfg.dtype))
                for _ in range(cfg.num_mtp_layers if with_mtp else 0))
    return KVCache(dense=stack(cfg.num_dense_layers), moe=stack(cfg.num_moe_layers), mtp=mtp)


def cache_mask(index: jax.Array, t: int, max_len: int) -> jax.Array:
    """[B, T, S_max] bool: token t of row b (at slot index[b] + t) sees slots <= its own."""
    query = index[:, None] + jnp.arange(t, dtype=index.dtype)[None, :]
    return jnp.arange(max_len, dtype=index.dtype)[None, None, :] <= query[:, :, None]


def _rope(model: GlmForCausalLM, index: jax.Array, t: int):
    cfg = model.config
    positions = index[:, None] + jnp.arange(t, dtype=index.dtype)[None, :]
    return rope_cos_sin(positions, cfg.rotary_dim, cfg.rope_theta, jnp.dtype(cfg.dtype))


def forward_cached(model: GlmForCausalLM, input_ids: jax.Array, cache: KVCache,
                   index: jax.Array) -> tuple[jax.Array, jax.Array, KVCache]:
    """The main model on input_ids [B, T] placed at slots index[b]..index[b]+T-1.
    Returns (logits [B, T, V], hidden after the final norm [B, T, H], updated cache).
    Prefill is this with index = 0 and the whole (right-padded) prompt."""
    t = input_ids.shape[1]
    cos, sin = _rope(model, index, t)
    mask = cache_mask(index, t, cache.max_len)
    x = model.embed_tokens(input_ids)
    dense, moe = cache.dense, cache.moe
    if model.dense_layers is not None:
        x, *dense = model.dense_layers.cached(x, cos, sin, mask, *cache.dense, index)
    if model.moe_layers is not None:
        x, *moe = model.moe_layers.cached(x, cos, sin, mask, *cache.moe, index)
    hidden = model.final_norm(x)
    cache = cache.replace(dense=tuple(dense) if dense else None, moe=tuple(moe) if moe else None)
    return model.head(hidden), hidden, cache


def mtp_cached(model: GlmForCausalLM, next_ids: jax.Array, hidden: jax.Array,
               cache: KVCache, index: jax.Array) -> tuple[jax.Array, KVCache]:
    """MTP depth 1 at slots index[b]..: position i reads the main model's hidden state at i
    (after the final norm) and the embedding of token i + 1 (`next_ids`), and predicts token
    i + 2. Returns (logits [B, T, V], cache with the MTP layer's own KV cache updated)."""
    if not cache.mtp:
        raise ValueError("the cache has no MTP layer cache (init_cache(..., with_mtp=True) on a "
                         "model with num_nextn_predict_layers >= 1)")
    t = next_ids.shape[1]
    cos, sin = _rope(model, index, t)
    mask = cache_mask(index, t, cache.max_len)
    h, k, v = model.mtp_layers[0].cached(model.embed_tokens(next_ids), hidden, cos, sin, mask,
                                         *cache.mtp[0], index)
    return model.head(h), cache.replace(mtp=((k, v),) + tuple(cache.mtp[1:]))
