"""Parameter helpers: every weight carries its logical axis names.

The names (`embed`, `heads`, `experts`, ...) are metadata only; `sharding/rules.py` is the
one table that maps them to mesh axes. Modules never mention mesh axes.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from sharding.rules import constrain


class RouterBias(nnx.Variable):
    """The aux-loss-free correction bias. Not an `nnx.Param`: no gradient, no optimizer
    ever touches it; the training loop updates it from expert loads."""


def normal_param(rngs: nnx.Rngs, shape: Sequence[int], axes: Sequence[str | None],
                 std: float, dtype: str) -> nnx.Param:
    value = std * jax.random.normal(rngs.params(), tuple(shape), jnp.float32)
    return nnx.Param(value.astype(dtype), out_sharding=tuple(axes))


def const_param(shape: Sequence[int], axes: Sequence[str | None], value: float,
                dtype: str) -> nnx.Param:
    return nnx.Param(jnp.full(tuple(shape), value, dtype), out_sharding=tuple(axes))


class Linear(nnx.Module):
    """y = x @ kernel (+ bias); kernel is [in, out] (HF stores [out, in])."""

    def __init__(self, in_features: int, out_features: int, axes: tuple[str | None, str | None],
                 *, use_bias: bool, std: float, dtype: str, param_dtype: str, rngs: nnx.Rngs):
        self.kernel = normal_param(rngs, (in_features, out_features), axes, std, param_dtype)
        self.bias = const_param((out_features,), axes[1:], 0.0, param_dtype) if use_bias else None
        self.dtype = dtype
        # FSDP made explicit: the kernel is gathered along `embed` (the axis the rules shard
        # over fsdp) before the dot, and its gradient is reduce-scattered back. Left to the
        # SPMD partitioner, with `embed` also over `expert` (the plan's --rule) while the
        # tokens are split over `expert`, every gradient upstream of lm_head came out wrong
        # by up to 0.09 on data=2,expert=2,tensor=2 (tests/test_sharding.py). A no-op
        # without a mesh.
        self.gathered_axes = tuple(None if a == "embed" else a for a in axes)

    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = constrain(self.kernel[...], self.gathered_axes)
        y = jnp.dot(x.astype(self.dtype), kernel.astype(self.dtype))
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y
