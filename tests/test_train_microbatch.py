"""Gradient accumulation (make_trainer's micro_batches): a step over M micro-batches is the
full-batch step (same loss, gradients, counts), in the loop and on a sharded mesh."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from glm_jax.train import data, loop
from glm_jax.train.trainer import make_trainer, split_microbatches
from sharding.mesh import make_mesh
from train_config import small_config


def test_split_takes_every_mth_row():
    x = jnp.arange(12).reshape(6, 2)
    got = split_microbatches(x, 3)
    np.testing.assert_array_equal(got[1], x[1::3])
    with pytest.raises(ValueError, match="does not split into 4"):
        split_microbatches(x, 4)


@pytest.mark.parametrize("micro_batches", [2, 4])
def test_microbatch_step_equals_the_full_batch_step(micro_batches):
    """SGD with lr 1 makes the parameter change the gradient itself. Packed rows put
    documents of different lengths (so different valid-target counts) in each micro-batch:
    only normalizing by the whole batch's counts gives the full-batch loss and gradient."""
    cfg = small_config(**{"train.mtp_loss_weight": 0.3, "train.z_loss_weight": 1e-3,
                          "train.bias_update_rate": 1e-3})
    mesh = make_mesh({"data": 1}, jax.devices()[:1])
    tx = optax.sgd(1.0)
    full = make_trainer(cfg, mesh, tx=tx, micro_batches=1)
    micro = make_trainer(cfg, mesh, tx=tx, micro_batches=micro_batches)
    rows = data.PackedRows(data.stdlib_corpus(50_000), 32)
    tokens = np.stack([rows[i]["tokens"] for i in range(8)])
    # Documents of different lengths and padding (segment 0) at some row ends, so that the
    # micro-batches hold different numbers of valid targets.
    rng = np.random.default_rng(0)
    seg = np.zeros_like(tokens)
    pos = np.zeros_like(tokens)
    for i in range(8):
        cuts = np.sort(rng.choice(np.arange(1, 28), size=i % 3 + 1, replace=False))
        ids = np.searchsorted(cuts, np.arange(32), side="right") + 1
        ids[32 - 4 * (i % 4):] = 0
        seg[i] = ids
        starts = np.r_[0, cuts]
        pos[i] = np.arange(32) - starts[ids - 1]
    batch = {"tokens": jnp.asarray(tokens), "segment_ids": jnp.asarray(seg),
             "positions": jnp.asarray(pos)}

    want_state, want = jax.device_get(full.step(full.init(), batch))
    got_state, got = jax.device_get(micro.step(micro.init(), batch))
    assert set(got) == set(want)
    for key in ("loss", "ce", "mtp_loss", "z_loss", "valid_tokens", "grad_norm"):
        np.testing.assert_allclose(got[key], want[key], rtol=1e-5, err_msg=key)
    np.testing.assert_array_equal(got["expert_counts"], want["expert_counts"])
    assert bool(got["finite"]) and int(got["dropped"]) == int(want["dropped"])
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7),
                 got_state.params, want_state.params)
    jax.tree.map(np.testing.assert_array_equal, got_state.biases, want_state.biases)


def test_loop_with_micro_batches_on_a_mesh_matches_one_batch(tmp_path):
    """The loop's step with train.micro_batches=2 on fsdp=2,expert=4 trains exactly like the
    one-batch step; a micro-batch count that does not divide a shard's rows fails early."""
    changes = {"train.steps": 3, "checkpoint.every": 0, "model.n_routed_experts": 8,
               "train.batch_size": 16, "train.mesh": "fsdp=2,expert=4"}
    two = loop.run(small_config(**changes, **{"train.micro_batches": 2}), str(tmp_path / "m2"),
                   progress=False)
    one = loop.run(small_config(**changes), str(tmp_path / "m1"), progress=False)
    np.testing.assert_allclose(list(two["losses"].values()), list(one["losses"].values()),
                               rtol=1e-5)
    with pytest.raises(ValueError, match="micro_batches=3: must divide the 2 rows"):
        loop.run(small_config(**changes, **{"train.micro_batches": 3}), str(tmp_path / "m3"),
                 progress=False)
