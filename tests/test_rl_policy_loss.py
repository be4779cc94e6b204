"""PolicyGradientLoss, the RL objective in the training core's loss protocol: per-token
log-probs from logits, whole-batch weights, micro-batch additivity, and (once the training
core is in) one trainer step whose gradient is jax.grad of the loss written directly."""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from glm_jax.rl import objective
from glm_jax.rl.policy_loss import PolicyGradientLoss, token_logprobs

B, T, V = 8, 32, 256


def _batch(seed=0, vocab=V):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, vocab, (B, T)).astype(np.int32)
    prompt = rng.integers(4, 12, (B, 1))
    length = rng.integers(8, T - 12, (B, 1))
    pos = np.arange(T)[None, :]
    loss_mask = ((pos >= prompt) & (pos < prompt + length)).astype(np.int32)
    loss_mask[2:4] = 0  # a group the dynamic-sampling filter dropped
    rewards = np.array([[1, 0, 0, 1], [1, 1, 0, 1]], np.float32)
    adv = np.asarray(objective.group_advantages(jnp.asarray(rewards))).reshape(B)
    return {"tokens": jnp.asarray(tokens), "loss_mask": jnp.asarray(loss_mask),
            "advantages": jnp.asarray(adv),
            "segment_ids": jnp.ones((B, T), jnp.int32),
            "positions": jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))}


def _with_logprobs(batch, current, seed=1):
    """old/rollout log-probs near the current policy's, so some ratios leave the clip range."""
    rng = np.random.default_rng(seed)
    shift = rng.normal(0, 0.3, current.shape).astype(np.float32)
    return dict(batch, old_logprobs=current + shift,
                rollout_logprobs=current + shift + rng.normal(0, 0.2, current.shape))


def test_token_logprobs_match_numpy():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 5, 7)).astype(np.float32)
    tokens = rng.integers(0, 7, (2, 5))
    lp, ent = token_logprobs(jnp.asarray(logits), jnp.asarray(tokens))
    x = logits.astype(np.float64)
    logp = x - np.log(np.exp(x).sum(-1, keepdims=True))
    want = np.zeros((2, 5))
    want[:, 1:] = np.take_along_axis(logp[:, :-1], tokens[:, 1:, None], -1)[..., 0]
    np.testing.assert_allclose(lp, want, rtol=1e-5, atol=1e-6)
    want_ent = np.zeros((2, 5))
    want_ent[:, 1:] = -(np.exp(logp) * logp).sum(-1)[:, :-1]
    np.testing.assert_allclose(ent, want_ent, rtol=1e-5, atol=1e-6)


def test_row_temperature_divides_the_logits():
    """The rollout samples row b from softmax(logits / T_b): the loss's log-probs (and so its
    ratio) must be of that distribution, row by row."""
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(3, 6, 11)).astype(np.float32)
    tokens = rng.integers(0, 11, (3, 6))
    temperature = np.array([1.0, 0.5, 1.3], np.float32)
    lp, _ = token_logprobs(jnp.asarray(logits), jnp.asarray(tokens), jnp.asarray(temperature))
    for b in range(3):
        want, _ = token_logprobs(jnp.asarray(logits[b:b + 1] / temperature[b]),
                                 jnp.asarray(tokens[b:b + 1]))
        np.testing.assert_allclose(lp[b], want[0], rtol=1e-5, atol=1e-6)
    assert not np.allclose(lp[1], token_logprobs(jnp.asarray(logits), jnp.asarray(tokens))[0][1])
    # Through the loss: with old_logprobs = the tempered log-probs every ratio is 1.
    batch = {"tokens": jnp.asarray(tokens), "loss_mask": jnp.ones((3, 6), jnp.int32),
             "advantages": jnp.asarray([1.0, -1.0, 0.5]), "old_logprobs": lp,
             "temperature": jnp.asarray(temperature)}
    loss_fn = PolicyGradientLoss()
    _, metrics = loss_fn(types.SimpleNamespace(logits=jnp.asarray(logits)),
                         loss_fn.prepare(batch))
    np.testing.assert_allclose(metrics["ratio"], 1.0, rtol=1e-6)
    np.testing.assert_allclose(metrics["approx_kl"], 0.0, atol=1e-6)


def test_loss_equals_the_objective_and_adds_up_over_micro_batches():
    logits = jnp.asarray(np.random.default_rng(2).normal(size=(B, T, V)).astype(np.float32))
    batch = _batch()
    current, entropy = token_logprobs(logits, batch["tokens"])
    batch = _with_logprobs(batch, current)
    # This step's clip range, per row (as the adaptive controller would set it).
    batch["eps_low"], batch["eps_high"] = jnp.full((B,), 0.1), jnp.full((B,), 0.15)
    loss_fn = PolicyGradientLoss(tis_cap=2.0)
    prepared = loss_fn.prepare(batch)
    # The loss reads only `logits` of the model's output.
    run = jax.jit(lambda logits, b: loss_fn(types.SimpleNamespace(logits=logits), b))
    loss, metrics = run(logits, prepared)
    want, want_m = objective.policy_gradient_loss(
        current, batch["old_logprobs"], batch["advantages"],
        objective.token_loss_weights(batch["loss_mask"]), eps_low=0.1, eps_high=0.15,
        rollout_logprobs=batch["rollout_logprobs"], tis_cap=2.0, entropy=entropy)
    np.testing.assert_allclose(loss, want, rtol=1e-5)
    for k in want_m:
        np.testing.assert_allclose(metrics[k], want_m[k], rtol=1e-5, err_msg=k)
    assert float(metrics["clip_frac_low"]) > 0 and float(metrics["clip_frac_high"]) > 0
    # The trainer's micro-batch m holds rows m, m + M, ...: the parts add up to the whole.
    parts = [run(logits[m::2], {k: v[m::2] for k, v in prepared.items()}) for m in range(2)]
    np.testing.assert_allclose(sum(p[0] for p in parts), loss, rtol=1e-5)
    np.testing.assert_allclose(sum(p[1]["entropy"] for p in parts), metrics["entropy"],
                               rtol=1e-5)


def test_missing_batch_field_is_named():
    batch = _batch()
    with pytest.raises(KeyError, match="batch\\['old_logprobs'\\]"):
        PolicyGradientLoss().prepare(batch)


def test_one_trainer_step_is_a_gradient_step_on_the_loss():
    trainer_mod = pytest.importorskip("glm_jax.train.trainer",
                                      reason="the training core (issue 14) is not merged yet")
    import optax
    from flax import nnx

    from sharding.mesh import make_mesh
    from train_config import small_config

    # No MTP layer (the policy loss reads the main head only): one block less to compile.
    cfg = small_config(**{"model.num_nextn_predict_layers": 0})
    loss_fn = PolicyGradientLoss(eps_low=0.2, eps_high=0.28, tis_cap=2.0, kl_coef=0.05)
    # SGD with learning rate 1: the parameter change is minus the gradient.
    trainer = trainer_mod.make_trainer(cfg, make_mesh({"data": 1}, jax.devices()[:1]),
                                       loss_fn, tx=optax.sgd(1.0), micro_batches=2)
    state = trainer.init()
    before = jax.device_get(state)
    batch = _batch(vocab=cfg.model.vocab_size)

    def direct(params, biases, old, rollout, ref):  # the objective on the model, no trainer
        out = nnx.merge(trainer.graphdef, params, biases, copy=True)(
            batch["tokens"], positions=batch["positions"], segment_ids=batch["segment_ids"])
        lp, _ = token_logprobs(out.logits, batch["tokens"])
        weights = objective.token_loss_weights(batch["loss_mask"].at[:, 0].set(0))
        loss, _ = objective.policy_gradient_loss(
            lp, old, batch["advantages"], weights, rollout_logprobs=rollout, tis_cap=2.0,
            ref_logprobs=ref, kl_coef=0.05)
        return loss, lp

    # One compiled function: its first call gives the current policy's log-probs, around
    # which the old ones are drawn; its second the loss and gradient to compare.
    direct = jax.jit(jax.value_and_grad(direct, has_aux=True))
    zeros = jnp.zeros((B, T), jnp.float32)
    (_, current), _ = direct(before.params, before.biases, zeros, zeros, zeros)
    batch = _with_logprobs(batch, current)
    batch["ref_logprobs"] = batch["old_logprobs"] - 0.1
    (want_loss, _), want_grads = direct(before.params, before.biases, batch["old_logprobs"],
                                        batch["rollout_logprobs"], batch["ref_logprobs"])
    new, metrics = jax.device_get(trainer.step(state, batch))
    np.testing.assert_allclose(metrics["loss"], want_loss, rtol=1e-5)
    assert int(new.skipped) == 0 and float(metrics["clip_frac_high"]) > 0
    jax.tree.map(lambda b, a, g: np.testing.assert_allclose(b - a, g, rtol=1e-3, atol=1e-7),
                 before.params, new.params, want_grads)
