"""Orbax checkpoints of a training run, and loading converted weights.

A step folder holds four items:
  params  nnx.to_pure_dict(nnx.state(model)): every Param *and* the RouterBias values, in
          the same layout the HF converter writes (so `init_from` and resume share it);
  train   {"opt_state", "step", "skipped"};
  data    the grain iterator state of every process (grain's own orbax handler);
  config  the full run config (JSON);
and a run that has more state of its own (RL: curriculum, temperature, clip range) adds a
JSON `extra` item and may have no data iterator.
"""

from __future__ import annotations

import os
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from flax import nnx

from glm_jax.train.trainer import TrainState


def make_manager(directory: str, *, every: int, keep: int, async_save: bool,
                 initial_save: bool = False) -> ocp.CheckpointManager:
    """Saves every `every` steps (and on preemption). orbax's default also saves the first
    step of a fresh run, which a short run then keeps beside its last one: only when
    `initial_save` asks for it."""
    policies = [ocp.checkpoint_managers.FixedIntervalPolicy(max(every, 1)),
                ocp.checkpoint_managers.PreemptionCheckpointingPolicy()]
    if initial_save:
        policies.append(ocp.checkpoint_managers.InitialSavePolicy())
    options = ocp.CheckpointManagerOptions(
        save_decision_policy=ocp.checkpoint_managers.AnySavePolicy(policies),
        max_to_keep=keep, enable_async_checkpointing=async_save)
    return ocp.CheckpointManager(os.path.abspath(directory), options=options)


def _model_pure(state: TrainState) -> dict:
    return nnx.to_pure_dict(nnx.merge_state(state.params, state.biases))


def save(manager: ocp.CheckpointManager, step: int, state: TrainState,
         data_iter: grain.DatasetIterator | None, config: dict, *, force: bool = False,
         extra: dict | None = None) -> bool:
    """Save if the manager's interval says so (or `force`); asynchronous when configured.
    `extra`: a JSON-plain dict saved as the `extra` item (read back by `restore_extra`)."""
    if not (force or manager.should_save(step)):
        return False
    train = {"opt_state": state.opt_state, "step": state.step, "skipped": state.skipped}
    items = dict(params=ocp.args.StandardSave(_model_pure(state)),
                 train=ocp.args.StandardSave(train), config=ocp.args.JsonSave(config))
    if data_iter is not None:
        items["data"] = grain.checkpoint.CheckpointSave(data_iter)
    if extra is not None:
        items["extra"] = ocp.args.JsonSave(extra)
    return manager.save(step, args=ocp.args.Composite(**items), force=force)


def _abstract(tree: Any) -> Any:
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


def _fill(state: TrainState, pure: dict) -> tuple[nnx.State, nnx.State]:
    """Put a pure model dict into copies of the params / biases states (keeping their
    structure and the restored arrays' shardings)."""
    params = jax.tree.map(lambda x: x, state.params)
    biases = jax.tree.map(lambda x: x, state.biases)
    both = nnx.merge_state(params, biases)
    nnx.replace_by_pure_dict(both, pure)
    params_new, biases_new = nnx.split_state(both, nnx.Param, ...)
    return params_new, biases_new


def restore(manager: ocp.CheckpointManager, step: int, state: TrainState,
            data_iter: grain.DatasetIterator | None) -> TrainState:
    """Restore into the structure and shardings of `state`; `data_iter` (if any) is set in
    place."""
    train = {"opt_state": state.opt_state, "step": state.step, "skipped": state.skipped}
    items = dict(params=ocp.args.StandardRestore(_abstract(_model_pure(state))),
                 train=ocp.args.StandardRestore(_abstract(train)))
    if data_iter is not None:
        items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
    out = manager.restore(step, args=ocp.args.Composite(**items))
    params, biases = _fill(state, out["params"])
    return TrainState(params=params, biases=biases, opt_state=out["train"]["opt_state"],
                      step=out["train"]["step"], skipped=out["train"]["skipped"])


def restore_extra(manager: ocp.CheckpointManager, step: int) -> dict:
    """The `extra` JSON item of step `step` (see `save`)."""
    return manager.restore(step, args=ocp.args.Composite(extra=ocp.args.JsonRestore()))["extra"]


def load_params(path: str, state: TrainState) -> TrainState:
    """Start from other weights: params and router biases from `path` (a converted
    checkpoint, a train.py workdir or one of its step folders; see
    glm_jax.checkpoint_source); optimizer state, step and data stream start fresh. The
    run's model config must already be the checkpoint's (glm_jax.train.run_config)."""
    from glm_jax.checkpoint_source import resolve_checkpoint

    source = resolve_checkpoint(path, what="config.init_from")
    pure = ocp.StandardCheckpointer().restore(source.path / "params",
                                              _abstract(_model_pure(state)))
    params, biases = _fill(state, pure)
    return state.replace(params=params, biases=biases)
