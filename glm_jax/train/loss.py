"""Language-model losses, in float32 whatever the activation dtype.

Targets come from the row itself: the main head at position i predicts token i+1, MTP depth
k (1-based) predicts token i+1+k. A target is valid only if it lies inside the row and in
the same document as position i (same non-zero segment id); everything else is masked,
including the wrapped values `shift_left` feeds the MTP layer at the row end.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def shifted_targets(tokens: jax.Array, segment_ids: jax.Array, shift: int
                    ) -> tuple[jax.Array, jax.Array]:
    """(targets [B,T], valid [B,T] bool): targets[:, i] = tokens[:, i + shift]."""
    t = tokens.shape[1]
    targets = jnp.roll(tokens, -shift, axis=1)
    target_seg = jnp.roll(segment_ids, -shift, axis=1)
    in_row = jnp.arange(t) < t - shift
    valid = in_row[None, :] & (target_seg == segment_ids) & (segment_ids != 0)
    return targets, valid


def cross_entropy(logits: jax.Array, targets: jax.Array, valid: jax.Array
                  ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Sums over valid positions: (sum of -log p(target), sum of logsumexp^2, count)."""
    logits = logits.astype(jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    w = valid.astype(jnp.float32)
    return ((lse - target_logit) * w).sum(), (jnp.square(lse) * w).sum(), w.sum()


def lm_loss(logits: jax.Array, mtp_logits: tuple[jax.Array, ...], batch: dict[str, jax.Array],
            *, mtp_loss_weight: float, z_loss_weight: float = 0.0
            ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """total = CE + mtp_loss_weight * mean over depths of the depth's CE + z_loss_weight *
    mean logsumexp^2 (main head). Means are over valid tokens of the whole (global) batch."""
    tokens, seg = batch["tokens"], batch["segment_ids"]
    targets, valid = shifted_targets(tokens, seg, 1)
    ce_sum, z_sum, n = cross_entropy(logits, targets, valid)
    n = jnp.maximum(n, 1.0)
    ce, z = ce_sum / n, z_sum / n
    total = ce + z_loss_weight * z
    mtp = jnp.zeros((), jnp.float32)
    for depth, depth_logits in enumerate(mtp_logits, start=1):
        t, v = shifted_targets(tokens, seg, 1 + depth)
        s, _, c = cross_entropy(depth_logits, t, v)
        mtp = mtp + s / jnp.maximum(c, 1.0) / len(mtp_logits)
    if mtp_logits:
        total = total + mtp_loss_weight * mtp
    return total, {"ce": ce, "mtp_loss": mtp, "z_loss": z, "valid_tokens": n}
