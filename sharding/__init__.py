"""Meshes, the logical-axis rules table and expert-parallel collectives. Knows nothing of
the model: modules name logical axes, this package maps them to mesh axes."""
