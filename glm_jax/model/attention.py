"""Grouped-query attention with q/k/v biases, QK-norm, partial RoPE and packed-document masks."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name
from jax.sharding import PartitionSpec as P

from glm_jax.config import GlmConfig
from glm_jax.model.norms_rope import RMSNorm, apply_partial_rope
from glm_jax.model.params import Linear
from sharding.mesh import mesh_platform
from sharding.rules import mesh_axes_for


def attention_mask(segment_ids: jax.Array) -> jax.Array:
    """[B, T, T] bool: causal, and a token only sees tokens of its own document."""
    t = segment_ids.shape[1]
    causal = jnp.tril(jnp.ones((t, t), dtype=bool))
    same_doc = segment_ids[:, :, None] == segment_ids[:, None, :]
    return causal[None] & same_doc


class DocumentMask(NamedTuple):
    """Causal self-attention within packed documents, given by segment ids [B, T] int32
    rather than as a [B, T, T] mask, for kernels that never build the T x T matrix."""
    segment_ids: jax.Array


def self_attention_mask(segment_ids: jax.Array, backend: str) -> jax.Array | DocumentMask:
    """The mask the decoder layers get: `DocumentMask` where the fused kernel takes segment
    ids (splash attention, `dot_product_attention` on a TPU mesh), else attention_mask.
    Decided by the devices of the active mesh, not the host's backend."""
    if backend == "dot_product_attention" and mesh_platform() == "tpu":
        return DocumentMask(segment_ids)
    return attention_mask(segment_ids)


# Splash attention tile: queries and keys per block (MaxText's default for TPU training).
SPLASH_BLOCK = 512


def _splash_attention(q, k, v, segment_ids, scale):
    """Causal document attention with the Pallas TPU splash kernel shipped in JAX: scores
    exist one [block, block] tile at a time, never T x T, forward or backward. GQA is native
    (query head h reads KV head h // (NH/NKV)). Pallas calls are not partitioned by the
    compiler, so the kernel runs under shard_map over the batch and head shards of the mesh.
    q is scaled in its own dtype before the kernel (the kernel takes no scale)."""
    from jax.experimental.pallas.ops.tpu.splash_attention import (
        splash_attention_kernel as splash, splash_attention_mask as masks)

    b, t, nh, d = q.shape
    nkv = k.shape[2]
    block = min(SPLASH_BLOCK, t)
    sizes = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block,
                              block_q_dkv=block, block_kv_dkv=block,
                              block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)

    def attend(q, k, v, segment_ids):
        heads = q.shape[2]
        kernel = splash.make_splash_mha(masks.MultiHeadMask([masks.CausalMask((t, t))] * heads),
                                        head_shards=1, q_seq_shards=1, block_sizes=sizes)
        heads_first = lambda a: a.transpose(0, 2, 1, 3)  # noqa: E731  [B, heads, T, D]
        out = jax.vmap(kernel)(heads_first(q * jnp.asarray(scale, q.dtype)), heads_first(k),
                               heads_first(v),
                               segment_ids=splash.SegmentIds(segment_ids, segment_ids))
        return heads_first(out)

    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return attend(q, k, v, segment_ids).reshape(b, t, nh * d)
    shape = dict(mesh.shape)
    batch_axes = mesh_axes_for("batch", shape)
    if b % max(1, _size(shape, batch_axes)):
        batch_axes = ()
    head_axes = tuple(a for a in mesh_axes_for("q_heads", shape)
                      if nh % shape[a] == 0 and nkv % shape[a] == 0)[:1]
    spec = P(batch_axes or None, None, head_axes or None, None)
    out = jax.shard_map(attend, mesh=mesh, in_specs=(spec, spec, spec, P(batch_axes or None)),
                        out_specs=spec, check_vma=False)(q, k, v, segment_ids)
    return out.reshape(b, t, nh * d)


def _size(shape: dict[str, int], axes: tuple[str, ...]) -> int:
    out = 1
    for a in axes:
        out *= shape[a]
    return out


def _einsum_attention(q, k, v, mask, scale):
    """q [B,T,NH,D], k/v [B,S,NKV,D]. Query head h reads KV head h // (NH/NKV)."""
    b, t, nh, d = q.shape
    nkv = k.shape[2]
    q = q.reshape(b, t, nkv, nh // nkv, d)
    scores = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32) * scale
    scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v)
    return out.reshape(b, t, nh * d)


# Queries per chunk of the einsum backend's causal self-attention (measured on the bench
# shapes, T=1024: 128 is 2.5x faster forward+backward than one full T x T block).
CAUSAL_CHUNK = 128


def _chunked_causal_attention(q, k, v, mask, scale, *, remat_chunks: bool = False):
    """Causal self-attention in query chunks: chunk [s, e) reads keys [0, e) only, so the
    masked upper triangle is neither computed nor stored (about half the FLOPs and
    memory traffic at long T).

    remat_chunks: the backward pass recomputes each chunk's scores instead of keeping those
    of every chunk from the forward pass, so one chunk's [B, NH, CHUNK, <=T] scores are live
    at a time (the memory of flash attention, for one more score computation). Without it a
    layer's backward holds about half the T x T scores of all heads."""
    t = q.shape[1]
    if t <= CAUSAL_CHUNK:
        return _einsum_attention(q, k, v, mask, scale)
    attend = jax.checkpoint(_einsum_attention, static_argnums=(4,)) if remat_chunks \
        else _einsum_attention
    return jnp.concatenate([
        attend(q[:, s:s + CAUSAL_CHUNK], k[:, :s + CAUSAL_CHUNK], v[:, :s + CAUSAL_CHUNK],
               mask[:, s:s + CAUSAL_CHUNK, :s + CAUSAL_CHUNK], scale)
        for s in range(0, t, CAUSAL_CHUNK)], axis=1)


def _dpa_attention(q, k, v, mask, scale):
    """jax.nn.dot_product_attention: XLA on CPU, cuDNN flash attention where available."""
    b, t, nh, d = q.shape
    out = jax.nn.dot_product_attention(q, k, v, mask=mask[:, None], scale=scale)
    return out.reshape(b, t, nh * d)


class Attention(nnx.Module):
    def __init__(self, config: GlmConfig, *, rngs: nnx.Rngs):
        h, nh, nkv, d = (config.hidden_size, config.num_attention_heads,
                         config.num_key_value_heads, config.head_dim)
        kw = dict(std=config.initializer_range, dtype=config.dtype,
                  param_dtype=config.param_dtype, rngs=rngs)
        bias = config.attention_bias
        self.q_proj = Linear(h, nh * d, ("embed", "q_heads"), use_bias=bias, **kw)
        self.k_proj = Linear(h, nkv * d, ("embed", "kv_heads"), use_bias=bias, **kw)
        self.v_proj = Linear(h, nkv * d, ("embed", "kv_heads"), use_bias=bias, **kw)
        # o_proj has no bias even when attention_bias is true (transformers' Glm4MoeAttention).
        self.o_proj = Linear(nh * d, h, ("q_heads", "embed"), use_bias=False, **kw)
        if config.use_qk_norm:
            norm = dict(axis_name="head_dim", param_dtype=config.param_dtype)
            self.q_norm = RMSNorm(d, config.rms_norm_eps, **norm)
            self.k_norm = RMSNorm(d, config.rms_norm_eps, **norm)
        else:
            self.q_norm = self.k_norm = None
        self.num_heads, self.num_kv_heads, self.head_dim = nh, nkv, d
        self.backend = config.attention_backend
        # A model that rematerializes its layers trades compute for memory: its attention
        # chunks are recomputed in the backward pass too (see _chunked_causal_attention).
        self.remat_chunks = config.remat_policy != "none"

    def _qkv(self, x: jax.Array, cos: jax.Array, sin: jax.Array):
        b, t, _ = x.shape
        # Named for remat_policy="save_qkv_residual" / "save_kv_residual", which keep the
        # projections' outputs for the backward pass instead of recomputing them; named
        # before the QK norm, whose backward needs its input (identity under other policies).
        q = checkpoint_name(self.q_proj(x), "query_proj").reshape(
            b, t, self.num_heads, self.head_dim)
        k = checkpoint_name(self.k_proj(x), "key_proj").reshape(
            b, t, self.num_kv_heads, self.head_dim)
        v = checkpoint_name(self.v_proj(x), "value_proj").reshape(
            b, t, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:  # per head, over all head_dim dims, before RoPE
            q, k = self.q_norm(q), self.k_norm(k)
        return apply_partial_rope(q, cos, sin), apply_partial_rope(k, cos, sin), v

    def _attend(self, q, k, v, mask, *, self_attention: bool = False) -> jax.Array:
        """self_attention: q and k are the same T positions (no cache), so the einsum
        backend may skip the causal upper triangle chunk by chunk."""
        scale = self.head_dim ** -0.5
        with jax.named_scope("core"):
            if self.backend != "einsum":
                out = _dpa_attention(q, k, v, mask, scale)
            elif self_attention:
                out = _chunked_causal_attention(q, k, v, mask, scale,
                                                remat_chunks=self.remat_chunks)
            else:
                out = _einsum_attention(q, k, v, mask, scale)
        return self.o_proj(out)

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array,
                 mask: jax.Array | DocumentMask, kv: tuple[jax.Array, jax.Array] | None = None, index: jax.Array | None = None
                 ) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
        """x [B, T, H] -> (output [B, T, H], updated kv or None).

        Without `kv` (training, scoring): self-attention over the T positions, mask
        [B, T, T], or a DocumentMask for the TPU splash kernel (see self_attention_mask). With `kv` = (k_cache, v_cache) [B, S_max, NKV, D] (decoding): this call's
        keys / values are written at slots index[b].. of each row, then the queries attend
        over the whole cache; mask [B, T, S_max] must hide the slots not written yet (see
        glm_jax.kv_cache.cache_mask)."""
        q, k, v = self._qkv(x, cos, sin)
        if isinstance(mask, DocumentMask):
            with jax.named_scope("core"):
                out = _splash_attention(q, k, v, mask.segment_ids, self.head_dim ** -0.5)
            return self.o_proj(out), None
        if kv is None:
            return self._attend(q, k, v, mask, self_attention=True), None
        write = jax.vmap(lambda c, u, i: jax.lax.dynamic_update_slice_in_dim(
            c, u.astype(c.dtype), i, axis=0))
        k_cache, v_cache = write(kv[0], k, index), write(kv[1], v, index)
        out = self._attend(q, k_cache.astype(q.dtype), v_cache.astype(v.dtype), mask)
        return out, (k_cache, v_cache)
