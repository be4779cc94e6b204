"""The accelerator path, compiled ahead of time for a small TPU slice on this CPU host (the
real TPU compiler from libtpu; nothing runs on a TPU), and the platform choices following the
mesh's devices rather than the host's backend. The ragged exchange's offset arithmetic is
checked on CPU by replaying the exchange in NumPy (XLA:CPU has no ragged all-to-all)."""

from __future__ import annotations

import os
import re
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from configs import tiny  # noqa: E402
from glm_jax.config import GlmConfig  # noqa: E402
from sharding.expert_parallel import ragged_layout, receive_buffer_rows  # noqa: E402
from sharding.hlo_stats import matmul_flops  # noqa: E402
from sharding.mesh import make_mesh, mesh_platform  # noqa: E402
from sharding.topology import libtpu_available, parse_target, tpu_devices  # noqa: E402

# Tests only compile; another process (a plan in the background) may hold libtpu too.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
needs_libtpu = pytest.mark.skipif(not libtpu_available(),
                                  reason="libtpu not installed (pip install -e '.[tpu]')")


def tpu_config(**kw) -> GlmConfig:
    """The tiny structure (one dense, one MoE layer; no MTP to keep compiles short) at widths
    the megablox kernel tiles (multiples of 128), bf16."""
    return GlmConfig.from_dict({**tiny.get_config().model.to_dict(), "num_hidden_layers": 2,
                                "hidden_size": 128, "moe_intermediate_size": 128,
                                "n_routed_experts": 8, "num_experts_per_tok": 2,
                                "intermediate_size": 256, "dtype": "bfloat16",
                                "moe_backend": "ragged_dot", "num_nextn_predict_layers": 0, **kw})


# ------------------------------------------------------------------ ragged offsets (CPU)
@pytest.mark.parametrize("buffer_factor", [None, 1.0])
def test_ragged_layout_replays_to_the_right_rows(buffer_factor):
    """Every device's per-expert counts -> offsets; replaying ragged_all_to_all with them
    puts each row in its receiver's buffer, packed from row 0, tagged with its local expert,
    and the return trip brings each result back to the row it came from."""
    rng = np.random.default_rng(0)
    ep, e_local, n, k = 4, 3, 10, 2
    e = ep * e_local
    idx = np.stack([np.stack([rng.choice(e, k, replace=False) for _ in range(n)])
                    for _ in range(ep)])  # [EP, n, k]
    idx[0, :, 0] = 1  # skew: device 0 sends many rows to device 0
    rows, counts = [], []
    for i in range(ep):
        flat = idx[i].reshape(-1)
        order = np.argsort(flat, kind="stable")
        rows.append(np.stack([np.full(n * k, i), order, flat[order]], 1))  # (src, pair, expert)
        counts.append(np.bincount(flat, minlength=e))
    counts = np.stack(counts).astype(np.int32)
    buf = receive_buffer_rows(n, k, e, ep, buffer_factor)
    layouts = [jax.tree.map(np.asarray, ragged_layout(jnp.asarray(counts), jnp.int32(j), buf))
               for j in range(ep)]
    recv = [np.full((buf, 3), -1) for _ in range(ep)]
    for i, lay in enumerate(layouts):  # ragged_all_to_all: my run j -> j's buffer
        for j in range(ep):
            s, size, o = lay["send_starts"][j], lay["send_sizes"][j], lay["out_offsets"][j]
            assert lay["recv_sizes"][i] == layouts[i]["recv_sizes"][i]
            assert size == layouts[j]["recv_sizes"][i] and o == layouts[j]["recv_starts"][i]
            assert (recv[j][o:o + size] == -1).all(), "runs overlap"
            recv[j][o:o + size] = rows[i][s:s + size]
    kept = 0
    for j, lay in enumerate(layouts):
        total = lay["recv_sizes"].sum()
        kept += total
        assert (recv[j][:total] >= 0).all() and (recv[j][total:] == -1).all(), "not packed"
        assert (recv[j][:total, 2] // e_local == j).all(), "row at the wrong device"
        np.testing.assert_array_equal(lay["recv_expert"][:total], recv[j][:total, 2] % e_local)
        assert (lay["recv_expert"][total:] == e_local).all()
        # the local-expert order, computed from the counts: a permutation of the buffer that
        # sorts the real rows by local expert, stably (by source, then as sent), empties last
        pos = lay["local_position"]
        np.testing.assert_array_equal(np.sort(pos), np.arange(buf))
        ordered = np.full((buf, 3), -1)
        ordered[pos] = recv[j]
        np.testing.assert_array_equal(
            ordered[:total], recv[j][:total][np.argsort(recv[j][:total, 2] % e_local,
                                                        kind="stable")])
        np.testing.assert_array_equal(lay["local_group_sizes"],
                                      np.bincount(recv[j][:total, 2] % e_local,
                                                  minlength=e_local))
    sent = counts.reshape(ep, ep, e_local).sum(-1)
    if buffer_factor is None:
        assert kept == n * k * ep, "dropless buffer dropped rows"
    else:
        assert kept == np.minimum(sent.sum(0), buf).sum() < n * k * ep
    for i, lay in enumerate(layouts):  # the return trip: j's block for i -> i's rows
        back = np.full((n * k, 3), -1)
        for j in range(ep):
            lj = layouts[j]
            s, size, o = lj["recv_starts"][i], lj["recv_sizes"][i], lj["back_offsets"][i]
            assert size == lay["send_sizes"][j] and o == lay["send_starts"][j]
            back[o:o + size] = recv[j][s:s + size]
        got = back[:, 0] >= 0
        np.testing.assert_array_equal(back[got], rows[i][got])


# ------------------------------------------------------ choice from the mesh's devices
def _moe_hlo(mesh) -> str:
    """StableHLO of one MoE block's forward + backward traced for `mesh`."""
    from flax import nnx

    from glm_jax.model.moe import MoE
    from sharding import rules

    cfg = tpu_config()
    with nnx.use_eager_sharding(False):  # logical axis names only, as GlmForCausalLM does
        graphdef, state = nnx.split(nnx.eval_shape(lambda: MoE(cfg, rngs=nnx.Rngs(0),
                                                                 mesh=mesh)))
    state_sh = rules.state_shardings(state, mesh)
    x = jax.ShapeDtypeStruct((8, 16, cfg.hidden_size), jnp.bfloat16,
                             sharding=jax.sharding.NamedSharding(
                                 mesh, rules.partition_spec(("batch", "seq", None), mesh)))
    state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                         state, state_sh)

    def loss(state, x):
        y, _ = nnx.merge(graphdef, state)(x)
        return jnp.sum(y.astype(jnp.float32) ** 2)

    with jax.set_mesh(mesh):
        return jax.jit(jax.grad(loss)).lower(state, x).as_text()


@needs_libtpu
def test_transport_and_kernel_follow_the_mesh_devices():
    """The same MoE code: for a CPU mesh the static all_to_all and no TPU kernel; for a TPU
    mesh (traced on this CPU host) ragged_all_to_all and the megablox kernels."""
    assert jax.default_backend() == "cpu"
    cpu = make_mesh({"expert": 4}, jax.devices()[:4])
    tpu = make_mesh({"expert": 4}, tpu_devices(parse_target("v5p-8")))
    assert (mesh_platform(cpu), mesh_platform(tpu)) == ("cpu", "tpu")
    assert mesh_platform(cpu.abstract_mesh) == "cpu"
    assert mesh_platform(tpu.abstract_mesh) == "tpu"
    cpu_hlo, tpu_hlo = _moe_hlo(cpu), _moe_hlo(tpu)
    assert "all_to_all" in cpu_hlo and "ragged_all_to_all" not in cpu_hlo
    assert "tpu_custom_call" not in cpu_hlo
    assert "ragged_all_to_all" in tpu_hlo
    calls = re.findall(r"call @(t?gmm)(?:_\d+)?\b", tpu_hlo)
    # gmm: forward and input gradients; tgmm: one weight gradient per expert matrix
    assert calls.count("gmm") >= 3 and calls.count("tgmm") >= 3
    assert "tpu_custom_call" in tpu_hlo


def test_bad_target_is_one_clear_line():
    with pytest.raises(ValueError, match="v5p slices come in sizes"):
        parse_target("tpu-v5p-12")
    with pytest.raises(ValueError, match="expected tpu-<gen>-<N>"):
        parse_target("tpu-v9-8")
    t = parse_target("tpu-v5p-512", num_slices=2)
    assert (t.chips, t.shape, t.num_devices, t.chip.hbm_gib) == (256, "4x8x8", 512, 95.0)


# ------------------------------------------------------- the train step compiled for TPU
@pytest.fixture(scope="module")
def tpu_step(tmp_path_factory):
    """The real train step of a tiny model compiled for 4 v5p chips, expert=4, with the
    compiler's log captured (it reports forced rematerialization on stderr)."""
    from sharding.plan import compile_plan

    hlo_path = str(tmp_path_factory.mktemp("tpu") / "step.hlo")
    cfg = tpu_config()
    cpu_seconds = time.process_time()  # all threads' CPU time: wall time depends on load
    plan = compile_plan(cfg, {"expert": 4}, seq_len=128, global_batch=8, show_hlo=hlo_path,
                        devices=tpu_devices(parse_target("tpu-v5p-8")))
    cpu_seconds = time.process_time() - cpu_seconds
    with open(hlo_path) as f:
        return cfg, plan, f.read(), cpu_seconds


@needs_libtpu
def test_train_step_compiles_for_tpu_with_the_accelerator_moe_path(tpu_step, capfd):
    cfg, plan, hlo, cpu_seconds = tpu_step
    assert cpu_seconds < 60
    assert "ragged-all-to-all" in hlo and plan.collectives.get("ragged-all-to-all", 0) > 0
    e, h, f = cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size
    expert_shapes = {f"[{e},{h},{f}]", f"[{e},{f},{h}]"}
    gathers = [line for line in hlo.splitlines() if "all-gather" in line]
    assert not [g for g in gathers if any(s in g for s in expert_shapes)], \
        "expert weights are all-gathered"
    # The grouped matmuls are the megablox kernels, forward and backward (no dense
    # ragged_dot weight gradient), and at the rows they compute the step is within 1.2x of
    # the analytic 6 x active parameters x tokens (+ attention).
    assert set(plan.kernel_flops) == {"gmm", "tgmm"}
    assert plan.grouped_matmul_fill == 0.25  # dropless buffer: EP * min(k, E/EP) / k = 4x
    assert plan.flops_at_real_rows <= 1.2 * plan.analytic_flops, \
        (plan.flops_at_real_rows, plan.analytic_flops)
    assert "involuntary full rematerialization" not in capfd.readouterr().err
    # The HLO-derived matmul FLOPs (the step estimate's compute term) agree with the
    # compiler's own count: loop bodies once plus the kernels' declared FLOPs, short of it
    # only by the elementwise work.
    once = matmul_flops(hlo, per_trip=False) + sum(plan.kernel_flops_once.values())
    assert 0.75 * plan.flops <= once <= plan.flops, (once, plan.flops)
    assert plan.executed_flops > 0 and plan.hbm_bytes > 0


@needs_libtpu
def test_attention_kernel_follows_the_mesh_devices():
    """`dot_product_attention` on a TPU mesh is the splash kernel over segment ids (no
    [T, T] mask or scores); on a CPU mesh the XLA path with the dense mask, as before."""
    from flax import nnx

    from glm_jax import GlmForCausalLM

    cfg = tpu_config(attention_backend="dot_product_attention")
    t = 512

    def hlo(mesh):
        with nnx.use_eager_sharding(False):
            graphdef, state = nnx.split(nnx.eval_shape(
                lambda: GlmForCausalLM(cfg, rngs=nnx.Rngs(0), mesh=mesh)))
        ids = jax.ShapeDtypeStruct((4, t), jnp.int32)
        with jax.set_mesh(mesh):
            return jax.jit(lambda s, i: nnx.merge(graphdef, s)(i).logits).lower(
                state, ids).as_text()

    tpu_hlo = hlo(make_mesh({"data": 2, "expert": 2}, tpu_devices(parse_target("v5p-8"))))
    cpu_hlo = hlo(make_mesh({"data": 2, "expert": 2}, jax.devices()[:4]))
    assert "splash_mha" in tpu_hlo and f"{t}x{t}xi1" not in tpu_hlo
    assert "splash_mha" not in cpu_hlo and f"{t}x{t}xi1" in cpu_hlo
