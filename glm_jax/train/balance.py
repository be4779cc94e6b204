"""Aux-loss-free expert balancing (DeepSeek-V3 / GLM-4.5).

Each MoE layer's router adds a correction bias to its scores for *selection only*. After
every optimizer step: bias += rate * sign(mean_load - load), so overloaded experts become
less likely to be picked. The bias is an `nnx.Variable` (`RouterBias`), never an
`nnx.Param`: gradients and the optimizer never see it.

The counts come from the model output of a jitted step over the *global* batch, so under
jit's global semantics they are already summed over every data shard and device (and
every host); no explicit all-reduce is needed here.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


def bias_delta(counts: jax.Array, rate: float) -> jax.Array:
    """counts [..., E] -> the bias change [..., E] (float32)."""
    load = counts.astype(jnp.float32)
    mean = load.mean(axis=-1, keepdims=True)
    return rate * jnp.sign(mean - load)


def load_imbalance(counts: jax.Array) -> jax.Array:
    """Per layer: max load / mean load (1.0 = perfectly balanced). counts [L, E] -> [L]."""
    load = counts.astype(jnp.float32)
    return load.max(axis=-1) / jnp.maximum(load.mean(axis=-1), 1e-9)


def update_biases(biases: nnx.State, expert_counts: jax.Array, mtp_expert_counts: jax.Array,
                  rate: float) -> nnx.State:
    """New RouterBias state: the main MoE stack's [L, E] bias from `expert_counts`, each MTP
    layer's [E] bias from its row of `mtp_expert_counts`."""
    pure = nnx.to_pure_dict(biases)
    if "moe_layers" in pure:
        node = pure["moe_layers"]["layers"]["mlp"]
        node["correction_bias"] = node["correction_bias"] + bias_delta(expert_counts, rate)
    for key, layer in pure.get("mtp_layers", {}).items():
        node = layer["block"]["mlp"]
        node["correction_bias"] = (node["correction_bias"]
                                   + bias_delta(mtp_expert_counts[int(key)], rate))
    new = jax.tree.map(lambda x: x, biases)  # a copy: the caller's state is left alone
    nnx.replace_by_pure_dict(new, pure)
    return new

