"""Orbax checkpoints of a training run, and loading converted weights.

A step folder holds four items:
  params  nnx.to_pure_dict(nnx.state(model)): every Param *and* the RouterBias values, in
          the same layout the HF converter writes (so `init_from` and resume share it);
  train   {"opt_state", "step", "skipped"};
  data    the grain iterator state of every process (grain's own orbax handler);
  config  the full run config (JSON).
"""

from __future__ import annotations

import os
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from flax import nnx

from glm_jax.train.trainer import TrainState


def make_manager(directory: str, *, every: int, keep: int, async_save: bool
                 ) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(
        save_interval_steps=max(every, 1), max_to_keep=keep,
        enable_async_checkpointing=async_save)
    return ocp.CheckpointManager(os.path.abspath(directory), options=options)


def _model_pure(state: TrainState) -> dict:
    return nnx.to_pure_dict(nnx.merge_state(state.params, state.biases))


def save(manager: ocp.CheckpointManager, step: int, state: TrainState,
         data_iter: grain.DatasetIterator, config: dict, *, force: bool = False) -> bool:
    """Save if the manager's interval says so (or `force`); asynchronous when configured."""
    if not (force or manager.should_save(step)):
        return False
    train = {"opt_state": state.opt_state, "step": state.step, "skipped": state.skipped}
    return manager.save(step, args=ocp.args.Composite(
        params=ocp.args.StandardSave(_model_pure(state)),
        train=ocp.args.StandardSave(train),
        data=grain.checkpoint.CheckpointSave(data_iter),
        config=ocp.args.JsonSave(config)), force=force)


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
            data_iter: grain.DatasetIterator) -> TrainState:
    """Restore into the structure and shardings of `state`; `data_iter` is set in place."""
    train = {"opt_state": state.opt_state, "step": state.step, "skipped": state.skipped}
    out = manager.restore(step, args=ocp.args.Composite(
        params=ocp.args.StandardRestore(_abstract(_model_pure(state))),
        train=ocp.args.StandardRestore(_abstract(train)),
        data=grain.checkpoint.CheckpointRestore(data_iter)))
    params, biases = _fill(state, out["params"])
    return TrainState(params=params, biases=biases, opt_state=out["train"]["opt_state"],
                      step=out["train"]["step"], skipped=out["train"]["skipped"])


def _params_dir(path: str) -> str:
    """The `params` item of `path`: a train.py workdir or a CheckpointManager root (latest
    step), a step folder, or the params folder itself."""
    path = os.path.abspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"config.init_from={path!r}: no such folder")
    if os.path.isdir(os.path.join(path, "checkpoints")):  # a run's workdir
        path = os.path.join(path, "checkpoints")
    steps = [d for d in os.listdir(path) if d.isdigit()]
    if steps:
        path = os.path.join(path, max(steps, key=int))
    if os.path.isdir(os.path.join(path, "params")):
        return os.path.join(path, "params")
    raise FileNotFoundError(f"config.init_from={path!r}: expected an orbax checkpoint with a "
                            "'params' item (the layout glm_jax.convert writes)")


def check_init_from(path: str, model_cfg) -> None:
    """The converted checkpoint's config.json (its 'config' item) must describe the same
    architecture as the run's model config. Called before anything compiles."""
    from glm_jax.config import GlmConfig
    from glm_jax.orbax_stream import read_config

    params_dir = _params_dir(path)
    step_dir = os.path.dirname(params_dir)
    try:
        hf = read_config(step_dir)
    except FileNotFoundError:
        return  # a bare params item: shapes decide
    if "model" in hf and "train" in hf:  # a glm-jax run's checkpoint: its run config
        theirs = GlmConfig.from_dict(hf["model"])
        if theirs != model_cfg:
            diff = {k: (v, getattr(theirs, k)) for k, v in model_cfg.to_dict().items()
                    if getattr(theirs, k) != v}
            raise ValueError(f"config.init_from={path!r}: the run's config.model differs "
                             f"from this config.model in {diff} (ours, theirs)")
        return
    compute = {k: getattr(model_cfg, k) for k in ("dtype", "param_dtype", "moe_backend",
                                                  "capacity_factor", "attention_backend",
                                                  "remat_policy")}
    theirs = GlmConfig.from_hf(hf, **compute)
    if theirs != model_cfg:
        diff = {k: (v, getattr(theirs, k)) for k, v in model_cfg.to_dict().items()
                if getattr(theirs, k) != v}
        raise ValueError(f"config.init_from={path!r}: the checkpoint's config.json differs "
                         f"from config.model in {diff} (ours, theirs); set config.model to "
                         "the checkpoint's architecture")


def load_params(path: str, state: TrainState) -> TrainState:
    """Start from converted weights: params and router biases from `path`; optimizer state,
    step and data stream start fresh."""
    pure = ocp.StandardCheckpointer().restore(_params_dir(path),
                                              _abstract(_model_pure(state)))
    params, biases = _fill(state, pure)
    return state.replace(params=params, biases=biases)
