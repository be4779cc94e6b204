"""Meshes, the logical-axis rules table and expert-parallel collectives. Knows nothing of
the model: modules name logical axes, this package maps them to mesh axes."""

from sharding.mesh import make_mesh, parse_mesh, resolve_axes
from sharding.rules import RULES, partition_spec, variable_sharding

__all__ = ["RULES", "make_mesh", "parse_mesh", "partition_spec", "resolve_axes",
           "variable_sharding"]
