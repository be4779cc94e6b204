"""The causal LM: embedding, dense-prefix stack, MoE stack, final norm, head (its own, or
the embedding with tie_word_embeddings), MTP layers."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx, struct

from glm_jax.config import GlmConfig
from glm_jax.kv_cache import KVCache, cache_mask
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
    # [B, T, num_moe_layers, k] int32: the experts each main-model MoE layer used for each
    # token (its own top-k, or the replayed ids); batch-major, as the tokens.
    routed_experts: jax.Array | None = None
    cache: KVCache | None = None  # the updated KV cache of a cached (decoding) call


class GlmForCausalLM(nnx.Module):
    """GLM-4.5 (transformers' Glm4MoeForCausalLM). `mesh`: the device mesh the model will
    run on (its MoE layers run expert-parallel over an `expert` axis > 1 and check that
    they are called under that mesh); `sharding.rules.shard_model` sets it too."""

    def __init__(self, config: GlmConfig, *, rngs: nnx.Rngs,
                 mesh: jax.sharding.Mesh | None = None):
        # Parameters carry logical axis names only; they are placed on a mesh afterwards
        # (sharding/), so creation must not try to shard eagerly.
        with nnx.use_eager_sharding(False):
            h, std, pd = config.hidden_size, config.initializer_range, config.param_dtype
            self.embed = normal_param(rngs, (config.vocab_size, h), ("vocab", "embed"), std, pd)
            self.dense_layers = (LayerStack(config, config.num_dense_layers, moe=False, rngs=rngs)
                                 if config.num_dense_layers else None)
            self.moe_layers = (LayerStack(config, config.num_moe_layers, moe=True, rngs=rngs,
                                          mesh=mesh)
                               if config.num_moe_layers else None)
            self.final_norm = RMSNorm(h, config.rms_norm_eps, axis_name="embed", param_dtype=pd)
            # tie_word_embeddings: no head of its own; `head` reads the embedding table.
            self.lm_head = None if config.tie_word_embeddings else Linear(
                h, config.vocab_size, ("embed", "vocab"), use_bias=False, std=std,
                dtype=config.dtype, param_dtype=pd, rngs=rngs)
            self.mtp_layers = nnx.List([MtpLayer(config, rngs=rngs, mesh=mesh)
                                        for _ in range(config.num_mtp_layers)])
        self.config = config
        self.mesh = mesh

    def embed_tokens(self, ids: jax.Array) -> jax.Array:
        # The table is gathered whole along `embed` first, as fsdp gathers every weight
        # before use: GSPMD then looks rows up locally for the batch-sharded ids, and the
        # table's gradient is a local scatter-add + reduce-scatter. Left to GSPMD, the
        # backward pass wants the batch-sharded cotangent resharded onto `embed` for the
        # scatter and replicates it whole ("involuntary full rematerialization").
        table = constrain(self.embed[...], ("vocab", None))
        x = jnp.take(table, ids, axis=0).astype(self.config.dtype)
        return constrain(x, RESIDUAL_AXES)

    def head(self, hidden: jax.Array) -> jax.Array:
        """Logits [B, T, vocab] in the activation dtype from hidden states [B, T, H] after a
        final norm: the lm_head, or with tie_word_embeddings the embedding table [vocab, H]
        transposed (transformers' lm_head.weight is then embed_tokens.weight itself)."""
        if self.lm_head is not None:
            return self.lm_head(hidden)
        # Gathered along `embed` before the dot, as Linear does with its kernel.
        table = constrain(self.embed[...], ("vocab", None)).astype(self.config.dtype)
        return jnp.dot(hidden.astype(self.config.dtype), table.T)

    def __call__(self, input_ids: jax.Array, *, positions: jax.Array | None = None,
                 segment_ids: jax.Array | None = None, cache: KVCache | None = None,
                 routed_experts: jax.Array | None = None) -> CausalLMOutput:
        """input_ids [B, T] int32. `segment_ids` [B, T] marks packed documents (tokens attend
        only within their own); `positions` [B, T] restart at each document (default 0..T-1).

        With a `cache` (decoding, glm_jax.kv_cache): token t of row b sits at slot
        positions[b, t] = positions[b, 0] + t (prompts are right-padded, so a row's positions
        are its slots) and attends to the slots up to its own; `positions` is required,
        `segment_ids` is not used, the MTP layers do not run (their input, the next token,
        is not known yet: see `mtp_draft`) and the output carries the updated cache.

        routed_experts [B, T, num_moe_layers, k] int32 (routing replay): every main-model MoE
        layer uses these expert ids for each token instead of its own top-k, with mixing
        weights from its current router scores at those ids (moe.route); e.g. the rollout's
        recorded choices, so the trainer's forward routes as the rollout did. The MTP layers
        always route themselves. Ids must be in [0, n_routed_experts) and distinct per
        token; they are not checked inside the traced forward. The output's
        `routed_experts` holds the ids used, replayed or chosen."""
        cfg = self.config
        b, t = input_ids.shape
        if cache is not None and positions is None:
            raise ValueError("a cached forward needs positions [B, T] (the cache slots)")
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        cos, sin = rope_cos_sin(positions, cfg.rotary_dim, cfg.rope_theta, jnp.dtype(cfg.dtype))
        if cache is None:
            if segment_ids is None:
                segment_ids = jnp.zeros((b, t), jnp.int32)
            mask, index = self_attention_mask(segment_ids, cfg.attention_backend), None
        else:
            index = positions[:, 0]
            mask = cache_mask(index, t, cache.max_len)
        no_counts = jnp.zeros((0, cfg.n_routed_experts), jnp.int32)
        k = cfg.num_experts_per_tok
        if routed_experts is not None and routed_experts.shape != (b, t, cfg.num_moe_layers, k):
            raise ValueError(f"routed_experts has shape {list(routed_experts.shape)}; it must "
                             f"be [B, T, num_moe_layers, k] = {[b, t, cfg.num_moe_layers, k]}")
        used = jnp.zeros((b, t, 0, k), jnp.int32)

        embeds = self.embed_tokens(input_ids)
        x = embeds
        dense_kv = moe_kv = None
        if self.dense_layers is not None:
            x, aux = self.dense_layers(x, cos, sin, mask,
                                       None if cache is None else cache.dense, index)
            dense_kv = aux.get("kv")
        expert_counts, dropped = no_counts, jnp.zeros((), jnp.int32)
        if self.moe_layers is not None:
            # The layer axis leads inside the scan: [B, T, L, k] <-> [L, B, T, k].
            replay = (None if routed_experts is None
                      else jnp.moveaxis(routed_experts.astype(jnp.int32), 2, 0))
            x, aux = self.moe_layers(x, cos, sin, mask, None if cache is None else cache.moe,
                                     index, replay)
            expert_counts, dropped, moe_kv = aux["counts"], aux["dropped"].sum(), aux.get("kv")
            used = jnp.moveaxis(aux["routed_experts"], 0, 2)
        with jax.named_scope("lm_head"):
            hidden = self.final_norm(x)
            logits = self.head(hidden)
        if cache is not None:
            return CausalLMOutput(logits=logits, mtp_logits=(), hidden_states=hidden,
                                  expert_counts=expert_counts, mtp_expert_counts=no_counts,
                                  dropped=dropped, routed_experts=used,
                                  cache=cache.replace(dense=dense_kv, moe=moe_kv))

        mtp_logits, mtp_counts, h = [], [], hidden
        for depth, layer in enumerate(self.mtp_layers, start=1):
            # The embeddings of the tokens `depth` ahead, rolled rather than looked up
            # again: one table lookup, so the backward pass builds one table-sized gradient.
            with jax.named_scope("mtp"):
                h, aux = layer(shift_left(embeds, depth), h, cos, sin, mask)
            with jax.named_scope("lm_head"):
                mtp_logits.append(self.head(h))
            mtp_counts.append(aux["counts"])
            dropped = dropped + aux["dropped"]
        return CausalLMOutput(
            logits=logits, mtp_logits=tuple(mtp_logits), hidden_states=hidden,
            expert_counts=expert_counts,
            mtp_expert_counts=jnp.stack(mtp_counts) if mtp_counts else no_counts,
            dropped=dropped, routed_experts=used)

    def mtp_draft(self, next_ids: jax.Array, hidden: jax.Array, *, positions: jax.Array,
                  cache: KVCache) -> tuple[jax.Array, KVCache]:
        """MTP depth 1 during decoding, after the main forward chose the next tokens: position
        i reads the main model's `hidden_states` at i and the embedding of token i + 1
        (`next_ids` [B, T]) and predicts token i + 2, through the MTP layer's own KV cache.
        Returns (logits [B, T, V], cache with that layer's cache updated)."""
        if not cache.mtp:
            raise ValueError("the cache has no MTP layer cache (init_cache(..., with_mtp=True) "
                             "on a model with num_nextn_predict_layers >= 1)")
        cfg = self.config
        index = positions[:, 0]
        cos, sin = rope_cos_sin(positions, cfg.rotary_dim, cfg.rope_theta, jnp.dtype(cfg.dtype))
        mask = cache_mask(index, next_ids.shape[1], cache.max_len)
        h, aux = self.mtp_layers[0](self.embed_tokens(next_ids), hidden, cos, sin, mask,
                                    cache.mtp[0], index)
        return self.head(h), cache.replace(mtp=(aux["kv"],) + tuple(cache.mtp[1:]))
