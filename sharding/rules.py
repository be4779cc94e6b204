"""THE table: logical axis name -> mesh axes. Changing a parallelism layout means editing
this table, never a module.

Parameters carry logical names in their `out_sharding` metadata (glm_jax/model/params.py);
activations are named where a module calls `constrain`. Optimizer state is sharded like its
parameter: `opt_state_shardings` maps every parameter-shaped leaf of an optax state to the
sharding of the parameter it mirrors (optax.tree_map_params), scalars are replicated; the
train step is then jitted with those as `out_shardings`, so Adam's mu/nu (or Muon's
momentum) live exactly where their weight lives.
"""

from __future__ import annotations

from typing import Any

import jax
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

# Mesh axes: data (pure data parallel), fsdp (data parallel with sharded weights),
# expert (expert parallel; also shards the batch outside the MoE), tensor (tensor parallel).
RULES: dict[str, tuple[str, ...]] = {
    # ---- parameters
    "layers": (),
    "vocab": ("tensor",),
    "embed": ("fsdp",),
    "q_heads": ("tensor",),
    "kv_heads": ("tensor",),
    "head_dim": (),
    "mlp": ("tensor",),
    "experts": ("expert",),
    "expert_mlp": ("tensor",),
    # ---- activations
    "batch": ("data", "fsdp", "expert"),
    "tokens": ("data", "fsdp", "expert"),  # flattened batch*seq rows
    "seq": (),
    "act_embed": (),
    "act_heads": ("tensor",),
    "act_mlp": ("tensor",),
    "act_vocab": ("tensor",),
}


def mesh_axes_for(name: str | None, mesh_shape: dict[str, int]) -> tuple[str, ...]:
    """Mesh axes (of size > 1) that logical axis `name` is sharded over."""
    if name is None:
        return ()
    if name not in RULES:
        raise KeyError(f"logical axis {name!r} has no entry in sharding.rules.RULES")
    return tuple(a for a in RULES[name] if mesh_shape.get(a, 1) > 1)


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
    """Where a batch's arrays live on `mesh`: rows (the leading axis) split over the mesh
    axes of the logical `batch` axis, every other axis whole."""
    return NamedSharding(mesh, PartitionSpec(mesh_axes_for("batch", dict(mesh.shape)) or None))


def global_batch(local: dict[str, Any], sharding: NamedSharding) -> dict[str, jax.Array]:
    """This process's rows of a batch (host arrays) -> the global batch of jax.Arrays laid out
    by `sharding` (every process passes its own rows, as from a per-process data loader)."""
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local.items()}


def global_batch_from_whole(batch: dict[str, Any], sharding: NamedSharding
                            ) -> dict[str, jax.Array]:
    """The whole batch (host arrays that every process holds alike, e.g. built from the
    same seeds) -> the global batch laid out by `sharding`: each process places the rows of
    its own devices. With one process it equals global_batch."""
    return {k: jax.make_array_from_callback(v.shape, sharding, lambda idx, v=v: v[idx])
            for k, v in batch.items()}


def partition_spec(axes: tuple[str | None, ...], mesh: jax.sharding.Mesh,
                   shape: tuple[int, ...] | None = None) -> PartitionSpec:
    """PartitionSpec for logical `axes` on `mesh`: mesh axes absent from the mesh (or of
    size 1) are left out, a mesh axis is used at most once per array, and with `shape` a
    mesh axis that does not divide its dimension is dropped (that dimension stays whole)."""
    mesh_shape = dict(mesh.shape)
    used: set[str] = set()
    spec = []
    for i, name in enumerate(axes):
        chosen: list[str] = []
        for a in mesh_axes_for(name, mesh_shape):
            if a in used:
                continue
            size = mesh_shape[a] * _prod(mesh_shape[c] for c in chosen)
            if shape is not None and shape[i] % size:
                continue
            chosen.append(a)
        used.update(chosen)
        spec.append(chosen[0] if len(chosen) == 1 else (tuple(chosen) or None))
    return PartitionSpec(*spec)


def _prod(values) -> int:
    out = 1
    for v in values:
        out *= v
    return out


def _var_shape(var: nnx.Variable) -> tuple[int, ...]:
    return tuple(var.get_value().shape)


def variable_sharding(var: nnx.Variable, mesh: jax.sharding.Mesh) -> NamedSharding:
    shape = _var_shape(var)
    axes = var.get_metadata().get("out_sharding") or (None,) * len(shape)
    return NamedSharding(mesh, partition_spec(tuple(axes), mesh, shape))


def state_shardings(state: nnx.State, mesh: jax.sharding.Mesh) -> nnx.State:
    """The NamedSharding of every variable of an (abstract or concrete) nnx state, as a
    tree of the same structure (Variables holding shardings), usable as in/out_shardings."""
    return jax.tree.map(lambda v: v.replace(variable_sharding(v, mesh)), state,
                        is_leaf=lambda x: isinstance(x, nnx.Variable))


def shard_model(model: nnx.Module, mesh: jax.sharding.Mesh) -> nnx.Module:
    """Place every variable of `model` on `mesh` by its logical axis names, and tell the
    modules that choose their algorithm by the mesh (those with a `mesh` attribute, such as
    the MoE) which mesh they now run on (`bind_mesh`)."""
    graphdef, state = nnx.split(model)

    def place(var):
        return var.replace(jax.device_put(var.get_value(), variable_sharding(var, mesh)))

    state = jax.tree.map(place, state, is_leaf=lambda x: isinstance(x, nnx.Variable))
    return bind_mesh(nnx.merge(graphdef, state), mesh)


def bind_mesh(model: nnx.Module, mesh: jax.sharding.Mesh | None) -> nnx.Module:
    """Set `mesh` on every submodule of `model` that has a `mesh` attribute (in place;
    returns `model`)."""
    for _, node in nnx.iter_graph(model):
        if isinstance(node, nnx.Module) and hasattr(node, "mesh"):
            node.mesh = mesh
    return model


def opt_state_shardings(tx: optax.GradientTransformation, params: Any,
                        param_shardings: Any, mesh: jax.sharding.Mesh) -> Any:
    """Shardings for `tx.init(params)`: every leaf that mirrors a parameter (Adam's mu and
    nu, momentum, ...) gets that parameter's sharding, everything else (step counts) is
    replicated. `params` may be abstract (jax.ShapeDtypeStruct leaves)."""
    abstract_state = jax.eval_shape(tx.init, params)
    replicated = NamedSharding(mesh, PartitionSpec())
    # Partitioned optimizers (optax.multi_transform, e.g. Muon + AdamW) hold a MaskedNode
    # where a sub-transform does not see a parameter: keep it (it has no leaves).
    masked = optax.transforms.MaskedNode
    return optax.tree_map_params(
        tx, lambda leaf, s: leaf if isinstance(leaf, masked) else s, abstract_state,
        param_shardings, transform_non_params=lambda _: replicated,
        is_leaf=lambda x: isinstance(x, masked))


def constrain(x: jax.Array, axes: tuple[str | None, ...]) -> jax.Array:
    """Annotate activation `x` with logical `axes` under the active mesh (`jax.set_mesh`);
    a no-op without one, so single-device code is unchanged."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return x
    return jax.lax.with_sharding_constraint(x, partition_spec(axes, mesh, x.shape))
