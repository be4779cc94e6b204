"""The pure, jitted training step.

state = {"params": nnx.State of every nnx.Param, "biases": nnx.State of the RouterBias
variables, "opt_state": optax state, "step": int32, "skipped": int32}.

Gradients are taken w.r.t. the Params only; the router biases enter the forward pass as
constants and change only through the balancing rule after the optimizer step. A step
whose loss or gradient norm is not finite changes nothing but the step and skipped
counters: params, optimizer state and biases are carried over untouched.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from glm_jax.train.balance import load_imbalance, update_biases
from glm_jax.train.loss import lm_loss

TrainState = dict[str, Any]
Batch = dict[str, jax.Array]


def train_step_fn(graphdef: nnx.GraphDef, tx: optax.GradientTransformation, *,
                  mtp_loss_weight: float, z_loss_weight: float, bias_update_rate: float
                  ) -> Callable[[TrainState, Batch], tuple[TrainState, dict[str, jax.Array]]]:
    """The un-jitted step (the loop jits it with shardings and donation)."""

    def loss_fn(model, batch):
        out = model(batch["tokens"], positions=batch["positions"],
                    segment_ids=batch["segment_ids"])
        with jax.named_scope("cross_entropy"):
            loss, metrics = lm_loss(out.logits, out.mtp_logits, batch,
                                    mtp_loss_weight=mtp_loss_weight,
                                    z_loss_weight=z_loss_weight)
        return loss, (metrics, out.expert_counts, out.mtp_expert_counts, out.dropped)

    def step(state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, jax.Array]]:
        # nnx.value_and_grad differentiates the Params only; the RouterBias rides along as
        # a constant (merging it from outside the grad trace would mix trace levels).
        model = nnx.merge(graphdef, state["params"], state["biases"])
        (loss, (metrics, counts, mtp_counts, dropped)), grads = nnx.value_and_grad(
            loss_fn, argnums=nnx.DiffState(0, nnx.Param), has_aux=True)(model, batch)
        with jax.named_scope("optimizer"):
            new_state, ok, grad_norm = apply_update(state, grads, loss, counts, mtp_counts,
                                                    tx=tx, bias_update_rate=bias_update_rate)
        all_counts = jnp.concatenate([counts, mtp_counts], axis=0)
        metrics = dict(metrics, loss=loss, grad_norm=grad_norm, finite=ok,
                       dropped=dropped, expert_counts=all_counts,
                       load_imbalance=load_imbalance(all_counts))
        return new_state, metrics

    return step


def apply_update(state: TrainState, grads, loss: jax.Array, counts: jax.Array,
                 mtp_counts: jax.Array, *, tx: optax.GradientTransformation,
                 bias_update_rate: float) -> tuple[TrainState, jax.Array, jax.Array]:
    """The optimizer step, the router-bias update and the non-finite guard, given the
    step's gradients (also used by glm_jax.train.microbatch). Returns (new_state, ok,
    grad_norm)."""
    grad_norm = optax.tree.norm(grads)
    ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

    def apply(operands):
        grads, opt_state, params, biases = operands
        updates, opt_state = tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state,
                update_biases(biases, counts, mtp_counts, bias_update_rate))

    def keep(operands):
        _, opt_state, params, biases = operands
        return params, opt_state, biases

    # A cond rather than a select over every tensor: a skipped step costs nothing, and a
    # normal one does not read the old and new state a second time (0.27 s of 0.67 s
    # for the bench config's AdamW update, measured).
    params, opt_state, biases = jax.lax.cond(
        ok, apply, keep, (grads, state["opt_state"], state["params"], state["biases"]))
    new_state = {
        "params": params,
        "biases": biases,
        "opt_state": opt_state,
        "step": state["step"] + 1,
        "skipped": state["skipped"] + (~ok).astype(jnp.int32),
    }
    return new_state, ok, grad_norm
