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


# Two instructions as the TPU compiler writes them (from MaxText's GLM-4.5-Air-sized step):
# a dot over heads x head_dim as a convolution whose window spans the heads, and a dot with a
# batch (KV-head) dimension as a fully padded window of one valid tap per output.
_CONV_HLO = """
ENTRY %main (p0: bf16[4096,96,128], p1: bf16[96,128,4096], p2: bf16[4096,1,4096], p3: bf16[4096,8,128]) -> bf16[4096,4096,1] {
  %p0 = bf16[4096,96,128]{2,1,0} parameter(0)
  %p1 = bf16[96,128,4096]{2,1,0} parameter(1)
  %p2 = bf16[4096,1,4096]{2,1,0} parameter(2)
  %p3 = bf16[4096,8,128]{2,1,0} parameter(3)
  %heads = bf16[4096,4096,1]{0,1,2} convolution(%p0, %p1), window={size=96}, dim_labels=b0f_0io->bf0
  %kv = bf16[4096,8,128]{2,1,0} convolution(%p2, %p3), window={size=8 pad=7_7 rhs_reversal=1}, dim_labels=b0f_i0o->b0f
  ROOT %t = (bf16[4096,4096,1]{0,1,2}, bf16[4096,8,128]{2,1,0}) tuple(%heads, %kv)
}
"""


def test_matmul_flops_counts_windowed_contractions():
    from sharding.hlo_stats import matmul_flops

    heads = 2 * 4096 * 4096 * 96 * 128  # [4096, 96x128] @ [96x128, 4096]
    kv = 2 * 4096 * 8 * 128 * 4096  # per KV head: [4096, 4096] @ [4096, 128]
    assert matmul_flops(_CONV_HLO) == heads + kv


def test_kernel_flops_of_grouped_matmuls_without_a_declared_cost():
    from sharding.hlo_stats import kernel_flops

    hlo = """
ENTRY %main () -> bf16[16,4096,1408] {
  %gmm.3 = bf16[262144,1408]{1,0} custom-call(%a, %b), custom_call_target="tpu_custom_call", operand_layout_constraints={s32[], bf16[262144,4096]{1,0}, bf16[16,4096,1408]{2,1,0}}
  ROOT %tgmm.1 = bf16[16,4096,1408]{2,1,0} custom-call(%a, %c), custom_call_target="tpu_custom_call", operand_layout_constraints={s32[], bf16[262144,4096]{1,0}, bf16[262144,1408]{1,0}}
}
"""
    m_k_n = 2.0 * 262144 * 4096 * 1408
    assert kernel_flops(hlo) == {"gmm": m_k_n, "tgmm": m_k_n}
