"""Weight-only FP8 for the model's Linear weights: e4m3 codes and float32 scales held as the
parameters themselves, dequantized where the layer reads its weight.

    params = quantize_state(params, config, fp8.CHANNEL, dtype="bfloat16")
    model = nnx.merge(graphdef, params, biases)     # computes with the FP8 weights

A quantized parameter's value is an `Fp8Weight` instead of an array. Our kernels are
[in, out] (the hub stores [out, in]), with any stacking axes in front ([layers, ...],
[layers, experts, ...]); the scales follow glm_jax.fp8's layouts transposed the same way:

    channel  scale [..., 1, out]: one per output feature (the hub's per-row `weight_scale`)
    block    scale [..., ceil(in/128), ceil(out/128)]: one per 128 x 128 block, edge blocks
             partial (the hub's `weight_scale_inv` transposed)

The numerics are glm_jax.fp8's (absmax / 448 scales, round-to-nearest-even, zero blocks
get scale 1), computed on the device with jnp, so the codes and scales equal what the hub
export (`convert_hf.py to-hf --fp8`) writes for the same weights.

Which weights: those glm_jax.fp8.is_quantized_weight selects for the hub export (attention
q/k/v/o, dense MLP, shared and routed experts), found through the one table of hub names
(glm_jax.hf_names): routers, embeddings, norms, biases, lm_head and the MTP eh_proj stay in
high precision.

How the layers compute with it: `Linear` and the MoE read their weights as `param[...]`,
and an `Fp8Weight` answers that with codes * scale in float32, cast to its dtype (the model's
compute dtype), so no model code knows about FP8 and XLA fuses the dequantization into the
matmul's operand. This is weight-only FP8 (activations stay in the compute dtype), as
serving engines run FP8 checkpoints on hardware without FP8 matmul units.

Why not qwix: qwix's PTQ (`qwix.PtqProvider`) quantizes a weight by intercepting
`jnp.dot` / `jnp.einsum` / `lax.dot_general` and recognizing an operand that is a module's
parameter. Our routed experts, most of GLM-4.5's weights, reach their matmuls as per-block
slices `w[owner]` inside a `lax.scan` (glm_jax.model.block_swiglu) or through
`lax.ragged_dot` / the megablox kernel, which it does not see as a parameter use. Tried
with qwix 0.1.8 (`qwix.quantize_model(model, PtqProvider([QtRule(weight_qtype=e4m3)]),
ids)`): on one MoE block it quantized the router and the shared expert and left the
routed experts in float32; on the whole model it stopped with an AssertionError on the
scanned layer stacks' `layers` axis metadata. Its tiled (block) mode also needs every tiled
axis to be a multiple of the tile, which the hub's partial edge blocks are not.
"""

from __future__ import annotations

import math
from typing import Any

import flax
import jax
import jax.numpy as jnp
from flax import nnx

from glm_jax import fp8, hf_names
from glm_jax.config import GlmConfig

Path = tuple[str | int, ...]


@flax.struct.dataclass
class Fp8Weight:
    """A quantized [..., in, out] weight; reading it (`w[...]`) dequantizes.

    codes: [..., in, out] float8_e4m3fn. scale: float32, [..., 1, out] (per channel) or
    [..., ceil(in/b_in), ceil(out/b_out)] (per block). block: (b_in, b_out) or None for per
    channel. value_dtype: the dtype the weight is read in (the model's compute dtype)."""

    codes: jax.Array
    scale: jax.Array
    block: tuple[int, int] | None = flax.struct.field(pytree_node=False, default=None)
    value_dtype: str = flax.struct.field(pytree_node=False, default="bfloat16")

    @property
    def shape(self) -> tuple[int, ...]:
        return self.codes.shape

    @property
    def ndim(self) -> int:
        return self.codes.ndim

    @property
    def dtype(self) -> jnp.dtype:
        return jnp.dtype(self.value_dtype)

    def dequantize(self) -> jax.Array:
        """codes * scale, the product in float32, cast to `value_dtype`. [..., in, out]."""
        return (self.codes.astype(jnp.float32) * _expand(self.scale, self.codes.shape,
                                                         self.block)).astype(self.value_dtype)

    def __getitem__(self, key: Any) -> jax.Array:
        return self.dequantize()[key]


def _expand(scale: jax.Array, shape: tuple[int, ...], block: tuple[int, int] | None
            ) -> jax.Array:
    """Scales -> one per element of a weight of `shape` (a per-channel scale broadcasts)."""
    if block is None:
        return scale
    full = jnp.repeat(jnp.repeat(scale, block[0], axis=-2), block[1], axis=-1)
    return full[..., : shape[-2], : shape[-1]]


def _divide(a: jax.Array, b: jax.Array) -> jax.Array:
    """a / b correctly rounded, as numpy divides. XLA rewrites a division by a broadcast
    value into a multiplication by its reciprocal, which is off by one unit in the last
    place for about half the values (and then an e4m3 code can round the other way); a
    divisor of a's full shape behind an optimization barrier stays a true division."""
    return a / jax.lax.optimization_barrier(b)


def quantize(kernel: jax.Array, block: tuple[int, int] | None,
             value_dtype: str = "bfloat16") -> Fp8Weight:
    """[..., in, out] weight -> Fp8Weight, glm_jax.fp8's numerics on the last two axes.
    block: (b_in, b_out) for block scales, None for one scale per output feature."""
    w = kernel.astype(jnp.float32)
    if block is None:
        absmax = jnp.max(jnp.abs(w), axis=-2, keepdims=True)
    else:
        (n_in, n_out), (b_in, b_out) = w.shape[-2:], block
        rows, cols = math.ceil(n_in / b_in), math.ceil(n_out / b_out)
        pad = [(0, 0)] * (w.ndim - 2) + [(0, rows * b_in - n_in), (0, cols * b_out - n_out)]
        tiles = jnp.pad(jnp.abs(w), pad).reshape(*w.shape[:-2], rows, b_in, cols, b_out)
        absmax = jnp.max(tiles, axis=(-3, -1))
    scale = _divide(absmax, jnp.full(absmax.shape, fp8.E4M3_MAX, jnp.float32))
    scale = jnp.where(scale > 0, scale, jnp.float32(1.0))
    # The clip only guards float32 rounding of w / s just above 448 (e4m3fn has no inf).
    scaled = jnp.clip(_divide(w, jnp.broadcast_to(_expand(scale, w.shape, block), w.shape)),
                      -fp8.E4M3_MAX, fp8.E4M3_MAX)
    return Fp8Weight(scaled.astype(jnp.float8_e4m3fn), scale, block, value_dtype)


def kernel_block(layout: fp8.Fp8Layout) -> tuple[int, int] | None:
    """A hub layout's block (rows = out, cols = in) in our [in, out] orientation."""
    return None if layout.block_size is None else (layout.block_size[1], layout.block_size[0])


def quantized_paths(config: GlmConfig) -> frozenset[Path]:
    """The parameter paths (keys of nnx.to_flat_state) the FP8 layouts quantize: the leaves
    whose hub tensors glm_jax.fp8.is_quantized_weight selects. Raises ValueError if a leaf
    stacks hub tensors of which only some are selected (the table and the rule disagree)."""
    out = set()
    for leaf in hf_names.leaf_map(config):
        chosen = {fp8.is_quantized_weight(str(name)) for name in leaf.names.flat}
        if chosen == {True, False}:
            raise ValueError(f"parameter {'.'.join(map(str, leaf.path))} stacks quantized and "
                             "unquantized hub tensors")
        if chosen == {True}:
            out.add(tuple(leaf.path))
    return frozenset(out)


def quantize_state(params: nnx.State, config: GlmConfig, layout: fp8.Fp8Layout,
                   value_dtype: str = "bfloat16") -> nnx.State:
    """`params` (the model's nnx.Param state) with every `quantized_paths` weight replaced by
    its Fp8Weight (read in `value_dtype`); every other leaf is left as it is. Jit it to run
    on the device where the weights live."""
    paths, block = quantized_paths(config), kernel_block(layout)
    flat = []
    for path, variable in nnx.to_flat_state(params):
        if path in paths:
            variable = variable.replace(value=quantize(variable.get_value(), block,
                                                       value_dtype))
        flat.append((path, variable))
    return nnx.from_flat_state(flat)
