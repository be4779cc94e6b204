"""The SFT loss: next-token cross-entropy weighted per token, so only what the model writes
(assistant turns) is learned. The MTP heads use the same weights.

`masked_next_token_loss(logits, targets, weights)` is the pure core; `sft_loss(logits,
mtp_logits, batch, ...)` derives targets and weights from a packed batch, with the same
arguments and result shape as `glm_jax.train.loss.lm_loss`, so a trainer that takes a loss
function can use either.

Normalisation: a weighted mean over the whole (global) batch,
sum_i w_i * CE_i / sum_i w_i, so a packed batch gives the same loss as its conversations
concatenated, whatever the packing.

The batch key is `loss_mask` [B, T], token-aligned (1 = this token is a target, as
transformers' `labels != -100`): the key and alignment the training core's next-token loss
reads, so SFT batches also train with it unchanged.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from glm_jax.train.loss import cross_entropy, shifted_targets


def masked_next_token_loss(logits: jax.Array, targets: jax.Array, weights: jax.Array
                           ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """logits [B, T, V] (any float dtype; computed in float32), targets [B, T] int,
    weights [B, T] float (weight of predicting targets[:, t] at position t; 0 = ignored).
    Returns (sum w * CE / sum w, {"ce", "trained_tokens"}); 0 loss when no weight is set."""
    ce_sum, _, n = cross_entropy(logits, targets, weights.astype(jnp.float32))
    ce = ce_sum / jnp.maximum(n, 1e-9)
    return ce, {"ce": ce, "trained_tokens": n}


def shifted_weights(batch: dict[str, jax.Array], shift: int) -> tuple[jax.Array, jax.Array]:
    """(targets [B, T], weights [B, T] float32) for the head predicting token t + shift:
    the batch's `loss_mask` of the target token, zero outside the row or the document."""
    targets, valid = shifted_targets(batch["tokens"], batch["segment_ids"], shift)
    target_w = jnp.roll(batch["loss_mask"].astype(jnp.float32), -shift, axis=1)
    return targets, jnp.where(valid, target_w, 0.0)


def sft_loss(logits: jax.Array, mtp_logits: tuple[jax.Array, ...], batch: dict[str, jax.Array],
             *, mtp_loss_weight: float) -> tuple[jax.Array, dict[str, jax.Array]]:
    """total = weighted CE + mtp_loss_weight * mean over MTP depths of the depth's weighted CE.
    batch: tokens / segment_ids [B, T] int32 and loss_mask [B, T] float32 (token-aligned:
    the weight of predicting that token)."""
    targets, w = shifted_weights(batch, 1)
    ce, metrics = masked_next_token_loss(logits, targets, w)
    mtp = jnp.zeros((), jnp.float32)
    for depth, depth_logits in enumerate(mtp_logits, start=1):
        t, wd = shifted_weights(batch, 1 + depth)
        mtp = mtp + masked_next_token_loss(depth_logits, t, wd)[0] / len(mtp_logits)
    total = ce + mtp_loss_weight * mtp if mtp_logits else ce
    return total, {**metrics, "mtp_loss": mtp}
