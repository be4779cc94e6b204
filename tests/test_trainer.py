"""make_trainer with a loss of one's own: a masked next-token loss (SFT-style, the README's
example) trains through the trainer, and the step's gradients are jax.grad of the same loss
written directly on the model, in one part and in micro-batches."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from glm_jax.train.trainer import TrainState, make_trainer
from sharding.mesh import make_mesh
from train_config import small_config


class MaskedNextToken:
    """Mean next-token NLL over the tokens marked in batch['loss_mask'] (e.g. responses)."""

    def prepare(self, batch):  # the whole batch, before micro-batches split it
        mask = batch["loss_mask"][:, 1:].astype(jnp.float32)
        return dict(batch, weights=mask / mask.sum())

    def __call__(self, out, batch):
        logp = jax.nn.log_softmax(out.logits[:, :-1].astype(jnp.float32))
        nll = -jnp.take_along_axis(logp, batch["tokens"][:, 1:, None], axis=-1)[..., 0]
        loss = (nll * batch["weights"]).sum()
        return loss, {"nll": loss}


def direct_loss(logits, tokens, loss_mask):
    """The same loss, written without the trainer's conventions."""
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32))
    nll = -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
    mask = loss_mask[:, 1:]
    return (nll * mask).sum() / mask.sum()


@pytest.fixture(scope="module")
def batch():
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 256, (8, 32)).astype(np.int32)
    # A "prompt" of random length per row is not trained on, as in SFT.
    loss_mask = (np.arange(32)[None, :] >= rng.integers(4, 28, (8, 1))).astype(np.int32)
    return {"tokens": jnp.asarray(tokens), "loss_mask": jnp.asarray(loss_mask),
            "segment_ids": jnp.ones_like(jnp.asarray(tokens)),
            "positions": jnp.broadcast_to(jnp.arange(32, dtype=jnp.int32), (8, 32))}


@pytest.mark.parametrize("micro_batches", [1, 2])
def test_custom_loss_gradients_equal_jax_grad_of_the_loss(batch, micro_batches):
    cfg = small_config()
    # SGD with learning rate 1: the parameter change is minus the gradient.
    trainer = make_trainer(cfg, make_mesh({"data": 1}, jax.devices()[:1]), MaskedNextToken(),
                           tx=optax.sgd(1.0), micro_batches=micro_batches)
    state = trainer.init()
    assert isinstance(state, TrainState)
    before = jax.device_get(state)

    def loss_of(params, biases):  # biases as an argument: nnx refuses closed-over Variables
        out = nnx.merge(trainer.graphdef, params, biases, copy=True)(
            batch["tokens"], positions=batch["positions"], segment_ids=batch["segment_ids"])
        return direct_loss(out.logits, batch["tokens"], batch["loss_mask"])

    # Jitted: run op by op, the reference forward + backward alone took ~15 s.
    want_loss, want_grads = jax.jit(jax.value_and_grad(loss_of))(before.params, before.biases)
    new, metrics = jax.device_get(trainer.step(state, batch))
    np.testing.assert_allclose(metrics["loss"], want_loss, rtol=1e-5)
    np.testing.assert_allclose(metrics["nll"], want_loss, rtol=1e-5)
    assert int(new.step) == 1 and int(new.skipped) == 0
    jax.tree.map(lambda b, a, g: np.testing.assert_allclose(b - a, g, rtol=1e-3, atol=1e-7),
                 before.params, new.params, want_grads)
