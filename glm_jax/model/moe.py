"""The MoE block: sigmoid router with a selection-only correction bias and group-limited
top-k, routed experts through a selectable backend, and the shared expert."""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from glm_jax.config import GlmConfig
from glm_jax.model.grouped_matmul import SORTED_BACKENDS
from glm_jax.model.mlp import Mlp
from glm_jax.model.params import RouterBias, normal_param
from sharding.expert_parallel import expert_axis_size, expert_parallel_ffn
from sharding.mesh import mesh_platform


def router_scores(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """x [N, H] -> sigmoid router scores [N, E] float32 (transformers' Glm4MoeTopkRouter)."""
    return jax.nn.sigmoid(jnp.dot(x.astype(jnp.float32), kernel.astype(jnp.float32)))


def mixing_weights(scores: jax.Array, idx: jax.Array, config: GlmConfig) -> jax.Array:
    """The chosen experts' mixing weights [N, k] float32: their plain sigmoid scores
    (scores [N, E] at idx [N, k]), normalized to sum 1 with norm_topk_prob, times
    routed_scaling_factor."""
    weights = jnp.take_along_axis(scores, idx, axis=-1)
    if config.norm_topk_prob:
        weights = weights / (weights.sum(-1, keepdims=True) + 1e-20)
    return weights * config.routed_scaling_factor


def route(x: jax.Array, kernel: jax.Array, correction_bias: jax.Array, config: GlmConfig,
          replay: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """x [N, H] -> (weights [N, k] float32, expert ids [N, k] int32).

    Runs in float32. The correction bias only decides *which* experts are chosen; the
    mixing weights are the plain sigmoid scores, as in transformers' Glm4MoeTopkRouter:
    adding the bias to the weights too would change the output, not only the choice.

    replay: expert ids [N, k] int32 chosen elsewhere (routing replay: the rollout engine's
    choice for the same token). They replace this router's top-k; the weights are still
    this router's scores at those ids (so the router kernel keeps its gradient). The ids
    must be in [0, E) and distinct within a row (an expert-parallel exchange sizes its
    buffers for distinct ids); they are not checked here, inside a traced function."""
    scores = router_scores(x, kernel)
    if replay is not None:
        idx = replay.astype(jnp.int32)
        return mixing_weights(scores, idx, config), idx
    choice = scores + correction_bias.astype(jnp.float32)
    if config.n_group > 1:
        n, e = choice.shape
        grouped = choice.reshape(n, config.n_group, e // config.n_group)
        group_score = jax.lax.top_k(grouped, 2)[0].sum(-1)  # sum of each group's top-2
        _, keep = jax.lax.top_k(group_score, config.topk_group)
        group_mask = jax.nn.one_hot(keep, config.n_group, dtype=bool).any(axis=1)
        choice = jnp.where(group_mask[:, :, None], grouped, -jnp.inf).reshape(n, e)
    _, idx = jax.lax.top_k(choice, config.num_experts_per_tok)
    idx = idx.astype(jnp.int32)
    return mixing_weights(scores, idx, config), idx


def dense_experts(x, idx, weights, w_gate, w_up, w_down):
    """Reference only: every token through every expert, then mixed. E/k times the work."""
    h = jax.nn.silu(jnp.einsum("nh,ehf->enf", x, w_gate)) * jnp.einsum("nh,ehf->enf", x, w_up)
    y = jnp.einsum("enf,efh->enh", h, w_down)
    mix = jnp.einsum("nk,nke->ne", weights, jax.nn.one_hot(idx, w_gate.shape[0], dtype=weights.dtype))
    return jnp.einsum("enh,ne->nh", y.astype(jnp.float32), mix)


def sorted_experts(x, idx, weights, w_gate, w_up, w_down, backend: str | Callable,
                   capacity_factor: float | None):
    """Sort token-expert pairs by expert, run the backend on the rows, unsort and mix."""
    n, k = idx.shape
    flat_expert = idx.reshape(-1)
    order = jnp.argsort(flat_expert, stable=True)  # stable: ties keep token order
    row_expert = flat_expert[order]
    group_sizes = jnp.bincount(flat_expert, length=w_gate.shape[0]).astype(jnp.int32)
    ffn = SORTED_BACKENDS[backend] if isinstance(backend, str) else backend
    y_rows, dropped = ffn(
        x[order // k], row_expert, group_sizes, w_gate, w_up, w_down, capacity_factor)
    inverse = jnp.zeros_like(order).at[order].set(jnp.arange(n * k, dtype=order.dtype))
    y_pairs = y_rows[inverse].reshape(n, k, -1).astype(jnp.float32)
    return jnp.einsum("nkh,nk->nh", y_pairs, weights), dropped


class MoE(nnx.Module):
    """Router + routed experts + shared expert.

    `mesh` is the device mesh the layer was built (or placed, `sharding.rules.shard_model`)
    for: with an `expert` axis > 1 the routed experts run expert-parallel over it
    (sharding.expert_parallel), otherwise on each device's own tokens. The call must run
    under that same mesh (`jax.set_mesh`; the trainer does it); any other active mesh is
    an error rather than a silent switch to another algorithm."""

    def __init__(self, config: GlmConfig, *, rngs: nnx.Rngs,
                 mesh: jax.sharding.Mesh | None = None):
        h, e, f = config.hidden_size, config.n_routed_experts, config.moe_intermediate_size
        std, pd = config.initializer_range, config.param_dtype
        # The router weight stays float32 whatever param_dtype says: transformers computes the
        # router scores in float32, and the top-k choice must match it.
        self.router_kernel = normal_param(rngs, (h, e), ("embed", None), std, "float32")
        self.correction_bias = RouterBias(jnp.zeros((e,), jnp.float32), out_sharding=(None,))
        self.w_gate = normal_param(rngs, (e, h, f), ("experts", "embed", "expert_mlp"), std, pd)
        self.w_up = normal_param(rngs, (e, h, f), ("experts", "embed", "expert_mlp"), std, pd)
        self.w_down = normal_param(rngs, (e, f, h), ("experts", "expert_mlp", "embed"), std, pd)
        self.shared_experts = (Mlp(config, config.shared_intermediate_size, rngs=rngs)
                               if config.n_shared_experts else None)
        self.config = config
        self.mesh = mesh

    def _routed(self, flat, idx, weights, w):
        """The routed experts through the configured backend, expert-parallel on a mesh."""
        cfg = self.config
        if cfg.moe_backend == "dense":
            return dense_experts(flat, idx, weights, *w), jnp.zeros((), jnp.int32)
        # Kernels follow the devices of the mesh this layer was built for (a TPU topology
        # compiled on a CPU host is TPU), never the host's backend.
        local_ffn = functools.partial(SORTED_BACKENDS[cfg.moe_backend],
                                      platform=mesh_platform(self.mesh))
        if self._expert_parallel():
            return expert_parallel_ffn(flat, idx, weights, *w, local_ffn=local_ffn,
                                       capacity_factor=cfg.capacity_factor)
        return sorted_experts(flat, idx, weights, *w, local_ffn, cfg.capacity_factor)

    def _expert_parallel(self) -> bool:
        """True when the experts run expert-parallel; raises ValueError when the active mesh
        is not the one this layer was built for (see the class docstring)."""
        active = jax.sharding.get_abstract_mesh()
        ep = expert_axis_size(self.mesh) if self.mesh is not None else 1
        if ep > 1 and (active.empty or dict(active.shape) != dict(self.mesh.shape)):
            raise ValueError(
                f"MoE built for mesh {dict(self.mesh.shape)} (expert-parallel) is called "
                f"under {'no mesh' if active.empty else dict(active.shape)}: call the model "
                "under jax.set_mesh(its mesh)")
        if ep == 1 and expert_axis_size(active) > 1:
            raise ValueError(
                f"MoE built for {'no mesh' if self.mesh is None else dict(self.mesh.shape)} "
                f"is called under mesh {dict(active.shape)} with expert > 1: place the model "
                "on that mesh first (sharding.rules.shard_model(model, mesh), or "
                "GlmForCausalLM(config, rngs=..., mesh=mesh))")
        return ep > 1

    def __call__(self, x: jax.Array, routed_experts: jax.Array | None = None
                 ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """x [B, T, H] -> (y [B, T, H], {"counts": [E] token-expert pairs per expert,
        "dropped": pairs dropped by a capacity limit, "routed_experts": [B, T, k] int32, the
        expert ids used}). routed_experts [B, T, k] int32: replay these ids instead of the
        router's top-k (see `route`)."""
        cfg = self.config
        b, t, h = x.shape
        flat = x.reshape(b * t, h)
        replay = None if routed_experts is None else routed_experts.reshape(b * t, -1)
        with jax.named_scope("router"):
            weights, idx = route(flat, self.router_kernel[...], self.correction_bias[...], cfg,
                                 replay)
        w = [p[...].astype(cfg.dtype) for p in (self.w_gate, self.w_up, self.w_down)]
        with jax.named_scope("routed_experts"):
            routed, dropped = self._routed(flat, idx, weights, w)
        y = routed.astype(x.dtype).reshape(b, t, h)
        if self.shared_experts is not None:
            with jax.named_scope("shared_expert"):
                y = y + self.shared_experts(x)
        counts = jnp.bincount(idx.reshape(-1), length=cfg.n_routed_experts).astype(jnp.int32)
        return y, {"counts": counts, "dropped": dropped,
                   "routed_experts": idx.reshape(b, t, -1)}
