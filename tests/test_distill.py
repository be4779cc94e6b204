"""Distillation loss: zero loss and zero gradient toward a teacher equal to the student;
toward a different teacher the KL falls as the student trains (small model, optax)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from glm_jax.config import GlmConfig
from glm_jax.model.transformer import GlmForCausalLM
from glm_jax.sft.distill import distillation_loss, token_kl
from train_config import small_config


def _model(seed: int) -> GlmForCausalLM:
    """Random weights drawn in numpy (initialising in JAX costs seconds of compile)."""
    cfg = GlmConfig.from_dict({**small_config().model.to_dict(), "moe_backend": "dense",
                               "num_nextn_predict_layers": 0})  # the loss reads the main head
    graphdef, state = nnx.split(nnx.eval_shape(lambda: GlmForCausalLM(cfg, rngs=nnx.Rngs(0))))
    rng = np.random.default_rng(seed)
    return nnx.merge(graphdef, jax.tree.map(
        lambda x: jnp.asarray(0.1 * rng.standard_normal(x.shape), x.dtype), state))


def test_token_kl_matches_a_direct_computation():
    rng = np.random.default_rng(0)
    s, t = rng.normal(size=(2, 3, 5)), rng.normal(size=(2, 3, 5))
    ps = np.exp(s / 2) / np.exp(s / 2).sum(-1, keepdims=True)
    pt = np.exp(t / 2) / np.exp(t / 2).sum(-1, keepdims=True)
    expected = (pt * (np.log(pt) - np.log(ps))).sum(-1) * 4
    np.testing.assert_allclose(token_kl(jnp.asarray(s), jnp.asarray(t), temperature=2.0),
                               expected, rtol=1e-5)


def test_distillation_toward_itself_is_zero_and_toward_a_teacher_falls():
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, 256, (2, 24)), jnp.int32)
    weights = jnp.ones((2, 24)).at[:, :5].set(0.0)  # a prompt part that is not distilled
    student, teacher = _model(0), _model(1)
    logits_of = nnx.jit(lambda m: m(tokens).logits)
    opt = optax.adam(1e-2)

    @nnx.jit
    def step(model, opt_state, teacher_logits):
        def f(m):
            return distillation_loss(m(tokens).logits, [(teacher_logits, weights)])[0]
        value, grads = nnx.value_and_grad(f)(model)
        params = nnx.state(model, nnx.Param)
        updates, opt_state = opt.update(grads, opt_state, params)
        nnx.update(model, optax.apply_updates(params, updates))
        max_grad = jnp.max(jnp.stack([jnp.abs(g).max() for g in jax.tree.leaves(grads)]))
        return value, max_grad, opt_state

    opt_state = opt.init(nnx.state(student, nnx.Param))
    zero, max_grad, opt_state = step(student, opt_state, logits_of(student))
    assert abs(float(zero)) < 1e-6 and float(max_grad) < 1e-6

    target = logits_of(teacher)
    losses = []
    for _ in range(15):
        value, _, opt_state = step(student, opt_state, target)
        losses.append(float(value))
    assert losses[-1] < 0.5 * losses[0], losses
