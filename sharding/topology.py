"""Compile targets: Cloud TPU slice names (v5p-512, v6e-256, v5e-64) as abstract TPU devices.

With `libtpu` installed, `jax.experimental.topologies` describes a TPU slice on any host;
its devices are enough to build a mesh and run the real TPU compiler ahead of time (nothing
runs, nothing is allocated). `sharding.plan --target tpu-v5p-512` uses this.

Cloud TPU names count TensorCores for v5p (two per chip, fused into one "megacore" device:
v5p-512 is 256 chips) and chips for v6e and v5e. The physical shapes below are the slice
shapes Cloud TPU offers for those sizes; each mesh axis should cover whole physical axes
(see `sharding.mesh.make_mesh`, which otherwise splits them).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass


@dataclass(frozen=True)
class Chip:
    generation: str  # as in the topology name: "v5p", "v6e", "v5e"
    hbm_gib: float  # per chip
    peak_bf16_flops: float  # per chip, dense bf16 FLOP/s
    cores_per_chip_in_name: int  # v5p-N counts TensorCores, N = 2 x chips
    chip_config_name: str  # "megacore": one JAX device per v5p chip (both TensorCores)
    hbm_bytes_per_second: float  # per chip
    ici_bytes_per_second: float  # per chip, all ports, both directions
    ici_ports: int  # 6 on a 3-D torus, 4 on a 2-D torus

    @property
    def ring_bytes_per_second(self) -> float:
        """What one device sends per second in a bidirectional ring along one torus axis:
        two of its ports, one direction each."""
        return self.ici_bytes_per_second / self.ici_ports


# Cloud TPU's published per-chip figures (the "System architecture" tables of the v5p, v6e
# and v5e pages of cloud.google.com/tpu/docs): bf16 peak, HBM capacity and bandwidth,
# bidirectional ICI bandwidth and ports.
CHIPS = {
    "v5p": Chip("v5p", 95.0, 459e12, 2, "megacore", 2765e9, 1200e9, 6),
    "v6e": Chip("v6e", 32.0, 918e12, 1, "default", 1638e9, 800e9, 4),
    "v5e": Chip("v5e", 16.0, 197e12, 1, "default", 819e9, 400e9, 4),
}

# Physical slice shapes by chip count (3-D torus for v5p, 2-D for v6e/v5e).
_V5P_SHAPES = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4",
               128: "4x4x8", 256: "4x8x8", 512: "8x8x8", 1024: "8x8x16"}
_2D_SHAPES = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16",
              256: "16x16"}


@dataclass(frozen=True)
class TpuTarget:
    name: str  # e.g. "v5p-512"
    chip: Chip
    chips: int  # per slice
    shape: str  # physical shape, e.g. "4x8x8"
    num_slices: int = 1

    @property
    def num_devices(self) -> int:
        return self.chips * self.num_slices


def libtpu_available() -> bool:
    """True if the TPU compiler (the `libtpu` package, extra `tpu`) is installed."""
    return importlib.util.find_spec("libtpu") is not None


def parse_target(name: str, num_slices: int = 1) -> TpuTarget:
    """'v5p-512' or 'tpu-v5p-512' -> TpuTarget. Raises ValueError naming the fix."""
    spec = name.removeprefix("tpu-")
    generation, _, count = spec.partition("-")
    if generation not in CHIPS or not count.isdigit():
        raise ValueError(f"--target {name!r}: expected tpu-<gen>-<N> with gen one of "
                         f"{sorted(CHIPS)}, e.g. tpu-v5p-512")
    chip = CHIPS[generation]
    cores = int(count)
    chips, rem = divmod(cores, chip.cores_per_chip_in_name)
    shapes = _V5P_SHAPES if generation == "v5p" else _2D_SHAPES
    if rem or chips not in shapes:
        sizes = sorted(c * chip.cores_per_chip_in_name for c in shapes)
        raise ValueError(f"--target {name!r}: {generation} slices come in sizes {sizes}")
    if num_slices < 1:
        raise ValueError(f"--num-slices {num_slices}: must be >= 1")
    return TpuTarget(f"{generation}-{cores}", chip, chips, shapes[chips], num_slices)


def tpu_devices(target: TpuTarget) -> list:
    """The abstract devices of `target` (one per chip, slices one after the other).
    Needs libtpu; raises RuntimeError with the install command when it is missing."""
    if not libtpu_available():
        raise RuntimeError("compiling for TPU needs libtpu: pip install -e '.[tpu]'")
    from jax.experimental import topologies

    topo = topologies.get_topology_desc(
        platform="tpu", topology_name=f"{target.chip.generation}:{target.shape}",
        chip_config_name=target.chip.chip_config_name, chips_per_host_bounds=(2, 2, 1),
        num_slices=target.num_slices)
    return list(topo.devices)
