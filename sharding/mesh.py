"""The device mesh: four named axes, built by `jax.make_mesh` (which orders devices so that
the fastest-varying axes sit on the fastest links, also on multi-host pods).

Axes, outermost first:
  data    pure data parallelism: weights replicated, batch sharded.
  fsdp    data parallelism with weights sharded on their `embed` dimension (ZeRO-3 style):
          weights are all-gathered per layer, gradients reduce-scattered.
  expert  expert parallelism: routed experts sharded, token rows exchanged by all-to-all.
          Outside the MoE block it shards the batch like `data`.
  tensor  tensor parallelism: heads, MLP width and expert width sharded (Megatron style).
"""

from __future__ import annotations

import math

import jax
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh

MESH_AXES: tuple[str, ...] = ("data", "fsdp", "expert", "tensor")


def parse_mesh(spec: str) -> dict[str, int]:
    """'fsdp=16,expert=16' -> {'fsdp': 16, 'expert': 16} (the CLI / config spelling)."""
    axes: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, sep, value = part.partition("=")
        if not sep:
            raise ValueError(f"mesh spec {spec!r}: {part!r} is not of the form axis=size")
        try:
            axes[name.strip()] = int(value)
        except ValueError:
            raise ValueError(f"mesh spec {spec!r}: size of {name!r} is not an integer") from None
    return axes


def resolve_axes(axes: dict[str, int], num_devices: int) -> dict[str, int]:
    """All four axes with sizes, the one -1 filled in; raises a clear error on a bad shape."""
    unknown = sorted(set(axes) - set(MESH_AXES))
    if unknown:
        raise ValueError(f"mesh axes {unknown} unknown; the axes are {list(MESH_AXES)}")
    sizes = {name: int(axes.get(name, 1)) for name in MESH_AXES}
    free = [n for n, s in sizes.items() if s == -1]
    if len(free) > 1:
        raise ValueError(f"mesh {axes}: only one axis may be -1, got {free}")
    bad = [n for n, s in sizes.items() if s < 1 and s != -1]
    if bad:
        raise ValueError(f"mesh {axes}: axis sizes must be positive (or one -1), got {bad}")
    fixed = math.prod(s for s in sizes.values() if s != -1)
    if free:
        if num_devices % fixed:
            raise ValueError(f"mesh {axes}: the fixed axes multiply to {fixed}, which does not "
                             f"divide the {num_devices} devices, so -1 cannot be filled in")
        sizes[free[0]] = num_devices // fixed
    elif fixed != num_devices:
        raise ValueError(f"mesh {axes}: the axis sizes multiply to {fixed} but there are "
                         f"{num_devices} devices")
    return sizes


def make_mesh(axes: dict[str, int], devices: list | None = None) -> Mesh:
    """A mesh over `data`, `fsdp`, `expert`, `tensor` (missing axes have size 1; one axis
    may be -1 to take the remaining devices). Axis types are Auto: modules name logical
    axes, `sharding.rules` maps them, and GSPMD propagates shardings between annotations."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = resolve_axes(axes, len(devices))
    shape = tuple(sizes[n] for n in MESH_AXES)
    types = (AxisType.Auto,) * len(MESH_AXES)
    try:
        return jax.make_mesh(shape, MESH_AXES, axis_types=types, devices=devices)
    except (NotImplementedError, ValueError):
        # A TPU torus whose physical axes the mesh axes cannot each cover whole (16 x 16 on
        # 4x8x8 chips): split physical axes; such an axis's ring is then shared.
        grid = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
        return Mesh(grid, MESH_AXES, axis_types=types)


def mesh_platform(mesh: Mesh | jax.sharding.AbstractMesh | None = None) -> str:
    """'cpu', 'tpu' or 'gpu': the platform of the devices `mesh` (default: the active mesh,
    else the default devices) runs on. Kernels and collectives are chosen by this, never by
    `jax.default_backend()`: compiling ahead of time for a TPU topology on a CPU host, the
    host's backend is 'cpu' while the program runs on TPUs."""
    mesh = jax.sharding.get_abstract_mesh() if mesh is None else mesh
    if mesh is None or mesh.empty:
        return jax.devices()[0].platform
    if isinstance(mesh, Mesh):
        return mesh.devices.flat[0].platform
    return mesh.abstract_device.platform


def check_model_fits_mesh(mesh_shape: dict[str, int], *, num_experts: int, num_heads: int,
                          num_kv_heads: int) -> None:
    """Raise if the mesh cannot shard a model with these sizes: experts must divide over
    `expert` (each device owns a whole set of experts), query heads over `tensor`. KV heads
    that do not divide over `tensor` are left unsharded by `rules.partition_spec`.
    Takes plain ints so that `sharding/` never imports the model's config."""
    ep, tp = mesh_shape.get("expert", 1), mesh_shape.get("tensor", 1)
    if num_experts % ep:
        raise ValueError(f"mesh axis expert={ep} does not divide n_routed_experts={num_experts}"
                         ": every device must own the same number of experts")
    if num_heads % tp:
        raise ValueError(f"mesh axis tensor={tp} does not divide num_attention_heads="
                         f"{num_heads}")
    del num_kv_heads  # replicated when not divisible (see rules.partition_spec)
