"""Expert parallelism: token rows go to the devices that own their experts and come back.

Model-agnostic: the caller hands over routed tokens (`x` [N, H], expert ids `idx` [N, k],
mixing weights [N, k]), the stacked expert weights, and the *local expert function*
`local_ffn(x_rows, row_expert, group_sizes, w_gate, w_up, w_down, capacity_factor)
-> (y_rows, dropped)` that runs experts over rows sorted by expert (glm_jax's grouped-matmul
backends). Inside one `jax.shard_map` each device

  1. sorts its own token-expert pairs by expert; the pairs for the device owning experts
     [j*El, (j+1)*El) are then one contiguous run,
  2. packs run j into slot j of a static buffer [EP, C, H] and exchanges the buffers with
     one `all_to_all` over the `expert` axis (the transport XLA:CPU runs; see below),
  3. sorts what it received by local expert and runs `local_ffn` on it (over `tensor` the
     expert width is sharded and the partial outputs are summed with `psum`),
  4. sends the results back with the inverse `all_to_all`, unsorts and mixes with the
     routing weights in float32.

Dropless capacity: a token's k experts are distinct, so at most min(k, El) of its pairs go
to one device, and n local tokens send at most C = n * min(k, El) rows to any device. With
that C nothing can be dropped (this is MaxText's worst case min(EP, E/k) x the balanced
n*k/EP). The price is static buffers EP/min(EP, E/k)... times the balanced size at worst:
the receiving device holds EP * C rows, most of them padding when routing is balanced.
With `capacity_factor` the per-destination buffer is C = ceil(cf * n * k / EP) (capped at the
dropless C) and overflow rows (later tokens of the sorted run) are dropped and counted.

`transport="ragged"` (chosen on TPU and GPU meshes; XLA:CPU has no ragged all-to-all) uses
`jax.lax.ragged_all_to_all`, which moves only the real rows. The devices first exchange
their per-expert row counts (one all_gather of [E] int32), so each knows every run's size
and computes the packed offsets itself (`ragged_layout`): a receiver stacks the runs of its
EP senders back to back from row 0 of one buffer, and the results return the same way.
Its receive-buffer bound is in `receive_buffer_rows`.

The transport follows the devices the mesh runs on (`sharding.mesh.mesh_platform`), never
`jax.default_backend()`, which is the host's CPU when compiling for a TPU topology.
"""

from __future__ import annotations

import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from sharding.mesh import mesh_platform
from sharding.rules import mesh_axes_for

LocalFfn = Callable[..., tuple[jax.Array, jax.Array]]


def expert_axis_size(mesh=None) -> int:
    """Size of the `expert` axis of `mesh` (default: the active mesh), 1 without one."""
    mesh = jax.sharding.get_abstract_mesh() if mesh is None else mesh
    if mesh is None or mesh.empty:
        return 1
    return dict(mesh.shape).get("expert", 1)


def exchange_capacity(n_local: int, k: int, num_experts: int, ep: int,
                      capacity_factor: float | None) -> int:
    """Rows each device reserves per destination device in the exchange buffer."""
    dropless = n_local * min(k, num_experts // ep)
    if capacity_factor is None:
        return max(1, dropless)
    return max(1, min(dropless, math.ceil(capacity_factor * n_local * k / ep)))


def receive_buffer_rows(n_local: int, k: int, num_experts: int, ep: int,
                        capacity_factor: float | None) -> int:
    """Rows of the ragged transport's receive buffer (all sources packed together).

    Dropless (capacity_factor None): EP * n_local * min(k, E/EP). Each of the EP devices
    sends a given device at most n_local * min(k, E/EP) rows (a token's k experts are
    distinct, and only E/EP of them live on one device), so the packed runs can never
    overflow; the bound is reached when every token picks that device's experts. With a
    capacity factor: ceil(cf * n_local * k), cf times the balanced load (n_local * k), capped
    at the dropless bound; runs past the end are cut (see ragged_layout) and counted."""
    dropless = ep * n_local * min(k, num_experts // ep)
    if capacity_factor is None:
        return max(1, dropless)
    return max(1, min(dropless, math.ceil(capacity_factor * n_local * k)))


def expert_parallel_ffn(x: jax.Array, idx: jax.Array, weights: jax.Array, w_gate: jax.Array,
                        w_up: jax.Array, w_down: jax.Array, *, local_ffn: LocalFfn,
                        capacity_factor: float | None = None, mesh=None,
                        transport: str = "auto") -> tuple[jax.Array, jax.Array]:
    """Routed experts with expert parallelism over the mesh axis `expert`.

    x [N, H] (any dtype), idx [N, k] int32, weights [N, k] float32, w_gate/w_up [E, H, F],
    w_down [E, F, H]. Returns (y [N, H] float32 = sum_k weights * expert_k(x), dropped: int32
    token-expert pairs dropped over all devices; always 0 when `capacity_factor` is None).
    Tokens are split over the mesh axes of the logical axis `tokens` (padded to a multiple),
    experts over `expert`, the expert width over `expert_mlp`'s axes (tensor parallelism).
    """
    mesh = jax.sharding.get_abstract_mesh() if mesh is None else mesh
    shape = dict(mesh.shape)
    ep = shape.get("expert", 1)
    e, h, f = w_gate.shape
    if e % ep:
        raise ValueError(f"mesh axis expert={ep} does not divide the {e} experts")
    token_axes = mesh_axes_for("tokens", shape)
    if "expert" not in token_axes:
        raise ValueError("the logical axis 'tokens' must be sharded over 'expert' "
                         "(sharding.rules.RULES) for expert parallelism")
    tp_axes = tuple(a for a in mesh_axes_for("expert_mlp", shape) if f % shape[a] == 0)[:1]
    platform = mesh_platform(mesh)
    if transport == "auto":  # from the devices the mesh runs on, not the host
        transport = "a2a" if platform == "cpu" else "ragged"
    if transport not in ("a2a", "ragged"):
        raise ValueError(f"transport={transport!r}: expected 'auto', 'a2a' or 'ragged'")

    n, k = idx.shape
    shards = math.prod(shape[a] for a in token_axes)
    pad = -n % shards
    if pad:  # padded tokens get weight 0 and are dropped from the output
        x = jnp.pad(x, ((0, pad), (0, 0)))
        idx = jnp.pad(idx, ((0, pad), (0, 0)))
        weights = jnp.pad(weights, ((0, pad), (0, 0)))
    n_local = (n + pad) // shards
    cap = (exchange_capacity if transport == "a2a" else receive_buffer_rows)(
        n_local, k, e, ep, capacity_factor)

    body = _make_body(local_ffn, ep=ep, cap=cap, tp_axes=tp_axes, token_axes=token_axes,
                      transport=transport)
    tok = P(token_axes, None)
    w_in = P("expert", None, tp_axes or None)
    w_out = P("expert", tp_axes or None, None)
    # Pallas kernels (the TPU grouped matmul) declare outputs without the varying-axes type
    # that check_vma needs; off CPU the check is off, as for MaxText's kernels under
    # shard_map (gradients stay right: the transpose then divides unmapped cotangents).
    y, dropped = jax.shard_map(body, mesh=mesh, in_specs=(tok, tok, tok, w_in, w_in, w_out),
                               out_specs=(tok, P()), check_vma=platform == "cpu")(
        x, idx, weights, w_gate, w_up, w_down)
    return y[:n], dropped



# Row permutations as gathers. The exchange reorders token rows several times (by expert,
# by local expert, and back). Written as `zeros.at[perm].set(rows)` (a scatter) or as a
# plain gather, whose transpose is a scatter-add, XLA emits row scatters; on TPU each
# [rows, hidden] scatter costs ~10 s of compile time (and its indices a sort), and the
# exchange had twelve of them per step. A permutation's transpose is the gather by its
# inverse, so here every reordering is a gather, forward and backward.
@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def take_rows(x: jax.Array, order: jax.Array, inverse: jax.Array, k: int = 1) -> jax.Array:
    """x [N, H], order [N*k] a permutation of range(N*k), inverse its inverse ->
    rows [N*k, H], rows[j] = x[order[j] // k] (k = 1: a plain permutation; k > 1: each row
    of x appears k times, as the token-expert pairs of its k experts)."""
    # In bounds by construction: no out-of-bounds masks in the gather (jnp.take's default).
    return x.at[order // k].get(mode="promise_in_bounds", unique_indices=k == 1)


def _take_rows_fwd(x, order, inverse, k):
    return take_rows(x, order, inverse, k), (order, inverse, x.shape[0])


def _take_rows_bwd(k, res, g):
    order, inverse, n = res
    # dx[t] = sum over the pairs p of token t (p // k == t) of g at the row p went to
    dx = g.at[inverse].get(mode="promise_in_bounds", unique_indices=True)
    dx = dx.reshape(n, k, *g.shape[1:]).sum(1)
    return dx, None, None  # order and inverse are integers


take_rows.defvjp(_take_rows_fwd, _take_rows_bwd)


def inverse_permutation(order: jax.Array) -> jax.Array:
    """inverse[order[j]] = j (a scatter of int32 [N], cheap unlike row scatters)."""
    iota = jnp.arange(order.shape[0], dtype=order.dtype)
    return jnp.zeros_like(order).at[order].set(iota, unique_indices=True)


def _make_body(local_ffn: LocalFfn, *, ep: int, cap: int, tp_axes: tuple[str, ...],
               token_axes: tuple[str, ...], transport: str):
    def body(x, idx, weights, w_gate, w_up, w_down):
        n, k = idx.shape
        h = x.shape[1]
        e_local = w_gate.shape[0]
        # 1. sort local token-expert pairs by (global) expert
        flat_expert = idx.reshape(-1)
        order = jnp.argsort(flat_expert, stable=True)
        inverse = inverse_permutation(order)
        row_expert = flat_expert[order]
        rows = take_rows(x, order, inverse, k)  # rows[j] = x[order[j] // k]
        dest = row_expert // e_local
        send_sizes = jnp.bincount(dest, length=ep).astype(jnp.int32)
        send_starts = jnp.cumsum(send_sizes) - send_sizes
        rank = jnp.arange(n * k, dtype=jnp.int32) - send_starts[dest]  # position in its run
        kept = rank < cap
        # 2. exchange: slot j of the buffer goes to device j
        if transport == "a2a":
            slot = jnp.where(kept, dest * cap + rank, ep * cap)  # overflow -> trash row
            buf = jnp.zeros((ep * cap + 1, h), x.dtype).at[slot].set(rows)[:-1]
            tag = jnp.full((ep * cap + 1,), e_local, jnp.int32).at[slot].set(
                row_expert % e_local)[:-1]  # e_local marks an empty slot
            recv = _a2a(buf.reshape(ep, cap, h)).reshape(ep * cap, h)
            recv_expert = _a2a(tag.reshape(ep, cap)).reshape(ep * cap)
            # 3. local experts over the received rows sorted by local expert; empties last
            local_order = jnp.argsort(recv_expert, stable=True)
            local_inverse = inverse_permutation(local_order)
            group_sizes = jnp.bincount(recv_expert, length=e_local).astype(jnp.int32)
        else:
            counts_local = jnp.bincount(flat_expert, length=ep * e_local).astype(jnp.int32)
            recv, layout = _ragged_exchange(rows, counts_local, ep=ep, buffer_rows=cap)
            recv_expert = layout["recv_expert"]
            kept = rank < layout["send_sizes"][dest]
            # 3. the same, with the order computed from the exchanged counts (no sort)
            local_inverse = layout["local_position"]
            local_order = inverse_permutation(local_inverse)
            group_sizes = layout["local_group_sizes"]
        y_sorted, _ = local_ffn(take_rows(recv, local_order, local_inverse),
                                jnp.minimum(recv_expert[local_order], e_local - 1),
                                group_sizes, w_gate, w_up, w_down, None)
        if tp_axes:  # each tensor shard computed a slice of the expert width
            y_sorted = jax.lax.psum(y_sorted, tp_axes)
        y_recv = take_rows(y_sorted, local_inverse, local_order)  # back to buffer order
        # 4. send results back, unsort, mix
        if transport == "a2a":
            back = _a2a(y_recv.reshape(ep, cap, h)).reshape(ep * cap, h)
            y_rows = jnp.concatenate([back, jnp.zeros((1, h), back.dtype)])[slot]
        else:
            y_rows = _ragged_return(y_recv, layout, n * k)
            y_rows = jnp.where(kept[:, None], y_rows, 0)
        y_pairs = take_rows(y_rows, inverse, order).reshape(n, k, h)  # pair order
        y = jnp.einsum("nkh,nk->nh", y_pairs.astype(jnp.float32), weights.astype(jnp.float32))
        dropped = jax.lax.psum(jnp.sum(~kept).astype(jnp.int32), token_axes)
        return y, dropped

    return body


def _a2a(buf: jax.Array) -> jax.Array:
    """[EP, C, ...]: slot j goes to device j; slot i of the result came from device i."""
    return jax.lax.all_to_all(buf, "expert", 0, 0, tiled=True)


def ragged_layout(counts: jax.Array, me: jax.Array, buffer_rows: int):
    """Offsets for the ragged exchange, from every device's per-expert row counts.

    counts [EP, E] int32: row i = token-expert pairs device i routes to each global expert
    (the same matrix on every device, from one all_gather); me: this device's index on the
    `expert` axis; buffer_rows: static rows of every receive buffer. Receiver j packs the
    runs of devices 0..EP-1 in that order from row 0; a run that does not fit is cut at the
    buffer's end and every later device's run to j is cut to nothing, so all devices agree on
    what is kept without further communication. Returns a dict of int32 arrays:
      send_starts [EP]  where my run for device j starts in my expert-sorted rows
      send_sizes  [EP]  rows of that run that j accepts
      out_offsets [EP]  where my run lands in j's buffer
      recv_starts [EP]  where device i's run starts in my buffer
      recv_sizes  [EP]  rows I receive from device i
      back_offsets [EP] where device i's run started in i's sorted rows (for the return)
      recv_expert [buffer_rows] local expert of each buffer row (E/EP = empty)
      local_position [buffer_rows] where each buffer row goes when the rows are sorted by
                   local expert (stable: by source device, then as sent), empties last
      local_group_sizes [E/EP] rows per local expert.
    Each sender's run is sorted by expert, so a row's place in the local-expert order is
    arithmetic on the counts: no sort of the buffer."""
    ep, e = counts.shape
    e_local = e // ep
    by_expert = counts.reshape(ep, ep, e_local)
    sent = by_expert.sum(-1)  # sent[i, j] rows device i routes to device j
    starts_in_sender = jnp.cumsum(sent, axis=1) - sent  # [i, j]
    starts_in_receiver = jnp.cumsum(sent, axis=0) - sent  # [i, j]
    accepted = jnp.clip(buffer_rows - starts_in_receiver, 0, sent)
    recv_starts, recv_sizes = starts_in_receiver[:, me], accepted[:, me]
    # local expert of buffer row r: find its source block i, then its run inside i's block
    r = jnp.arange(buffer_rows, dtype=jnp.int32)
    # EP sorted ends: compare all (no binary-search loop to compile for every row)
    block = jnp.clip(jnp.searchsorted(recv_starts + recv_sizes, r, side="right",
                                      method="compare_all"), 0, ep - 1)
    inside = r - recv_starts[block]
    run_ends = jnp.cumsum(by_expert[:, me, :], axis=1)  # [i, e_local]
    expert = jnp.sum(inside[:, None] >= run_ends[block], axis=1).astype(jnp.int32)
    total = jnp.sum(recv_sizes)
    real = r < total
    # rows of source i's run for local expert e that fit the buffer (a cut run keeps a
    # prefix, which covers the first experts' runs)
    run_starts = run_ends - by_expert[:, me, :]  # [i, e_local], inside i's run
    kept = jnp.clip(recv_sizes[:, None] - run_starts, 0, by_expert[:, me, :])
    group_sizes = kept.sum(0)
    group_starts = jnp.cumsum(group_sizes) - group_sizes  # [e_local]
    before = jnp.cumsum(kept, axis=0) - kept  # [i, e_local]: rows of e from sources < i
    e = jnp.minimum(expert, e_local - 1)
    position = (group_starts[e] + before[block, e] + inside - run_starts[block, e])
    return {"send_starts": starts_in_sender[me], "send_sizes": accepted[me],
            "out_offsets": starts_in_receiver[me], "recv_starts": recv_starts,
            "recv_sizes": recv_sizes, "back_offsets": starts_in_sender[:, me],
            "recv_expert": jnp.where(real, expert, e_local),
            "local_position": jnp.where(real, position, r).astype(jnp.int32),
            "local_group_sizes": group_sizes.astype(jnp.int32)}


def _ragged_exchange(rows, counts_local, *, ep, buffer_rows):
    """Dispatch with `ragged_all_to_all`: only real rows move, packed from row 0 of each
    receive buffer. Group sizes are exchanged first (one all_gather of the [E] counts)."""
    counts = jax.lax.all_gather(counts_local, "expert")  # [EP, E]
    layout = ragged_layout(counts, jax.lax.axis_index("expert"), buffer_rows)
    recv = jax.lax.ragged_all_to_all(
        rows, jnp.zeros((buffer_rows, rows.shape[1]), rows.dtype), layout["send_starts"],
        layout["send_sizes"], layout["out_offsets"], layout["recv_sizes"], axis_name="expert")
    return recv, layout


def _ragged_return(y_recv, layout, num_rows):
    """Combine: device i's block of my buffer goes back to the rows it was sent from."""
    return jax.lax.ragged_all_to_all(
        y_recv, jnp.zeros((num_rows, y_recv.shape[1]), y_recv.dtype), layout["recv_starts"],
        layout["recv_sizes"], layout["back_offsets"], layout["send_sizes"], axis_name="expert")
