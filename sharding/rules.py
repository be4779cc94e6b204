"""THE table: logical axis name -> mesh axes. Changing a parallelism layout means editing
this table, never a module."""

from __future__ import annotations

import jax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

# Mesh axes: data (pure data parallel), fsdp (data parallel with sharded weights),
# expert (expert parallel; also shards the batch outside the MoE), tensor (tensor parallel).
RULES: dict[str, tuple[str, ...]] = {
    "batch": ("data", "fsdp", "expert"),
    "seq": (),
    "layers": (),
    "vocab": ("tensor",),
    "embed": ("fsdp",),
    "q_heads": ("tensor",),
    "kv_heads": ("tensor",),
    "head_dim": (),
    "mlp": ("tensor",),
    "experts": ("expert",),
    "expert_mlp": ("tensor",),
}


def partition_spec(axes: tuple[str | None, ...], mesh: jax.sharding.Mesh) -> PartitionSpec:
    """PartitionSpec for logical `axes` on `mesh`: mesh axes absent from the mesh (or of
    size 1) are left out, and a mesh axis is used at most once per array."""
    used: set[str] = set()
    spec = []
    for name in axes:
        if name is not None and name not in RULES:
            raise KeyError(f"logical axis {name!r} has no entry in sharding.rules.RULES")
        mesh_axes = tuple(a for a in RULES.get(name, ()) if mesh.shape.get(a, 1) > 1
                          and a not in used) if name else ()
        used.update(mesh_axes)
        spec.append(mesh_axes[0] if len(mesh_axes) == 1 else (mesh_axes or None))
    return PartitionSpec(*spec)


def shard_model(model: nnx.Module, mesh: jax.sharding.Mesh) -> nnx.Module:
    """Place every variable of `model` on `mesh` by its logical axis names."""
    graphdef, state = nnx.split(model)

    def place(var):
        axes = var.get_metadata().get("out_sharding") or (None,) * var[...].ndim
        return var.replace(jax.device_put(var[...], NamedSharding(mesh, partition_spec(axes, mesh))))

    state = jax.tree.map(place, state, is_leaf=lambda x: isinstance(x, nnx.Variable))
    return nnx.merge(graphdef, state)
