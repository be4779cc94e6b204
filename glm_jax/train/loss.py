"""Losses for the trainer, in float32 whatever the activation dtype.

A loss is a function `loss(out, batch) -> (scalar, metrics)`: `out` is the model's
`CausalLMOutput` (logits, MTP logits, hidden states, expert counts) and `batch` the
micro-batch dict (`tokens`, `positions`, `segment_ids` and whatever the data adds: loss
masks, advantages, old log-probabilities). Because the trainer may run the batch as M
micro-batches and *adds* their losses, gradients and metrics, a loss must be a weighted sum
over its rows whose weights were normalized over the whole batch. A loss that normalizes
(a mean over tokens) does that in an optional `prepare(batch) -> batch` method, which the
trainer calls once on the whole global batch before splitting it: `prepare` adds per-token
weight arrays (leading axis = batch rows, so they split with the rows) and `__call__` takes
weighted sums. M = 1 runs exactly the same two calls.

Post-training losses plug in the same way: SFT is `NextTokenLoss` with a `loss_mask` in the
batch; a policy-gradient loss reads `advantages` [B] and `old_logprobs` [B, T] from the
batch, puts its normalization (per token, or per sequence then per batch) in `prepare`'s
weights, and sees the router through `out` (today the per-layer loads `expert_counts`;
per-token expert choices, for routing replay, are the field `CausalLMOutput` would add).

Targets come from the row itself: the main head at position i predicts token i+1, MTP depth
k (1-based) predicts token i+1+k. A target is valid only if it lies inside the row and in
the same document as position i (same non-zero segment id) and, when the batch has a
`loss_mask` [B, T] (1 = this token is a target, as transformers' `labels != -100`), the
target token is marked; everything else is masked, including the wrapped values
`shift_left` feeds the MTP layer at the row end.
"""

from __future__ import annotations

import dataclasses
import types
from typing import Any, Callable, Protocol

import jax
import jax.numpy as jnp

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]


class LossFn(Protocol):
    """What `make_trainer(loss_fn=...)` accepts; `prepare` is optional (see module doc)."""

    def __call__(self, out: Any, batch: Batch) -> tuple[jax.Array, Metrics]: ...


def prepare_fn(loss_fn: LossFn) -> Callable[[Batch], Batch]:
    """The loss's whole-batch hook, or the identity when it has none."""
    return getattr(loss_fn, "prepare", lambda batch: batch)


def shifted_targets(tokens: jax.Array, segment_ids: jax.Array, shift: int,
                    loss_mask: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """(targets [B,T], valid [B,T] bool): targets[:, i] = tokens[:, i + shift]."""
    t = tokens.shape[1]
    targets = jnp.roll(tokens, -shift, axis=1)
    target_seg = jnp.roll(segment_ids, -shift, axis=1)
    in_row = jnp.arange(t) < t - shift
    valid = in_row[None, :] & (target_seg == segment_ids) & (segment_ids != 0)
    if loss_mask is not None:
        valid = valid & (jnp.roll(loss_mask, -shift, axis=1) != 0)
    return targets, valid


def token_nll(logits: jax.Array, targets: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(-log p(target) [B,T], logsumexp [B,T]) in float32."""
    logits = logits.astype(jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return lse - target_logit, lse


def cross_entropy(logits: jax.Array, targets: jax.Array, valid: jax.Array
                  ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Sums over valid positions: (sum of -log p(target), sum of logsumexp^2, count)."""
    nll, lse = token_nll(logits, targets)
    w = valid.astype(jnp.float32)
    return (nll * w).sum(), (jnp.square(lse) * w).sum(), w.sum()


@dataclasses.dataclass(frozen=True)
class NextTokenLoss:
    """total = CE + mtp_loss_weight * mean over depths of the depth's CE + z_loss_weight *
    mean logsumexp^2 (main head). Each mean is over the valid targets of the whole (global)
    batch: `prepare` turns the validity masks into weights valid / count ([B, T] for the
    main head, [B, D, T] for the D MTP depths). Pretraining uses it as is; SFT adds a
    `loss_mask` to the batch."""

    mtp_loss_weight: float = 0.0
    z_loss_weight: float = 0.0
    mtp_depths: int = 0

    def prepare(self, batch: Batch) -> Batch:
        tokens, seg, mask = batch["tokens"], batch["segment_ids"], batch.get("loss_mask")

        def weights(shift: int) -> jax.Array:
            valid = shifted_targets(tokens, seg, shift, mask)[1].astype(jnp.float32)
            return valid / jnp.maximum(valid.sum(), 1.0)

        out = dict(batch, target_weights=weights(1))
        if self.mtp_depths:
            out["mtp_target_weights"] = jnp.stack(
                [weights(1 + d) for d in range(1, self.mtp_depths + 1)], axis=1)
        return out

    def __call__(self, out: Any, batch: Batch) -> tuple[jax.Array, Metrics]:
        if len(out.mtp_logits) != self.mtp_depths:
            raise ValueError(f"NextTokenLoss(mtp_depths={self.mtp_depths}) got "
                             f"{len(out.mtp_logits)} MTP depths from the model")
        tokens = batch["tokens"]
        w = batch["target_weights"]
        nll, lse = token_nll(out.logits, jnp.roll(tokens, -1, axis=1))
        ce, z = (nll * w).sum(), (jnp.square(lse) * w).sum()
        mtp = jnp.zeros((), jnp.float32)
        for depth, logits in enumerate(out.mtp_logits, start=1):
            nll_d, _ = token_nll(logits, jnp.roll(tokens, -1 - depth, axis=1))
            mtp = mtp + (nll_d * batch["mtp_target_weights"][:, depth - 1]).sum()
        if self.mtp_depths:
            mtp = mtp / self.mtp_depths
        total = ce + self.z_loss_weight * z + self.mtp_loss_weight * mtp
        # valid_tokens: the micro-batch's share, so that the sum over micro-batches is the
        # batch's count.
        return total, {"ce": ce, "mtp_loss": mtp, "z_loss": z,
                       "valid_tokens": (w > 0).sum().astype(jnp.float32)}


def lm_loss(logits: jax.Array, mtp_logits: tuple[jax.Array, ...], batch: Batch,
            *, mtp_loss_weight: float, z_loss_weight: float = 0.0
            ) -> tuple[jax.Array, Metrics]:
    """`NextTokenLoss` on explicit logits (one call, prepare included)."""
    fn = NextTokenLoss(mtp_loss_weight, z_loss_weight, len(mtp_logits))
    out = types.SimpleNamespace(logits=logits, mtp_logits=tuple(mtp_logits))
    return fn(out, fn.prepare(batch))
