"""The causal LM: embedding, dense-prefix stack, MoE stack, final norm, head, MTP layers."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx, struct

from glm_jax.config import GlmConfig
from glm_jax.model.attention import self_attention_mask
from glm_jax.model.decoder import RESIDUAL_AXES, LayerStack
from glm_jax.model.mtp import MtpLayer, shift_left
from glm_jax.model.norms_rope import RMSNorm, rope_cos_sin
from glm_jax.model.params import Linear, normal_param
from sharding.rules import constrain


@struct.dataclass
class CausalLMOutput:
    logits: jax.Array  # [B, T, vocab], activation dtype
    mtp_logits: tuple[jax.Array, ...]  # one [B, T, vocab] per MTP depth; depth k at i predicts i+1+k
    hidden_states: jax.Array  # [B, T, H] after the final norm (what MTP depth 1 reads)
    expert_counts: jax.Array  # [num_moe_layers, E] int32: token-expert pairs routed per expert
    mtp_expert_counts: jax.Array  # [num_mtp_layers, E] int32
    dropped: jax.Array  # int32: token-expert pairs dropped by a capacity limit, all layers


class GlmForCausalLM(nnx.Module):
    def __init__(self, config: GlmConfig, *, rngs: nnx.Rngs):
        # Parameters carry logical axis names only; they are placed on a mesh afterwards
        # (sharding/), so creation must not try to shard eagerly.
        with nnx.use_eager_sharding(False):
            h, std, pd = config.hidden_size, config.initializer_range, config.param_dtype
            self.embed = normal_param(rngs, (config.vocab_size, h), ("vocab", "embed"), std, pd)
            self.dense_layers = (LayerStack(config, config.num_dense_layers, moe=False, rngs=rngs)
                                 if config.num_dense_layers else None)
            self.moe_layers = (LayerStack(config, config.num_moe_layers, moe=True, rngs=rngs)
                               if config.num_moe_layers else None)
            self.final_norm = RMSNorm(h, config.rms_norm_eps, axis_name="embed", param_dtype=pd)
            self.lm_head = Linear(h, config.vocab_size, ("embed", "vocab"), use_bias=False,
                                  std=std, dtype=config.dtype, param_dtype=pd, rngs=rngs)
            self.mtp_layers = nnx.List([MtpLayer(config, rngs=rngs)
                                        for _ in range(config.num_mtp_layers)])
        self.config = config

    def embed_tokens(self, ids: jax.Array) -> jax.Array:
        # The table is gathered whole along `embed` first, as fsdp gathers every weight
        # before use: GSPMD then looks rows up locally for the batch-sharded ids, and the
        # table's gradient is a local scatter-add + reduce-scatter. Left to GSPMD, the
        # backward pass wants the batch-sharded cotangent resharded onto `embed` for the
        # scatter and replicates it whole ("involuntary full rematerialization").
        table = constrain(self.embed[...], ("vocab", None))
        x = jnp.take(table, ids, axis=0).astype(self.config.dtype)
        return constrain(x, RESIDUAL_AXES)

    def __call__(self, input_ids: jax.Array, *, positions: jax.Array | None = None,
                 segment_ids: jax.Array | None = None) -> CausalLMOutput:
        """input_ids [B, T]. `segment_ids` [B, T] marks packed documents (tokens attend only
        within their own); `positions` [B, T] restart at each document (default 0..T-1)."""
        cfg = self.config
        b, t = input_ids.shape
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        if segment_ids is None:
            segment_ids = jnp.zeros((b, t), jnp.int32)
        cos, sin = rope_cos_sin(positions, cfg.rotary_dim, cfg.rope_theta, jnp.dtype(cfg.dtype))
        mask = self_attention_mask(segment_ids, cfg.attention_backend)
        no_counts = jnp.zeros((0, cfg.n_routed_experts), jnp.int32)

        embeds = self.embed_tokens(input_ids)
        x = embeds
        if self.dense_layers is not None:
            x, _ = self.dense_layers(x, cos, sin, mask)
        expert_counts, dropped = no_counts, jnp.zeros((), jnp.int32)
        if self.moe_layers is not None:
            x, aux = self.moe_layers(x, cos, sin, mask)
            expert_counts, dropped = aux["counts"], aux["dropped"].sum()
        with jax.named_scope("lm_head"):
            hidden = self.final_norm(x)
            logits = self.lm_head(hidden)

        mtp_logits, mtp_counts, h = [], [], hidden
        for depth, layer in enumerate(self.mtp_layers, start=1):
            # The embeddings of the tokens `depth` ahead, rolled rather than looked up
            # again: one table lookup, so the backward pass builds one table-sized gradient.
            with jax.named_scope("mtp"):
                h, aux = layer(shift_left(embeds, depth), h, cos, sin, mask)
            with jax.named_scope("lm_head"):
                mtp_logits.append(self.lm_head(h))
            mtp_counts.append(aux["counts"])
            dropped = dropped + aux["dropped"]
        return CausalLMOutput(
            logits=logits, mtp_logits=tuple(mtp_logits), hidden_states=hidden,
            expert_counts=expert_counts,
            mtp_expert_counts=jnp.stack(mtp_counts) if mtp_counts else no_counts,
            dropped=dropped)
