"""The RL objective against numpy references on hand-made groups."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from glm_jax.rl import objective
from glm_jax.rl.objective import AdaptiveClip, ClipRange

REWARDS = np.array([[1.0, 0.0, 0.0, 1.0],   # half right
                    [0.0, 0.0, 0.0, 0.0],   # all wrong: no signal
                    [1.0, 1.0, 1.0, 0.0],   # mostly right
                    [0.7, 0.7, 0.7, 0.7]],  # all equal: no signal
                   np.float32)


def test_group_advantages_match_numpy():
    r = REWARDS.astype(np.float64)
    centered = r - r.mean(axis=1, keepdims=True)
    grpo = centered / (r.std(axis=1, ddof=1, keepdims=True) + 1e-6)
    np.testing.assert_allclose(objective.group_advantages(jnp.asarray(REWARDS)), grpo,
                               rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(
        objective.group_advantages(jnp.asarray(REWARDS), normalize_std=False), centered,
        atol=1e-7)
    # Hand values: group [1, 0, 0, 1] has mean 0.5 and sample std 1/sqrt(3).
    np.testing.assert_allclose(grpo[0], np.array([1, -1, -1, 1]) * 0.5 * np.sqrt(3), rtol=1e-5)
    assert np.all(grpo[[1, 3]] == 0)
    with pytest.raises(ValueError, match="samples >= 2"):
        objective.group_advantages(jnp.ones((3, 1)))


def test_all_equal_groups_are_filtered():
    keep = objective.dynamic_sampling_keep(jnp.asarray(REWARDS))
    assert keep.tolist() == [True, False, True, False]
    assert int(REWARDS.shape[0] - keep.sum()) == 2
    mask = jnp.ones((16, 3)) * jnp.repeat(keep, 4)[:, None]
    weights = objective.token_loss_weights(mask)
    assert float(weights[4:8].sum()) == 0 and float(weights[12:].sum()) == 0
    np.testing.assert_allclose(float(weights.sum()), 1.0, rtol=1e-6)


def test_token_loss_weights():
    mask = np.array([[1, 1, 1, 1], [1, 0, 0, 0], [0, 0, 0, 0]], np.float32)
    np.testing.assert_allclose(objective.token_loss_weights(jnp.asarray(mask)), mask / 5)
    seq = np.array([[0.125] * 4, [0.5, 0, 0, 0], [0] * 4])  # 2 rows with tokens
    np.testing.assert_allclose(objective.token_loss_weights(jnp.asarray(mask), "sequence"), seq)
    assert float(objective.token_loss_weights(jnp.zeros((2, 3))).sum()) == 0
    with pytest.raises(ValueError, match="'token' or 'sequence'"):
        objective.token_loss_weights(jnp.asarray(mask), "batch")


# One row per case, ratio r = exp(logprobs - old); eps_low 0.2, eps_high 0.28.
EPS_LOW, EPS_HIGH = 0.2, 0.28
ADV = np.array([1.5, 1.5, -0.8, -0.8, 1.5, -0.8], np.float32)
RATIO = np.array([
    [1.05, 1.40, 0.90, 1.20, 2.00],   # A > 0: token 1 and 4 clipped high
    [0.50, 0.95, 1.10, 1.27, 0.70],   # A > 0, r < 1 - eps_low: NOT clipped
    [0.50, 0.95, 0.79, 1.10, 0.60],   # A < 0: tokens 0, 2, 4 clipped low
    [1.50, 2.50, 1.00, 0.85, 1.30],   # A < 0, r > 1 + eps_high: NOT clipped
    [3.00, 0.10, 1.00, 1.00, 1.00],   # masked out: wild ratios, no effect
    [1.02, 0.98, 0.75, 1.29, 0.30],   # token 2 clipped low; token 4 is padding
], np.float32)
MASK = np.array([[1, 1, 1, 1, 1], [1, 1, 1, 1, 1], [1, 1, 1, 1, 1], [1, 1, 1, 1, 0],
                 [0, 0, 0, 0, 0], [1, 1, 1, 1, 0]], np.float32)


def _inputs(seed=0):
    rng = np.random.default_rng(seed)
    old = rng.uniform(-3.0, -0.2, RATIO.shape).astype(np.float32)
    logprobs = (old + np.log(RATIO)).astype(np.float32)
    rollout = (old + rng.normal(0, 0.3, RATIO.shape)).astype(np.float32)
    ref = (old + rng.normal(0, 0.2, RATIO.shape)).astype(np.float32)
    return logprobs, old, rollout, ref


def _numpy_loss(logprobs, old, rollout, ref, w, tis_cap=None, kl_coef=0.0):
    """The surrogate by cases, in float64, and its gradient w.r.t. logprobs."""
    lp, old, rollout, ref = (x.astype(np.float64) for x in (logprobs, old, rollout, ref))
    r = np.exp(lp - old)
    a = np.broadcast_to(ADV[:, None].astype(np.float64), r.shape)
    clipped = np.where(a > 0, r > 1 + EPS_HIGH, r < 1 - EPS_LOW) & (a != 0)
    surrogate = np.where(a > 0, a * np.minimum(r, 1 + EPS_HIGH), a * np.maximum(r, 1 - EPS_LOW))
    tis = np.minimum(np.exp(old - rollout), tis_cap) if tis_cap else np.ones_like(r)
    q = ref - lp
    per_token = -surrogate * tis + kl_coef * (np.exp(q) - q - 1)
    grad = w * (np.where(clipped, 0.0, -a * r) * tis + kl_coef * (1 - np.exp(q)))
    return (w * per_token).sum(), grad, clipped


@pytest.mark.parametrize("tis_cap,kl_coef", [(None, 0.0), (1.5, 0.0), (1.2, 0.1)])
def test_surrogate_and_gradient_match_numpy(tis_cap, kl_coef):
    logprobs, old, rollout, ref = _inputs()
    w = np.asarray(objective.token_loss_weights(jnp.asarray(MASK)))

    def loss(lp):
        return objective.policy_gradient_loss(
            lp, jnp.asarray(old), jnp.asarray(ADV), jnp.asarray(w), eps_low=EPS_LOW,
            eps_high=EPS_HIGH, rollout_logprobs=jnp.asarray(rollout), tis_cap=tis_cap,
            ref_logprobs=jnp.asarray(ref), kl_coef=kl_coef)

    (value, metrics), grad = jax.jit(jax.value_and_grad(loss, has_aux=True))(
        jnp.asarray(logprobs))
    want, want_grad, clipped = _numpy_loss(logprobs, old, rollout, ref, w, tis_cap, kl_coef)
    np.testing.assert_allclose(float(value), want, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(np.asarray(grad), want_grad, rtol=1e-5, atol=1e-7)
    # Masked tokens get no gradient, nor do clipped ones but through the KL term; the cases
    # above hit both sides.
    assert np.all(np.asarray(grad)[(clipped if kl_coef == 0 else False) | (MASK == 0)] == 0)
    low = clipped & (ADV[:, None] < 0)
    high = clipped & (ADV[:, None] > 0)
    assert (low * MASK).sum() == 4 and (high * MASK).sum() == 2
    np.testing.assert_allclose(float(metrics["clip_frac_low"]), (w * low).sum(), rtol=1e-6)
    np.testing.assert_allclose(float(metrics["clip_frac_high"]), (w * high).sum(), rtol=1e-6)
    r = RATIO.astype(np.float64)
    np.testing.assert_allclose(float(metrics["approx_kl"]), (w * (r - 1 - np.log(r))).sum(),
                               rtol=1e-5)
    assert ("tis_weight" in metrics) == (tis_cap is not None)
    assert ("kl_ref" in metrics) == (kl_coef > 0)


def test_loss_adds_up_over_micro_batches():
    logprobs, old, rollout, _ = _inputs(1)
    w = objective.token_loss_weights(jnp.asarray(MASK))
    args = dict(eps_low=EPS_LOW, eps_high=EPS_HIGH, tis_cap=2.0)
    loss = jax.jit(lambda *a: objective.policy_gradient_loss(*a[:4], rollout_logprobs=a[4],
                                                             **args))
    whole, m = loss(logprobs, old, ADV, w, rollout)
    parts = [loss(logprobs[s], old[s], ADV[s], w[s], rollout[s])
             for s in (slice(0, 2), slice(2, 6))]
    np.testing.assert_allclose(float(whole), sum(float(p[0]) for p in parts), rtol=1e-6)
    for k in m:
        np.testing.assert_allclose(float(m[k]), sum(float(p[1][k]) for p in parts), rtol=1e-5)


def test_truncated_is_weights():
    old = jnp.log(jnp.array([[0.5, 0.2, 0.9]]))
    rollout = jnp.log(jnp.array([[0.25, 0.4, 0.3]]))
    w = objective.truncated_is_weights(old, rollout, cap=2.5)
    np.testing.assert_allclose(w, [[2.0, 0.5, 2.5]], rtol=1e-6)  # 3.0 truncated to C
    g = jax.grad(lambda o: objective.truncated_is_weights(o, rollout, 2.5).sum())(old)
    assert np.all(np.asarray(g) == 0)


def test_entropy_is_reported_and_k3_is_zero_on_policy():
    lp = jnp.log(jnp.full((2, 3), 0.3))
    w = objective.token_loss_weights(jnp.ones((2, 3)))
    loss, m = objective.policy_gradient_loss(lp, lp, jnp.zeros(2), w, ref_logprobs=lp,
                                             kl_coef=0.5, entropy=jnp.full((2, 3), 1.7))
    assert float(loss) == 0 and float(m["kl_ref"]) == 0 and float(m["approx_kl"]) == 0
    np.testing.assert_allclose(float(m["entropy"]), 1.7, rtol=1e-6)


def test_adaptive_clip_moves_eps_the_right_way_and_stays_bounded():
    ctl = AdaptiveClip(band_low=0.01, band_high=0.05, factor=1.1, eps_min=0.1, eps_max=0.4)
    clip = ctl.init(0.2, 0.28)
    up = ctl.update(clip, clip_frac_low=0.2, clip_frac_high=0.2)     # too many clipped
    assert float(up.eps_low) == pytest.approx(0.22) and float(up.eps_high) == pytest.approx(0.308)
    down = ctl.update(clip, 0.0, 0.001)                               # range hardly binds
    assert float(down.eps_low) == pytest.approx(0.2 / 1.1)
    assert float(down.eps_high) == pytest.approx(0.28 / 1.1)
    mixed = ctl.update(clip, 0.03, 0.5)                               # low side in the band
    assert float(mixed.eps_low) == pytest.approx(0.2) and float(mixed.eps_high) > 0.28
    step = jax.jit(ctl.update)
    for _ in range(50):
        clip = step(clip, 1.0, 0.0)
    assert float(clip.eps_low) == pytest.approx(0.4) and float(clip.eps_high) == pytest.approx(0.1)
    assert ClipRange.from_dict(clip.to_dict()) == clip
    with pytest.raises(ValueError, match="band_low < band_high"):
        AdaptiveClip(band_low=0.1, band_high=0.05)
