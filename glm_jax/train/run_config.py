"""The run config as it will run: the model of `init_from`, checked against a resumed run.

Two checkpoints can decide the model before anything is built:

  * `init_from` (fine-tuning converted hub weights, or continuing another run in a new
    workdir): the architecture is the checkpoint's. `config.model`'s compute options
    (dtype, param_dtype, moe_backend, capacity_factor, attention_backend, remat_policy)
    still apply, and so does an architecture field given explicitly as a flag when it
    leaves every parameter shape unchanged (e.g. `num_experts_per_tok`, `rope_theta`);
    one that changes a shape is refused.
  * the workdir's own latest step (resume): its stored run config must describe the same
    architecture and optimizer as the requested one, or the run stops with the differing
    fields and the ways out, before orbax is asked to restore mismatched arrays.

Both failures are `RunConfigError` (a ValueError): one line for the user, no traceback.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Collection
from pathlib import Path
from typing import Any

import ml_collections

from glm_jax.checkpoint_source import (COMPUTE_OPTIONS, latest_step_dir, read_stored_config,
                                       resolve_checkpoint)
from glm_jax.cli_errors import ConfigError, UserError
from glm_jax.config import GlmConfig

ARCHITECTURE_FIELDS = tuple(f.name for f in dataclasses.fields(GlmConfig)
                            if not f.name.startswith("hf_") and f.name not in COMPUTE_OPTIONS)
# Optimizer fields whose change alters the optimizer state's structure (a resume restores
# that state, so it must keep them).
OPTIMIZER_STATE_FIELDS = ("name",)


class RunConfigError(UserError, ValueError):
    """The requested run does not fit a checkpoint it starts from; one line, with the fix."""


def _normalised(model: dict[str, Any], what: str) -> dict[str, Any]:
    """Every GlmConfig field (defaults filled in), JSON-plain (tuples as lists)."""
    try:
        return json.loads(json.dumps(GlmConfig.from_dict(dict(model)).to_dict()))
    except (TypeError, ValueError) as e:
        raise RunConfigError(f"{what}: {e}") from None


def _shape_changes(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether models a and b (GlmConfig dicts) have different parameter trees or shapes."""
    import jax
    from flax import nnx

    from glm_jax.hf_io import abstract_model

    def shapes(model: dict) -> Any:
        state = nnx.to_pure_dict(nnx.state(abstract_model(GlmConfig.from_dict(model))))
        return jax.tree.map(lambda x: tuple(x.shape), state)

    try:
        return shapes(a) != shapes(b)
    except ValueError:
        return True  # e.g. a different tree structure


def _diff(stored: dict[str, Any], requested: dict[str, Any], fields: Collection[str]
          ) -> list[str]:
    return [f for f in fields if stored.get(f) != requested.get(f)]


def _describe(section: str, names: list[str], stored: dict, requested: dict) -> str:
    return ", ".join(f"{section}.{n}={stored.get(n)!r} (requested {requested.get(n)!r})"
                     for n in names)


def _flag_value(value: Any) -> str:
    """A value as ml_collections parses it on the command line."""
    return str(tuple(value)) if isinstance(value, list) else str(value)


def latest_checkpoint(workdir: str) -> Path | None:
    """The latest finished step folder of a train.py workdir, or None."""
    folder = Path(workdir) / "checkpoints"
    return latest_step_dir(folder) if folder.is_dir() else None


def resolve(cfg: ml_collections.ConfigDict, workdir: str, overrides: Collection[str] = ()
            ) -> tuple[ml_collections.ConfigDict, int | None]:
    """The run config as it will run, and the step to resume from (None: a fresh start).

    overrides: the config fields given on the command line ('model.hidden_size', ...), which
    keep their values over an `init_from` checkpoint's; library callers pass none, and then
    every architecture field comes from the checkpoint. Reads only JSON and folder names:
    nothing is compiled or restored. Raises RunConfigError, or CheckpointPathError for an
    `init_from` that is not a checkpoint."""
    step_dir = latest_checkpoint(workdir)
    stored = read_stored_config(step_dir) if step_dir is not None else None
    requested = _normalised(cfg.model.to_dict(), "config.model")
    model = requested
    if cfg.get("init_from"):
        if stored is not None:  # resumed: the run already took the checkpoint's model
            base = _normalised(stored["model"], f"{step_dir}/config")
        else:
            source = resolve_checkpoint(cfg.init_from, what="config.init_from")
            base = json.loads(json.dumps(source.config.to_dict()))
        explicit = {k.split(".", 1)[1] for k in overrides if k.startswith("model.")}
        model = {k: (requested[k] if k in COMPUTE_OPTIONS or k in explicit else base[k])
                 for k in requested}
        changed = _diff(base, model, ARCHITECTURE_FIELDS)
        if stored is None and changed and _shape_changes(base, model):
            raise RunConfigError(
                f"config.init_from={cfg.init_from}: {_describe('model', changed, base, model)}"
                f" changes the parameter shapes of the checkpoint's model; drop these "
                f"--config.model flags to fine-tune the checkpoint's architecture")
        cfg = _with_model(cfg, model)
    if stored is None:
        return cfg, None
    step = int(step_dir.name)
    stored_model = _normalised(stored["model"], f"{step_dir}/config")
    arch = _diff(stored_model, model, ARCHITECTURE_FIELDS)
    stored_opt, opt = stored.get("optimizer", {}), cfg.optimizer.to_dict()
    optim = _diff(stored_opt, opt, OPTIMIZER_STATE_FIELDS)
    if arch or optim:
        what = "; ".join(filter(None, (_describe("model", arch, stored_model, model),
                                       _describe("optimizer", optim, stored_opt, opt))))
        keep = " ".join([f"--config.model.{n}={_flag_value(stored_model[n])}" for n in arch]
                        + [f"--config.optimizer.{n}={_flag_value(stored_opt[n])}"
                           for n in optim])
        ways = "start a new --workdir"
        if not arch or not _shape_changes(stored_model, model):
            ways += (f", or start one from this run's weights with "
                     f"--config.init_from={os.path.abspath(workdir)}")
        raise RunConfigError(
            f"--workdir {workdir} holds a run (step {step}) with {what}; to resume it, pass "
            f"{keep}; to train the changed setting, {ways}")
    return cfg, step


def _with_model(cfg: ml_collections.ConfigDict, model: dict[str, Any]
                ) -> ml_collections.ConfigDict:
    """A copy of `cfg` whose model section is `model` (a new ConfigDict: a checkpoint's
    values may have other types than the config file's, e.g. a list of eos ids)."""
    out = ml_collections.ConfigDict(cfg.to_dict())
    out.model = ml_collections.ConfigDict(model)
    return out


def mesh_axes(spec: str, devices: list | None) -> dict[str, int]:
    """config.train.mesh parsed and resolved over `devices` (None: only the spelling and
    the axis names are checked). A mesh larger than the CPU device count says how to
    simulate more devices. Raises ConfigError."""
    from sharding.mesh import MESH_AXES, parse_mesh, resolve_axes

    axes: dict[str, int] = {}
    try:
        axes = parse_mesh(spec)
        if devices is None:
            unknown = sorted(set(axes) - set(MESH_AXES))
            if unknown:
                raise ValueError(f"mesh axes {unknown} unknown; the axes are {list(MESH_AXES)}")
            return axes
        return resolve_axes(axes, len(devices))
    except ValueError as e:
        hint = ""
        wanted = math.prod(s for s in axes.values() if s > 0)
        if devices and devices[0].platform == "cpu" and wanted > len(devices):
            hint = (f"; on CPU, simulate {wanted} devices with XLA_FLAGS="
                    f"--xla_force_host_platform_device_count={wanted} (set before python "
                    "starts)")
        raise ConfigError(f"config.train.mesh={spec!r}: {e}{hint}") from None


RESOLVED_CONFIG_FILE = "run_config.json"


def describe(cfg: ml_collections.ConfigDict, width: int = 100) -> str:
    """The resolved config, a few wrapped lines per section ('model: vocab_size=320 ...')."""
    import textwrap

    lines = []
    for section, values in cfg.to_dict().items():
        if isinstance(values, dict):
            flat = " ".join(f"{k}={v!r}" if not isinstance(v, dict) else
                            " ".join(f"{k}.{kk}={vv!r}" for kk, vv in v.items())
                            for k, v in values.items())
            lines += textwrap.wrap(f"{section}: {flat}", width, subsequent_indent="    ")
        else:
            lines.append(f"{section}: {values!r}")
    return "\n".join(lines)


def write_resolved(cfg: ml_collections.ConfigDict, workdir: str) -> str:
    """Write the resolved config to WORKDIR/run_config.json (a temp file, then renamed);
    every checkpoint stores it too. Returns the path."""
    path = os.path.join(workdir, RESOLVED_CONFIG_FILE)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(cfg.to_dict(), f, indent=1, default=str)
    os.replace(tmp, path)
    return path
