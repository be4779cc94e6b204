"""Preallocated KV caches for decoding with `GlmForCausalLM.__call__(..., cache=...)` and
`GlmForCausalLM.mtp_draft`.

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

from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
from flax import struct

if TYPE_CHECKING:
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


def init_cache(model: "GlmForCausalLM", batch: int, max_len: int, *,
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
