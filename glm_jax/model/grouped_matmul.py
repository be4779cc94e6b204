"""Backends for the routed experts' SwiGLU over token rows sorted by expert.

Every backend takes rows already sorted by expert (`x_rows` [M, H], `row_expert` [M] in
ascending order, `group_sizes` [E]) and the stacked expert weights, and returns
(`y_rows` [M, H], `dropped` number of rows not computed). Expert parallelism calls the
same functions on the rows a device received, so nothing here knows about meshes.

- `ragged_dot`: a grouped matmul, chosen by the mesh's platform (`grouped_matmul`): the
  Pallas megablox gmm/tgmm pair on TPU, `jax.lax.ragged_dot` on GPU (and CPU, where it is
  about 70x slower than a batched einsum, docs: cpu-baselines, so it is not the CPU path).
- `buckets`: rows are scattered into fixed-size buckets, each owned by one expert. Dropless
  by default: each expert's rows are padded to whole blocks, the block count has a static
  bound, no row is ever dropped, and the blocks are run one at a time by `block_swiglu`
  (no per-block weight copies). With a capacity factor, each expert gets one bucket of
  static capacity, one batched einsum runs them all, and overflow rows (the later tokens)
  are dropped and counted.
The dense every-token-through-every-expert reference lives in moe.py (it needs no sort).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from glm_jax.model.block_swiglu import block_swiglu


def _swiglu(x, w_gate, w_up, w_down):
    """SwiGLU over a leading bucket axis: x [N, R, H], weights [N, H, F] / [N, F, H]."""
    h = jax.nn.silu(jnp.einsum("nrh,nhf->nrf", x, w_gate)) * jnp.einsum("nrh,nhf->nrf", x, w_up)
    return jnp.einsum("nrf,nfh->nrh", h, w_down)


# megablox tile (rows, contraction, output columns): the kernel's default. The backward
# swaps contraction and output dimensions, so both must be multiples of the 128-lane tile.
GMM_TILE = (128, 128, 128)


def _megablox_gmm(x, w, group_sizes):
    """x [M, K] @ w [G, K, N] per group on TPU: the Pallas megablox kernel pair shipped in
    JAX (gmm forward and input gradient, tgmm weight gradient under its custom_vjp), which
    computes only the rows of each group. `jax.lax.ragged_dot` on TPU lowers its weight
    gradient densely over all G groups (G/k times the work; docs/scaling.md). Rows past
    sum(group_sizes) are not computed by the kernel; they are returned as zeros."""
    from jax.experimental.pallas.ops.tpu import megablox

    m = x.shape[0]
    tm = min(GMM_TILE[0], -(-m // 8) * 8)
    pad = -m % tm
    xp = jnp.pad(x, ((0, pad), (0, 0))) if pad else x
    y = megablox.gmm(xp, w, group_sizes, x.dtype, (tm, GMM_TILE[1], GMM_TILE[2]))[:m]
    valid = jnp.arange(m) < jnp.sum(group_sizes)
    return jnp.where(valid[:, None], y, 0)


def grouped_matmul(x: jax.Array, w: jax.Array, group_sizes: jax.Array,
                   platform: str) -> jax.Array:
    """x [M, K] rows sorted by group, w [G, K, N], group_sizes [G] int32 -> [M, N] in
    x.dtype; rows past sum(group_sizes) are zero. `platform` is the mesh's
    (sharding.mesh.mesh_platform): megablox on TPU when K and N are multiples of its
    128-wide tiles (every real GLM size), `jax.lax.ragged_dot` elsewhere."""
    if platform == "tpu" and x.shape[1] % GMM_TILE[1] == 0 and w.shape[2] % GMM_TILE[2] == 0:
        return _megablox_gmm(x, w, group_sizes)
    return jax.lax.ragged_dot(x, w, group_sizes)


def ragged_dot_ffn(x_rows, row_expert, group_sizes, w_gate, w_up, w_down, capacity_factor=None,
                   *, platform: str = "cpu"):
    """The grouped-matmul backend: `grouped_matmul` for the mesh's platform."""
    del row_expert
    if capacity_factor is not None:
        raise ValueError("moe_backend='ragged_dot' is dropless; capacity_factor must be None")
    gate = grouped_matmul(x_rows, w_gate, group_sizes, platform)
    up = grouped_matmul(x_rows, w_up, group_sizes, platform)
    y = grouped_matmul(jax.nn.silu(gate) * up, w_down, group_sizes, platform)
    return y, jnp.zeros((), jnp.int32)


def dropless_block_size(num_rows: int, num_experts: int) -> int:
    """Rows per block. Padding costs at most one block per expert, so blocks of a quarter
    of the balanced group size bound the extra work at about 25% (a multiple of 8 rows)."""
    balanced = max(1, num_rows // num_experts)
    return max(8, -(-balanced // 4 // 8) * 8)


def bucket_ffn(x_rows, row_expert, group_sizes, w_gate, w_up, w_down, capacity_factor=None,
               *, platform: str = "cpu"):
    del platform  # plain XLA ops: the same program on every platform
    m, _ = x_rows.shape
    e = group_sizes.shape[0]
    starts = jnp.cumsum(group_sizes) - group_sizes
    offset = jnp.arange(m, dtype=jnp.int32) - starts[row_expert]  # rank of a row in its expert

    if capacity_factor is not None:
        # One bucket per expert; its owner is static, so the weights are used as they are.
        capacity = max(1, math.ceil(capacity_factor * m / e))
        kept = offset < capacity
        slot = jnp.where(kept, row_expert * capacity + offset, e * capacity)  # overflow -> trash
        buf = jnp.zeros((e * capacity + 1, x_rows.shape[1]), x_rows.dtype).at[slot].set(x_rows)
        y = _swiglu(buf[:-1].reshape(e, capacity, -1), w_gate, w_up, w_down)
        y = jnp.concatenate([y.reshape(e * capacity, -1), jnp.zeros_like(buf[:1])])[slot]
        return jnp.where(kept[:, None], y, 0), jnp.sum(~kept).astype(jnp.int32)

    # Dropless: expert g owns ceil(size_g / block) consecutive blocks; in total at most
    # floor(m / block) + e blocks, a static bound. Blocks past the used count are skipped.
    block = dropless_block_size(m, e)
    num_blocks = m // block + e
    blocks_per_expert = -(-group_sizes // block)
    block_end = jnp.cumsum(blocks_per_expert)
    slot = (block_end - blocks_per_expert)[row_expert] * block + offset
    block_owner = jnp.minimum(jnp.searchsorted(block_end, jnp.arange(num_blocks), side="right"),
                              e - 1).astype(jnp.int32)
    buf = jnp.zeros((num_blocks * block, x_rows.shape[1]), x_rows.dtype).at[slot].set(x_rows)
    with jax.named_scope("expert_matmuls"):
        y = block_swiglu(buf.reshape(num_blocks, block, -1), block_owner, block_end[-1],
                         w_gate, w_up, w_down)
    return y.reshape(num_blocks * block, -1)[slot], jnp.zeros((), jnp.int32)


SORTED_BACKENDS = {"ragged_dot": ragged_dot_ffn, "buckets": bucket_ffn}
