"""The training loop's own compiled step on a sharded mesh (8 simulated CPU devices):
optimizer state sharded like the parameters, tokens exchanged by all-to-all, the expert
weights never all-gathered, and no involuntary full rematerialization anywhere in the step."""

from __future__ import annotations

import re

import jax
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding

from glm_jax.train import loop
from glm_jax.train.trainer import make_trainer
from sharding.mesh import make_mesh, parse_mesh, resolve_axes
from sharding.rules import partition_spec
from train_config import small_config

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (simulated) devices")

# Expert weights [layers, E, H, F] = [1, 8, 32, 24]: sizes no activation of the small
# config has, so an all-gather of this shape can only be a gathered expert weight.
E, H, F = 8, 32, 24


@pytest.mark.parametrize("spec", ["expert=8", "fsdp=2,expert=4"])
def test_loop_step_exchanges_tokens_and_keeps_expert_weights_local(spec, capfd):
    cfg = small_config(**{"train.mesh": spec, "model.n_routed_experts": E,
                          "model.hidden_size": H, "model.moe_intermediate_size": F})
    model_cfg = loop.validate(cfg)
    mesh = make_mesh(resolve_axes(parse_mesh(spec), jax.device_count()))
    trainer = make_trainer(cfg, mesh)
    state = trainer.init()
    # AdamW's moments live where their parameter lives (not replicated on every device).
    same = optax.tree_map_params(trainer.tx, lambda m, p: m.sharding == p.sharding,
                                 state.opt_state, state.params,
                                 transform_non_params=lambda _: True)
    assert all(jax.tree.leaves(same))
    t = cfg.train
    tokens = np.arange(t.batch_size * t.seq_len, dtype=np.int32).reshape(
        t.batch_size, t.seq_len) % model_cfg.vocab_size
    sharding = NamedSharding(mesh, partition_spec(("batch", "seq"), mesh))
    batch = {"tokens": tokens, "segment_ids": np.ones_like(tokens),
             "positions": np.broadcast_to(np.arange(t.seq_len, dtype=np.int32), tokens.shape)}
    batch = {k: jax.device_put(v, sharding) for k, v in batch.items()}

    capfd.readouterr()
    hlo = trainer.lower(batch).compile().as_text()
    log = capfd.readouterr().err
    assert "Involuntary full rematerialization" not in log, log[:2000]

    assert re.search(r"\sall-to-all(-start)?\(", hlo), "no all-to-all in the loop's step"
    # With fsdp > 1 an all-gather over `fsdp` of the local experts' `embed` dimension is
    # expected ([1, E/4, H, F]); a result holding all E experts is a gathered expert weight.
    gathered = [line for line in hlo.splitlines()
                if re.search(r"\sall-gather(-start)?\(", line)
                and re.search(rf"\[(\d+,)?{E},({H},{F}|{F},{H})\]", line.split("all-gather")[0])]
    assert not gathered, gathered[:3]

    state, metrics = trainer.step(state, batch)  # the same program runs
    assert bool(metrics["finite"]) and int(metrics["dropped"]) == 0
