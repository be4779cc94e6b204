"""Gradient accumulation: one optimizer step over the global batch, computed as M
micro-batches run one after another (`train.micro_batches`).

The step has the semantics of `glm_jax.train.step.train_step_fn` on the whole batch:
- the loss is the same mean over the valid tokens of the *global* batch: the normalizers
  (valid-target counts of the main head and of each MTP depth) are counted on the whole
  batch first, and each micro-batch contributes its loss sums divided by them, so the
  micro-batch losses and gradients add up to the full-batch loss and gradient;
- gradients, expert counts and drops are summed over the micro-batches; then clipping, the
  optimizer, the non-finite guard and the router-bias update run once, as in step.py.
What changes is memory: the layer stacks run on B/M rows at a time, so activations and
exchange buffers shrink M-fold (the gradient sum costs one parameter-sized float32 buffer).

Micro-batch m takes rows m, m+M, m+2M, ... of the batch. The batch is sharded in
contiguous row blocks over the mesh's batch axes, so when M divides the rows of every
shard each device keeps its own rows: splitting moves no data.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from glm_jax.train.balance import load_imbalance
from glm_jax.train.loss import cross_entropy, shifted_targets
from glm_jax.train.step import Batch, TrainState, apply_update, train_step_fn
from sharding.rules import constrain


def split_microbatches(x: jax.Array, micro_batches: int) -> jax.Array:
    """[B, ...] -> [M, B/M, ...]; micro-batch m holds rows m, m+M, m+2M, ..."""
    b = x.shape[0]
    if b % micro_batches:
        raise ValueError(f"batch of {b} rows does not split into {micro_batches} micro-batches")
    return jnp.swapaxes(x.reshape(b // micro_batches, micro_batches, *x.shape[1:]), 0, 1)


def microbatch_train_step_fn(graphdef: nnx.GraphDef, tx: optax.GradientTransformation, *,
                             micro_batches: int, mtp_loss_weight: float, z_loss_weight: float,
                             bias_update_rate: float
                             ) -> Callable[[TrainState, Batch],
                                           tuple[TrainState, dict[str, jax.Array]]]:
    """The un-jitted step over `micro_batches` micro-batches (1 = `train_step_fn` itself)."""
    if not isinstance(micro_batches, int) or micro_batches < 1:
        raise ValueError(f"micro_batches={micro_batches!r}: must be a positive integer")
    if micro_batches == 1:
        return train_step_fn(graphdef, tx, mtp_loss_weight=mtp_loss_weight,
                             z_loss_weight=z_loss_weight, bias_update_rate=bias_update_rate)

    def micro_loss(model, mb, norm, mtp_norms):
        out = model(mb["tokens"], positions=mb["positions"], segment_ids=mb["segment_ids"])
        tokens, seg = mb["tokens"], mb["segment_ids"]
        ce_sum, z_sum, _ = cross_entropy(out.logits, *shifted_targets(tokens, seg, 1))
        ce, z = ce_sum / norm, z_sum / norm
        mtp = jnp.zeros((), jnp.float32)
        for depth, logits in enumerate(out.mtp_logits, start=1):
            s, _, _ = cross_entropy(logits, *shifted_targets(tokens, seg, 1 + depth))
            mtp = mtp + s / mtp_norms[depth - 1] / len(out.mtp_logits)
        loss = ce + z_loss_weight * z + (mtp_loss_weight * mtp if out.mtp_logits else 0.0)
        return loss, (ce, z, mtp, out.expert_counts, out.mtp_expert_counts, out.dropped)

    def step(state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, jax.Array]]:
        params, biases = state["params"], state["biases"]
        cfg = nnx.merge(graphdef, params, biases).config
        depths = cfg.num_mtp_layers
        # Normalizers of the whole batch, exactly as lm_loss counts them.
        norm = jnp.maximum(shifted_targets(batch["tokens"], batch["segment_ids"], 1)[1]
                           .sum().astype(jnp.float32), 1.0)
        mtp_norms = [jnp.maximum(shifted_targets(batch["tokens"], batch["segment_ids"], 1 + d)[1]
                                 .sum().astype(jnp.float32), 1.0) for d in range(1, depths + 1)]
        micro = {k: split_microbatches(v, micro_batches) for k, v in batch.items()}

        def body(carry, mb):
            # The weights ride in the carry, unchanged: nnx refuses Variables whose values
            # come from an outer trace (a closure), as step.py's comment explains.
            weights, acc_grads, acc_loss, acc_aux = carry
            mb = {k: constrain(v, ("batch", "seq")) for k, v in mb.items()}
            # As in step.py: merged inside this trace, differentiated by nnx for the Params
            # only (the RouterBias rides along as a constant).
            model = nnx.merge(graphdef, *weights)
            (loss, aux), grads = nnx.value_and_grad(
                micro_loss, argnums=nnx.DiffState(0, nnx.Param), has_aux=True)(
                model, mb, norm, mtp_norms)
            return (weights, jax.tree.map(jnp.add, acc_grads, grads), acc_loss + loss,
                    jax.tree.map(jnp.add, acc_aux, aux)), None

        e = cfg.n_routed_experts
        zero = jnp.zeros((), jnp.float32)
        init = ((params, biases), jax.tree.map(jnp.zeros_like, params), zero,
                (zero, zero, zero, jnp.zeros((cfg.num_moe_layers, e), jnp.int32),
                 jnp.zeros((depths, e), jnp.int32), jnp.zeros((), jnp.int32)))
        (_, grads, loss, (ce, z, mtp, counts, mtp_counts, dropped)), _ = jax.lax.scan(
            body, init, micro)

        # From here on exactly train_step_fn's update (glm_jax/train/step.py).
        new_state, ok, grad_norm = apply_update(state, grads, loss, counts, mtp_counts, tx=tx,
                                                bias_update_rate=bias_update_rate)
        all_counts = jnp.concatenate([counts, mtp_counts], axis=0)
        metrics = {"ce": ce, "mtp_loss": mtp, "z_loss": z, "valid_tokens": norm, "loss": loss,
                   "grad_norm": grad_norm, "finite": ok, "dropped": dropped,
                   "expert_counts": all_counts, "load_imbalance": load_imbalance(all_counts)}
        return new_state, metrics

    return step
