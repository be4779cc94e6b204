"""The RL objective as pure JAX functions: group-relative advantages, the clipped policy-
gradient surrogate, KL to a reference, truncated importance sampling, dynamic-sampling
filtering and an adaptive clip range.

Shapes: P prompts (groups), G samples per prompt, B = P * G rows (a group's samples are
consecutive rows), T tokens per row. Log-probabilities are natural-log, float32.

How the pieces fit one update:

    adv = group_advantages(rewards)                    # [P, G]
    keep = dynamic_sampling_keep(rewards)              # [P]: groups that carry signal
    mask = loss_mask * jnp.repeat(keep, G)[:, None]    # [B, T]
    weights = token_loss_weights(mask)                 # over the WHOLE batch, sums to 1
    loss, metrics = policy_gradient_loss(logprobs, old_logprobs, adv.reshape(B), weights,
                                         eps_low=..., eps_high=...)

The loss and every metric are weighted sums over tokens with weights normalized over the
whole batch, so the loss of a batch equals the sum of the losses of any split of its rows
into micro-batches (with their slices of the same weights): this is the form a trainer that
accumulates gradients over micro-batches adds up.
"""

from __future__ import annotations

import dataclasses
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp

Metrics = dict[str, jax.Array]


def group_advantages(rewards: jax.Array, *, normalize_std: bool = True,
                     eps: float = 1e-6) -> jax.Array:
    """Group-relative advantages: each sample's reward against its group's.

    rewards: [P, G] float (G >= 2 samples of one prompt per row).
    Returns [P, G] float32:
      normalize_std=True (GRPO; Shao et al. 2024, DeepSeekMath, eq. 3 / sec. 4.1.2):
        A = (r - mean_g(r)) / (std_g(r) + eps), std with Bessel's correction (ddof=1,
        torch's default, as slime and TRL compute it);
      normalize_std=False (Dr. GRPO; Liu et al. 2025, "Understanding R1-Zero-Like Training"):
        A = r - mean_g(r); dividing by the std up-weights groups that are nearly all right
        or all wrong.
    A group whose rewards are all equal gets A = 0 either way (see dynamic_sampling_keep).
    Raises ValueError if rewards is not 2-D with G >= 2.
    """
    if rewards.ndim != 2 or rewards.shape[1] < 2:
        raise ValueError(f"rewards of shape {rewards.shape}: expected [prompts, samples >= 2]")
    rewards = rewards.astype(jnp.float32)
    centered = rewards - rewards.mean(axis=1, keepdims=True)
    if not normalize_std:
        return centered
    return centered / (rewards.std(axis=1, ddof=1, keepdims=True) + eps)


def dynamic_sampling_keep(rewards: jax.Array, atol: float = 0.0) -> jax.Array:
    """Dynamic sampling (DAPO; Yu et al. 2025, sec. 3.2): a group whose rewards are all
    equal (all right or all wrong) has zero advantage everywhere and only dilutes the
    token-level normalization; it is masked out here, and the rollout over-samples prompts
    to keep the batch full.

    rewards: [P, G]. Returns keep [P] bool: max - min > atol. The number filtered is
    `P - keep.sum()`."""
    return (rewards.max(axis=1) - rewards.min(axis=1)) > atol


def token_loss_weights(loss_mask: jax.Array,
                       mode: Literal["token", "sequence"] = "token") -> jax.Array:
    """Per-token weights [B, T] float32 that sum to 1 over the batch (0 if nothing is valid).

    loss_mask: [B, T], nonzero = a generated token that is trained on.
    mode "token" (DAPO's token-level loss): every valid token weighs 1 / (valid tokens in
      the batch), so long answers are not down-weighted per token.
    mode "sequence" (the original GRPO and PPO-for-LLM mean of per-sequence means): each row
      with valid tokens weighs 1 / (such rows), spread evenly over its tokens.
    Compute it on the whole batch before any micro-batch split.
    Raises ValueError for an unknown mode."""
    mask = (loss_mask != 0).astype(jnp.float32)
    if mode == "token":
        return mask / jnp.maximum(mask.sum(), 1.0)
    if mode == "sequence":
        per_row = mask.sum(axis=1, keepdims=True)
        rows = jnp.maximum((per_row > 0).sum(), 1)
        return mask / jnp.maximum(per_row, 1.0) / rows
    raise ValueError(f"loss aggregation mode {mode!r}: use 'token' or 'sequence'")


def truncated_is_weights(old_logprobs: jax.Array, rollout_logprobs: jax.Array,
                         cap: float) -> jax.Array:
    """Truncated importance-sampling weights min(p_train / p_rollout, C) (Yao et al. 2025,
    "Your Efficient RL Framework Secretly Brings You Off-Policy RL Training"; slime's
    --use-tis / --tis-clip).

    The rollout engine samples with its own numerics (kernels, precision, MoE routing), so
    its probabilities p_rollout differ from the trainer's p_train for the same weights; the
    weight corrects the policy gradient toward the trainer's policy, truncated at C to bound
    its variance.
    old_logprobs: [B, T] the trainer's log p of the sampled tokens under the rollout weights;
    rollout_logprobs: [B, T] the rollout engine's. Returns [B, T] float32, no gradient."""
    ratio = jnp.exp(old_logprobs.astype(jnp.float32) - rollout_logprobs.astype(jnp.float32))
    return jax.lax.stop_gradient(jnp.minimum(ratio, cap))


def policy_gradient_loss(logprobs: jax.Array, old_logprobs: jax.Array, advantages: jax.Array,
                         loss_weights: jax.Array, *, eps_low: float | jax.Array = 0.2,
                         eps_high: float | jax.Array = 0.28,
                         rollout_logprobs: jax.Array | None = None, tis_cap: float | None = None,
                         ref_logprobs: jax.Array | None = None, kl_coef: float = 0.0,
                         entropy: jax.Array | None = None) -> tuple[jax.Array, Metrics]:
    """The clipped policy-gradient surrogate, to minimize.

    logprobs: [B, T] log pi_theta(token) of the policy being trained (gradients flow here).
    old_logprobs: [B, T] log pi_old(token) of the policy that generated the batch (as the
      trainer computes it; pass the rollout's when the trainer does not recompute).
    advantages: [B] (one per sequence, broadcast to its tokens) or [B, T].
    loss_weights: [B, T] from token_loss_weights (zero = not trained on).
    eps_low, eps_high: the clip range [1 - eps_low, 1 + eps_high] of the ratio; DAPO's
      "clip-higher" (Yu et al. 2025) sets eps_high > eps_low so unlikely tokens can grow.
      Python floats or traced scalars (the adaptive controller changes them between steps).
    rollout_logprobs, tis_cap: if both given, each token's term is multiplied by
      truncated_is_weights(old_logprobs, rollout_logprobs, tis_cap).
    ref_logprobs, kl_coef: if kl_coef > 0, adds kl_coef * k3 where k3 = exp(q) - q - 1,
      q = ref_logprobs - logprobs (an unbiased, non-negative estimator of KL(pi_theta ||
      pi_ref); Schulman 2020, "Approximating KL Divergence"; GRPO eq. 4). Default off.
    entropy: [B, T] optional per-token policy entropy, only reported.

    Per token (PPO; Schulman et al. 2017, eq. 7), with r = exp(logprobs - old_logprobs):
        pg = max(-A * r, -A * clip(r, 1 - eps_low, 1 + eps_high))
        loss = sum_tokens loss_weights * (tis * pg + kl_coef * k3)
    A token is clipped (no gradient) when A > 0 and r > 1 + eps_high ("high") or A < 0 and
    r < 1 - eps_low ("low").

    Returns (loss [], metrics), metrics being weighted means over the trained tokens:
      pg_loss, clip_frac_low, clip_frac_high, ratio, approx_kl (k3 estimate of
      KL(pi_old || pi_theta): r - 1 - log r), and when given: kl_ref, entropy,
      tis_weight, tis_clip_frac.
    """
    f32 = jnp.float32
    logprobs, old_logprobs = logprobs.astype(f32), old_logprobs.astype(f32)
    w = loss_weights.astype(f32)
    adv = advantages.astype(f32)
    if adv.ndim == 1:
        adv = adv[:, None]
    log_ratio = logprobs - old_logprobs
    ratio = jnp.exp(log_ratio)
    clipped_ratio = jnp.clip(ratio, 1.0 - eps_low, 1.0 + eps_high)
    pg = jnp.maximum(-adv * ratio, -adv * clipped_ratio)
    per_token = pg

    def mean(x):  # weighted mean over trained tokens (weights sum to 1 over the batch)
        return (w * x.astype(f32)).sum()

    metrics: Metrics = {
        "clip_frac_low": mean((adv < 0) & (ratio < 1.0 - eps_low)),
        "clip_frac_high": mean((adv > 0) & (ratio > 1.0 + eps_high)),
        "ratio": mean(jax.lax.stop_gradient(ratio)),
        "approx_kl": mean(jax.lax.stop_gradient(ratio - 1.0 - log_ratio)),
    }
    if rollout_logprobs is not None and tis_cap is not None:
        tis = truncated_is_weights(old_logprobs, rollout_logprobs, tis_cap)
        per_token = per_token * tis
        metrics["tis_weight"] = mean(tis)
        metrics["tis_clip_frac"] = mean(jnp.exp(old_logprobs - rollout_logprobs) > tis_cap)
    metrics["pg_loss"] = mean(per_token)
    if ref_logprobs is not None and kl_coef:
        q = ref_logprobs.astype(f32) - logprobs
        k3 = jnp.exp(q) - q - 1.0
        per_token = per_token + kl_coef * k3
        metrics["kl_ref"] = mean(jax.lax.stop_gradient(k3))
    if entropy is not None:
        metrics["entropy"] = mean(jax.lax.stop_gradient(entropy))
    return mean(per_token), metrics


class ClipRange(NamedTuple):
    """The clip range [1 - eps_low, 1 + eps_high] a step uses; a pytree of two scalars."""

    eps_low: jax.Array
    eps_high: jax.Array

    def to_dict(self) -> dict[str, float]:
        """Plain floats, for a JSON checkpoint (floats round-trip exactly through JSON)."""
        return {"eps_low": float(self.eps_low), "eps_high": float(self.eps_high)}

    @classmethod
    def from_dict(cls, d: dict[str, float]) -> ClipRange:
        return cls(jnp.float32(d["eps_low"]), jnp.float32(d["eps_high"]))


@dataclasses.dataclass(frozen=True)
class AdaptiveClip:
    """Adaptive clipping: each side's clip range follows that side's clipped-token fraction.

    Rule, applied after every step to the step's clip_frac_low / clip_frac_high:
        frac > band_high  ->  eps *= factor      (too much of the batch lost its gradient:
                                                  widen that side)
        frac < band_low   ->  eps /= factor      (the range hardly binds: tighten the trust
                                                  region)
        otherwise         ->  eps unchanged
    and eps is kept in [eps_min, eps_max]. The feedback holds the fraction of tokens the
    clip silences inside the band, while eps_max bounds how far one update may move a
    token's probability. Modeled on PPO's adaptive KL coefficient (Schulman et al. 2017,
    sec. 4), with the clip range as the controlled quantity.
    """

    band_low: float = 0.001
    band_high: float = 0.02
    factor: float = 1.05
    eps_min: float = 0.05
    eps_max: float = 0.5

    def __post_init__(self):
        if not (0 <= self.band_low < self.band_high <= 1 and self.factor > 1
                and 0 < self.eps_min <= self.eps_max < 1):
            raise ValueError(f"{self}: need 0 <= band_low < band_high <= 1, factor > 1, "
                             "0 < eps_min <= eps_max < 1")

    def init(self, eps_low: float = 0.2, eps_high: float = 0.28) -> ClipRange:
        return ClipRange(jnp.float32(eps_low), jnp.float32(eps_high))

    def update(self, clip: ClipRange, clip_frac_low: jax.Array,
               clip_frac_high: jax.Array) -> ClipRange:
        """The next step's range (pure; jit-able)."""
        def side(eps, frac):
            scale = jnp.where(frac > self.band_high, self.factor,
                              jnp.where(frac < self.band_low, 1.0 / self.factor, 1.0))
            return jnp.clip(eps * scale, self.eps_min, self.eps_max).astype(jnp.float32)

        return ClipRange(side(clip.eps_low, clip_frac_low), side(clip.eps_high, clip_frac_high))
