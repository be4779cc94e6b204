"""RMSNorm and partial rotary position embedding, as transformers' glm4_moe computes them."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from glm_jax.model.params import const_param


class RMSNorm(nnx.Module):
    """Normalise in float32, cast back to the input dtype, then multiply by the weight
    (HF's order: multiplying before the downcast changes bfloat16 bits)."""

    def __init__(self, size: int, eps: float, *, axis_name: str | None, param_dtype: str):
        self.scale = const_param((size,), (axis_name,), 1.0, param_dtype)
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        y = y.astype(x.dtype)
        return self.scale[...].astype(x.dtype) * y


def rope_cos_sin(positions: jax.Array, rotary_dim: int, theta: float,
                 dtype: jnp.dtype) -> tuple[jax.Array, jax.Array]:
    """cos/sin [..., rotary_dim // 2] for integer positions [...]. Angles in float32; the
    exponent's denominator is the rotary width, not head_dim."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, rotary_dim, 2, dtype=jnp.float32) / rotary_dim))
    angles = positions.astype(jnp.float32)[..., None] * inv_freq
    return jnp.cos(angles).astype(dtype), jnp.sin(angles).astype(dtype)


def apply_partial_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate the first 2 * cos.shape[-1] dims of each head, half-split (NeoX) layout:
    dim j pairs with j + half. x: [B, T, heads, head_dim]; cos/sin: [B, T, half]."""
    half = cos.shape[-1]
    x1, x2, rest = x[..., :half], x[..., half:2 * half], x[..., 2 * half:]
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest], axis=-1)
