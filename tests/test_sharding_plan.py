"""The scale plan's HLO accounting: collectives inside the layer scan count once per trip."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from sharding.mesh import make_mesh
from sharding.plan import collective_bytes

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (simulated) devices")


def test_collective_bytes_counts_scan_trips():
    mesh = make_mesh({"data": 2, "expert": 4})

    def body(c, _):
        c = jax.lax.psum(jnp.sin(c), "data")  # all-reduce over groups of 2
        c = c * (1 + jax.lax.axis_index("data"))  # varying over data again, as the carry
        c = jax.lax.all_to_all(c, "expert", 0, 0, tiled=True)  # groups of 4
        return c, None

    def f(x):
        return jax.lax.scan(body, x, None, length=5)[0]

    g = jax.jit(jax.shard_map(f, mesh=mesh, in_specs=P(("data", "expert")),
                              out_specs=P(("data", "expert"))))
    x = jax.device_put(jnp.ones((8 * 256,), jnp.float32),
                       NamedSharding(mesh, P(("data", "expert"))))
    got = collective_bytes(g.lower(x).compile().as_text(), 8)
    per_device = 256 * 4  # bytes of the local f32[256]
    assert got["all-reduce"] == pytest.approx(5 * per_device * 2 * (2 - 1) / 2)
    assert got["all-to-all"] == pytest.approx(5 * per_device * (4 - 1) / 4)
