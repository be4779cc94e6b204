"""Multi-token prediction (MTP) layers, as GLM-4.5 stores them at layer index
`num_hidden_layers` and as Megatron trains them.

Depth k (1-based) at position i reads the embedding of token i + k and the hidden state of
depth k - 1 at position i (depth 0 = the main model's output after its final norm) and
predicts token i + 1 + k. Embedding and lm_head are the main model's.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from glm_jax.config import GlmConfig
from glm_jax.model.decoder import REMAT_POLICIES, DecoderLayer
from glm_jax.model.norms_rope import RMSNorm
from glm_jax.model.params import Linear


class MtpLayer(nnx.Module):
    def __init__(self, config: GlmConfig, *, rngs: nnx.Rngs,
                 mesh: jax.sharding.Mesh | None = None):
        norm = dict(axis_name="embed", param_dtype=config.param_dtype)
        h = config.hidden_size
        self.embed_norm = RMSNorm(h, config.rms_norm_eps, **norm)  # HF: enorm
        self.hidden_norm = RMSNorm(h, config.rms_norm_eps, **norm)  # HF: hnorm
        self.eh_proj = Linear(2 * h, h, ("mlp", "embed"), use_bias=False,
                              std=config.initializer_range, dtype=config.dtype,
                              param_dtype=config.param_dtype, rngs=rngs)
        self.block = DecoderLayer(config, moe=True, rngs=rngs, mesh=mesh)  # always MoE
        self.final_norm = RMSNorm(h, config.rms_norm_eps, **norm)  # HF: shared_head.norm
        self.remat_policy = config.remat_policy

    def __call__(self, next_embeds, hidden, cos, sin, mask, kv=None, index=None):
        """next_embeds: embeddings of the tokens one ahead; hidden: previous depth's output.
        Returns (this depth's hidden state, normed for the head; aux). With this layer's KV
        cache `kv` (decoding, see Attention) aux["kv"] is the updated cache."""
        # The embedding comes first in the concat (all code and the weights agree).
        u = self.eh_proj(jnp.concatenate(
            [self.embed_norm(next_embeds), self.hidden_norm(hidden)], axis=-1))

        def block(layer, u):
            return layer(u, cos, sin, mask, kv, index)

        # The same rematerialization as the layer stacks: without it the MTP block, which
        # runs outside them, keeps every activation (attention scores, expert-exchange
        # buffers) alive from its forward to its backward pass.
        if self.remat_policy != "none" and kv is None:
            block = nnx.remat(block, policy=REMAT_POLICIES[self.remat_policy])
        v, aux = block(self.block, u)
        return self.final_norm(v), aux


def shift_left(x: jax.Array, k: int) -> jax.Array:
    """Roll the time axis left by k: position i sees x[i + k]. The last k positions get
    wrapped values; the loss masks them (they have no target in the row)."""
    return jnp.roll(x, -k, axis=1)
