"""Dropless routed-expert SwiGLU over row blocks, visited one block at a time.

Token-expert rows sorted by expert sit in blocks of equal size; every block belongs to one
expert (`owner`, non-decreasing). A batched einsum over the blocks would need a copy of
its owner's weights per block ([blocks, H, F], several times all the experts' weights) and,
in the backward pass, a per-block weight gradient scattered back onto the experts. On
XLA:CPU those copies cost about as much as the matmuls themselves (bench/moe.py). Here a
`lax.scan` visits the blocks: each step reads its owner's weights in place, and the
backward pass adds the step's weight gradient into that expert's slot of a float32
accumulator. Blocks past `used` (the static block bound exceeds what the routing needs)
are skipped with `lax.cond`, so padding to the bound costs no matmuls.

Why a custom VJP: differentiating the scan automatically transposes each step's dynamic
slice of the weights into a zero tensor of all the experts' size, and the step time went
from 2.9 s to 12.5 s on the bench shapes (measured side by side).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _varying_axes(*arrays) -> tuple[str, ...]:
    return tuple(sorted(frozenset().union(
        *(jax.typeof(a).manual_axis_type.varying for a in arrays))))


def _zeros(shape, dtype, *sources) -> jax.Array:
    """Zeros typed like a value computed from `sources`: inside `shard_map` (expert
    parallelism) a cond's branches and a scan's carry must vary over the same mesh axes."""
    axes = _varying_axes(*sources)
    zeros = jnp.zeros(shape, dtype)
    return jax.lax.pcast(zeros, axes, to="varying") if axes else zeros


def _like_primal(cotangent: jax.Array, primal: jax.Array) -> jax.Array:
    """Sum a cotangent over the mesh axes it varies over and its primal does not: the
    transpose of the implicit broadcast of a weight to every token shard, or of the rows to
    every tensor-parallel slice of the expert width."""
    extra = tuple(a for a in _varying_axes(cotangent) if a not in _varying_axes(primal))
    return jax.lax.psum(cotangent, extra) if extra else cotangent


def _block_forward(x_block, w_gate, w_up, w_down):
    gate = x_block @ w_gate
    up = x_block @ w_up
    return (jax.nn.silu(gate) * up) @ w_down, gate, up


def _scan_forward(x, owner, used, w_gate, w_up, w_down):
    """Returns (y [NB, B, H], gate and up activations [NB, B, F] for the backward pass)."""
    f = w_gate.shape[2]

    def step(_, inputs):
        b, x_block, o = inputs

        def run(x_block):
            return _block_forward(x_block, w_gate[o], w_up[o], w_down[o])

        def skip(x_block):
            rows, dtype = x_block.shape[0], x_block.dtype
            zeros = _zeros((rows, f), dtype, x_block, w_gate, w_up)
            return _zeros(x_block.shape, dtype, x_block, w_gate, w_up, w_down), zeros, zeros

        return None, jax.lax.cond(b < used, run, skip, x_block)

    _, out = jax.lax.scan(step, None, (jnp.arange(x.shape[0]), x, owner))
    return out


@jax.custom_vjp
def block_swiglu(x: jax.Array, owner: jax.Array, used: jax.Array, w_gate: jax.Array,
                 w_up: jax.Array, w_down: jax.Array) -> jax.Array:
    """x [NB, B, H] row blocks, owner [NB] int32 expert of each block, used: blocks in use
    (the first `used`; the rest are skipped and give zeros); w_gate/w_up [E, H, F],
    w_down [E, F, H]. Returns y [NB, B, H] = SwiGLU of each block by its owner's weights."""
    return _scan_forward(x, owner, used, w_gate, w_up, w_down)[0]


def _vjp_forward(x, owner, used, w_gate, w_up, w_down):
    y, gate, up = _scan_forward(x, owner, used, w_gate, w_up, w_down)
    return y, (x, owner, used, w_gate, w_up, w_down, gate, up)


def _vjp_backward(residuals, dy):
    x, owner, used, w_gate, w_up, w_down, gate, up = residuals

    def step(grads, inputs):
        b, x_block, o, g, u, dy_block = inputs

        def run(grads):
            d_gate_w, d_up_w, d_down_w = grads
            sig = jax.nn.sigmoid(g)
            silu = g * sig
            d_hidden = dy_block @ w_down[o].T
            d_up = d_hidden * silu
            d_gate = d_hidden * u * sig * (1 + g * (1 - sig))  # silu'(g) = s (1 + g (1 - s))
            f32 = jnp.float32
            d_down_w = d_down_w.at[o].add(((silu * u).T @ dy_block).astype(f32))
            d_gate_w = d_gate_w.at[o].add((x_block.T @ d_gate).astype(f32))
            d_up_w = d_up_w.at[o].add((x_block.T @ d_up).astype(f32))
            dx = d_gate @ w_gate[o].T + d_up @ w_up[o].T
            return (d_gate_w, d_up_w, d_down_w), dx

        def skip(grads):
            return grads, _zeros(x_block.shape, x_block.dtype, x_block, dy_block, w_gate, w_up,
                                 w_down)

        return jax.lax.cond(b < used, run, skip, grads)

    weights = (w_gate, w_up, w_down)
    zeros = tuple(_zeros(w.shape, jnp.float32, x, dy, *weights) for w in weights)
    grads, dx = jax.lax.scan(step, zeros, (jnp.arange(x.shape[0]), x, owner, gate, up, dy))
    d_gate_w, d_up_w, d_down_w = (_like_primal(g, w).astype(w.dtype)
                                  for g, w in zip(grads, weights))
    return _like_primal(dx, x), None, None, d_gate_w, d_up_w, d_down_w


block_swiglu.defvjp(_vjp_forward, _vjp_backward)
