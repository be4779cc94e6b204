"""The training core: a typed `TrainState` and `make_trainer`, which builds the one jitted
train step of a (config, mesh, loss).

    trainer = make_trainer(cfg, mesh)                # cfg: model / optimizer / train sections
    state = trainer.init()                           # created straight into its shardings
    state, metrics = trainer.step(state, batch)      # compiled on the first call, once

Everything that decides where an array lives is derived here, once, from the logical axis
names the model's variables carry and `sharding.rules` (`rules.variable_sharding`): the
parameters and router biases, the optimizer state (placed like the parameter it mirrors),
the replicated counters and metrics, and the batch (rows over the mesh's batch axes). The
step is `jax.jit(..., in_shardings, out_shardings, donate_argnums=0)` of those, so the
shardings a reader sees in `Trainer.state_shardings` are the ones that apply.

One step = the batch's loss and gradient, computed as `micro_batches` parts one after
another (gradient accumulation; 1 part is the plain step) -> global-norm clipping and the
optimizer (from the config, or `tx`) -> the aux-loss-free router-bias update from the
step's expert counts. A step whose loss or gradient norm is not finite changes nothing but
the `step` and `skipped` counters.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx, struct
from jax.sharding import NamedSharding, PartitionSpec

from glm_jax.config import GlmConfig
from glm_jax.model.params import RouterBias
from glm_jax.model.transformer import GlmForCausalLM
from glm_jax.train import optimizer
from glm_jax.train.balance import load_imbalance, update_biases
from glm_jax.train.loss import Batch, LossFn, Metrics, NextTokenLoss, prepare_fn
from sharding import rules


@struct.dataclass
class TrainState:
    """Everything a step reads and writes; a pytree (jit, orbax and jax.tree see its fields)."""

    params: nnx.State  # every nnx.Param of GlmForCausalLM
    biases: nnx.State  # the RouterBias variables: selection-only, moved by the balancing rule
    opt_state: optax.OptState
    step: jax.Array  # int32 []: steps taken, skipped ones included
    skipped: jax.Array  # int32 []: steps skipped for a non-finite loss or gradient norm


def split_microbatches(x: jax.Array, micro_batches: int) -> jax.Array:
    """[B, ...] -> [M, B/M, ...]; micro-batch m holds rows m, m+M, m+2M, ...

    The batch is sharded in contiguous row blocks over the mesh's batch axes, so when M
    divides the rows of every shard each device keeps its own rows: splitting moves no data."""
    b = x.shape[0]
    if b % micro_batches:
        raise ValueError(f"batch of {b} rows does not split into {micro_batches} micro-batches")
    return jnp.swapaxes(x.reshape(b // micro_batches, micro_batches, *x.shape[1:]), 0, 1)


@dataclasses.dataclass(frozen=True)
class Trainer:
    """The compiled programs of one (config, mesh, loss). Build it with `make_trainer`."""

    config: GlmConfig
    mesh: jax.sharding.Mesh
    graphdef: nnx.GraphDef
    tx: optax.GradientTransformation
    schedule: optax.Schedule
    micro_batches: int
    state_shardings: TrainState  # a TrainState of NamedShardings
    batch_sharding: NamedSharding  # every batch array: rows over the batch axes
    abstract_state: TrainState  # jax.ShapeDtypeStruct leaves, with their shardings
    _init: Any  # jitted () -> TrainState
    _step: Any  # jitted (TrainState, Batch) -> (TrainState, Metrics)

    def init(self) -> TrainState:
        """A fresh state (random weights from `train.seed`), created in its shardings."""
        return self._init()

    def step(self, state: TrainState, batch: Batch) -> tuple[TrainState, Metrics]:
        """One optimizer step; `state` is donated (do not use it afterwards). Metrics are
        replicated: `jax.device_get` works on every process."""
        # Traced under the mesh: activation constraints (`rules.constrain`) and the MoE's
        # expert-parallel exchange read the mesh the trace runs under.
        with jax.set_mesh(self.mesh):
            return self._step(state, batch)

    def lower(self, batch: Batch) -> jax.stages.Lowered:
        """The step lowered for the state's and `batch`'s shapes (arrays or
        jax.ShapeDtypeStruct): `.compile()` gives the executable `step` runs, for reading
        its HLO and memory without allocating a state."""
        with jax.set_mesh(self.mesh):
            return self._step.lower(self.abstract_state, batch)

    def model(self, state: TrainState) -> GlmForCausalLM:
        """The model holding `state`'s weights (for evaluation or generation)."""
        return nnx.merge(self.graphdef, state.params, state.biases)


def make_trainer(cfg: ml_collections.ConfigDict, mesh: jax.sharding.Mesh,
                 loss_fn: LossFn | None = None, *,
                 tx: optax.GradientTransformation | None = None,
                 micro_batches: int | None = None) -> Trainer:
    """The trainer of config `cfg` (sections `model`, `optimizer`, `train` as in
    configs/tiny.py) on `mesh`.

    loss_fn: `(CausalLMOutput, batch) -> (loss, metrics)` with an optional whole-batch
      `prepare` (glm_jax.train.loss); default `NextTokenLoss` with the config's
      train.mtp_loss_weight and train.z_loss_weight.
    tx: an optax transformation instead of the config's optimizer (its `schedule` is then
      the config's, for logging only).
    micro_batches: instead of train.micro_batches; must divide the rows of each batch shard.
    Raises ValueError for a config the model rejects or a model state that is neither
    Param nor RouterBias."""
    model_cfg = GlmConfig.from_dict(cfg.model.to_dict())
    t = cfg.train
    micro_batches = t.micro_batches if micro_batches is None else micro_batches
    if not isinstance(micro_batches, int) or micro_batches < 1:
        raise ValueError(f"micro_batches={micro_batches!r}: must be a positive integer")
    if loss_fn is None:
        loss_fn = NextTokenLoss(t.mtp_loss_weight, t.z_loss_weight, model_cfg.num_mtp_layers)

    def create() -> GlmForCausalLM:
        return GlmForCausalLM(model_cfg, rngs=nnx.Rngs(t.seed), mesh=mesh)

    graphdef, params, biases, rest = nnx.split(nnx.eval_shape(create), nnx.Param,
                                               RouterBias, ...)
    if jax.tree.leaves(rest):
        raise ValueError(f"model has state that is neither Param nor RouterBias: {rest}")
    param_sh = rules.state_shardings(params, mesh)
    bias_sh = rules.state_shardings(biases, mesh)
    replicated = NamedSharding(mesh, PartitionSpec())

    def placed(tree, shardings):  # abstract leaves that know their sharding
        return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                            tree, shardings)

    schedule = optimizer.make_schedule(cfg.optimizer, t.steps)
    if tx is None:
        # Muon orthogonalizes each weight where it lives, so it is told the placements.
        tx, schedule = optimizer.make_optimizer(cfg.optimizer, t.steps,
                                                placed(params, param_sh))
    # Optimizer state lives where its parameter lives (Adam's mu and nu, momentum);
    # counters are replicated. Left to jit, the moments came out replicated: every
    # device held them whole and the step gathered the expert weights to update them.
    opt_sh = rules.opt_state_shardings(tx, params, param_sh, mesh)
    state_sh = TrainState(params=param_sh, biases=bias_sh, opt_state=opt_sh,
                          step=replicated, skipped=replicated)
    scalar = jax.ShapeDtypeStruct((), jnp.int32)
    abstract = TrainState(params=params, biases=biases, opt_state=jax.eval_shape(tx.init, params),
                          step=scalar, skipped=scalar)
    abstract = placed(abstract, state_sh)
    batch_sh = rules.batch_sharding(mesh)

    def init() -> TrainState:
        _, p, b = nnx.split(create(), nnx.Param, RouterBias)
        zero = jnp.zeros((), jnp.int32)
        return TrainState(params=p, biases=b, opt_state=tx.init(p), step=zero, skipped=zero)

    step = train_step_fn(graphdef, tx, loss_fn, micro_batches=micro_batches,
                         bias_update_rate=t.bias_update_rate)
    return Trainer(
        config=model_cfg, mesh=mesh, graphdef=graphdef, tx=tx, schedule=schedule,
        micro_batches=micro_batches, state_shardings=state_sh, batch_sharding=batch_sh,
        abstract_state=abstract,
        # One jitted call creates the weights straight into their shardings (eager creation
        # compiles every initializer op separately and materializes unsharded weights).
        _init=jax.jit(init, out_shardings=state_sh),
        _step=jax.jit(step, in_shardings=(state_sh, batch_sh),
                      out_shardings=(state_sh, replicated), donate_argnums=(0,)))


def train_step_fn(graphdef: nnx.GraphDef, tx: optax.GradientTransformation, loss_fn: LossFn,
                  *, micro_batches: int, bias_update_rate: float):
    """The un-jitted step `(TrainState, Batch) -> (TrainState, Metrics)` (make_trainer jits
    it with its shardings).

    The loss's `prepare` sees the whole batch (its weights are normalized over it); the
    micro-batches' losses, gradients, metrics, expert counts and drops are then summed, so
    M micro-batches give the one-batch step up to float summation order. Memory is what
    changes: the layer stacks run on B/M rows at a time (the gradient sum costs one
    parameter-sized float32 buffer)."""

    def objective(model, batch):
        # routed_experts [B, T, num_moe_layers, k]: routing replay of the rollout's choices.
        out = model(batch["tokens"], positions=batch.get("positions"),
                    segment_ids=batch.get("segment_ids"),
                    routed_experts=batch.get("routed_experts"))
        with jax.named_scope("loss"):
            loss, metrics = loss_fn(out, batch)
        return loss, (metrics, out.expert_counts, out.mtp_expert_counts, out.dropped)

    def loss_and_grads(weights, batch):
        # Merged inside this trace: nnx refuses Variables whose values come from an outer
        # trace (a closure), so the weights are passed in. nnx.value_and_grad differentiates
        # the Params only; the RouterBias rides along as a constant.
        batch = {k: rules.constrain(v, ("batch",) + (None,) * (v.ndim - 1))
                 for k, v in batch.items()}
        model = nnx.merge(graphdef, *weights)
        return nnx.value_and_grad(objective, argnums=nnx.DiffState(0, nnx.Param),
                                  has_aux=True)(model, batch)

    def step(state: TrainState, batch: Batch) -> tuple[TrainState, Metrics]:
        batch = prepare_fn(loss_fn)(batch)
        weights = (state.params, state.biases)
        if micro_batches == 1:
            (loss, aux), grads = loss_and_grads(weights, batch)
        else:
            micro = {k: split_microbatches(v, micro_batches) for k, v in batch.items()}

            def body(carry, mb):
                # The weights ride in the carry, unchanged, for the reason given above.
                weights, acc = carry
                return (weights, jax.tree.map(jnp.add, acc, loss_and_grads(weights, mb))), None

            first = jax.tree.map(lambda x: x[0], micro)
            zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                                 jax.eval_shape(loss_and_grads, weights, first))
            (loss, aux), grads = jax.lax.scan(body, (weights, zeros), micro)[0][1]
        metrics, counts, mtp_counts, dropped = aux
        with jax.named_scope("optimizer"):
            new_state, ok, grad_norm = apply_update(state, grads, loss, counts, mtp_counts,
                                                    tx=tx, bias_update_rate=bias_update_rate)
        all_counts = jnp.concatenate([counts, mtp_counts], axis=0)
        metrics = dict(metrics, loss=loss, grad_norm=grad_norm, finite=ok, dropped=dropped,
                       expert_counts=all_counts, load_imbalance=load_imbalance(all_counts))
        return new_state, metrics

    return step


def apply_update(state: TrainState, grads: nnx.State, loss: jax.Array, counts: jax.Array,
                 mtp_counts: jax.Array, *, tx: optax.GradientTransformation,
                 bias_update_rate: float) -> tuple[TrainState, jax.Array, jax.Array]:
    """The optimizer step, the router-bias update and the non-finite guard, given the step's
    gradients. Returns (new_state, ok, grad_norm)."""
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
        ok, apply, keep, (grads, state.opt_state, state.params, state.biases))
    new_state = state.replace(params=params, biases=biases, opt_state=opt_state,
                              step=state.step + 1,
                              skipped=state.skipped + (~ok).astype(jnp.int32))
    return new_state, ok, grad_norm
