"""SwiGLU MLP: the dense layers' FFN and the MoE block's shared expert."""

from __future__ import annotations

import jax
from flax import nnx

from glm_jax.config import GlmConfig
from glm_jax.model.params import Linear


class Mlp(nnx.Module):
    def __init__(self, config: GlmConfig, width: int, *, rngs: nnx.Rngs):
        kw = dict(use_bias=False, std=config.initializer_range, dtype=config.dtype,
                  param_dtype=config.param_dtype, rngs=rngs)
        h = config.hidden_size
        self.gate_proj = Linear(h, width, ("embed", "mlp"), **kw)
        self.up_proj = Linear(h, width, ("embed", "mlp"), **kw)
        self.down_proj = Linear(width, h, ("mlp", "embed"), **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))
