"""One pre-norm decoder layer, and a stack of identical layers run with a scan."""

from __future__ import annotations

from typing import Callable

import jax
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from glm_jax.config import GlmConfig
from glm_jax.model.attention import Attention
from glm_jax.model.mlp import Mlp
from glm_jax.model.moe import MoE
from glm_jax.model.norms_rope import RMSNorm
from sharding.rules import constrain

# Logical axes of the residual stream [B, T, H] between layers (sharding.rules.RULES maps
# them). The scan carry is pinned at every layer boundary so that its layout is the table's
# choice and not whatever GSPMD propagates from the weights (the embedding table's `embed`
# sharding reached it and forced a full rematerialization, see embed_tokens).
RESIDUAL_AXES = ("batch", "seq", "act_embed")

REMAT_POLICIES: dict[str, Callable | None] = {
    "full": None,  # save nothing: recompute the whole layer in the backward pass
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
    # Keep q, k, v (after RoPE) and the residual stream after attention: the backward pass
    # then recomputes only the attention kernel's forward (its output and softmax
    # statistics) and the MoE / MLP block, not the q/k/v/o projections. Costs per layer
    # B T (H + (heads + 2 kv_heads) head_dim) activations in the compute dtype.
    "save_qkv_residual": jax.checkpoint_policies.save_only_these_names(
        "query_proj", "key_proj", "value_proj", "attention_residual"),
    # The same without q (heads x head_dim wide, the largest): the backward recomputes
    # only the q projection of the four, for B T (H + 2 kv_heads head_dim) per layer.
    "save_kv_residual": jax.checkpoint_policies.save_only_these_names(
        "key_proj", "value_proj", "attention_residual"),
}


class DecoderLayer(nnx.Module):
    def __init__(self, config: GlmConfig, *, moe: bool, rngs: nnx.Rngs,
                 mesh: jax.sharding.Mesh | None = None):
        norm = dict(axis_name="embed", param_dtype=config.param_dtype)
        self.input_norm = RMSNorm(config.hidden_size, config.rms_norm_eps, **norm)
        self.attn = Attention(config, rngs=rngs)
        self.post_attn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps, **norm)
        self.mlp = (MoE(config, rngs=rngs, mesh=mesh) if moe
                    else Mlp(config, config.intermediate_size, rngs=rngs))

    def __call__(self, x, cos, sin, mask, kv=None, index=None, routed_experts=None
                 ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Returns (x, aux): the MoE's counts / drops / expert ids, and with a KV cache `kv`
        (see Attention) the updated cache as aux["kv"]. routed_experts [B, T, k] int32: the
        expert ids the MoE replays instead of choosing (MoE layers only)."""
        # The scopes name the parts in XLA's op metadata (bench/op_profile.py).
        with jax.named_scope("attention"):
            a, kv = self.attn(self.input_norm(x), cos, sin, mask, kv, index)
            x = checkpoint_name(x + a, "attention_residual")  # see REMAT_POLICIES
        with jax.named_scope("moe" if isinstance(self.mlp, MoE) else "mlp"):
            if isinstance(self.mlp, MoE):
                out = self.mlp(self.post_attn_norm(x), routed_experts)
            else:
                out = self.mlp(self.post_attn_norm(x))
        y, aux = out if isinstance(out, tuple) else (out, {})
        if kv is not None:
            aux = dict(aux, kv=kv)
        return x + y, aux


class LayerStack(nnx.Module):
    """`num_layers` identical layers with weights stacked on a leading `layers` axis.

    Running them with one scan keeps compile time flat in depth."""

    def __init__(self, config: GlmConfig, num_layers: int, *, moe: bool, rngs: nnx.Rngs,
                 mesh: jax.sharding.Mesh | None = None):
        @nnx.split_rngs(splits=num_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def make(rngs: nnx.Rngs) -> DecoderLayer:
            return DecoderLayer(config, moe=moe, rngs=rngs, mesh=mesh)

        self.layers = make(rngs)
        self.remat_policy = config.remat_policy

    def __call__(self, x, cos, sin, mask, kv=None, index=None, routed_experts=None
                 ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Returns the output and the per-layer aux dict, each entry stacked [layers, ...].
        With a KV cache `kv` = (k, v) [layers, B, S_max, NKV, D] (decoding), the caches are
        scanned with the weights and aux["kv"] is the updated cache. routed_experts
        [layers, B, T, k] int32 (MoE stacks): each layer replays its slice of expert ids;
        the ids are scanned with the weights, one slice per layer."""
        if kv is not None:  # decoding: no backward pass, so no rematerialization
            def step(x, layer, kv, ids):
                return layer(x, cos, sin, mask, kv, index, ids)

            return nnx.scan(step, in_axes=(nnx.Carry, 0, 0, 0), out_axes=(nnx.Carry, 0))(
                x, self.layers, kv, routed_experts)

        def body(x, layer, ids):
            x, aux = layer(constrain(x, RESIDUAL_AXES), cos, sin, mask,
                           routed_experts=ids)
            return constrain(x, RESIDUAL_AXES), aux

        if self.remat_policy != "none":
            body = nnx.remat(body, policy=REMAT_POLICIES[self.remat_policy])
        return nnx.scan(body, in_axes=(nnx.Carry, 0, 0), out_axes=(nnx.Carry, 0))(
            constrain(x, RESIDUAL_AXES), self.layers, routed_experts)
