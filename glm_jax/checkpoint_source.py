"""What a checkpoint path names, for every entry point that reads weights: `glm-jax-convert
to-hf --ckpt`, `glm_jax.convert.load_checkpoint`, `python -m glm_jax.generate --ckpt` and
`train.py --config.init_from`. Each accepts the same three things:

  * a `train.py` workdir (or its `checkpoints` folder): its latest finished step;
  * one step folder of a run (`runs/tiny/checkpoints/200`);
  * a converted checkpoint (`glm-jax-convert to-jax --out CKPT`).

Both kinds of checkpoint hold a `params` item (`nnx.to_pure_dict` of the model state, the
same layout) and a `config` item. They differ in the config item: a train step stores the
whole run config, whose `model` section is a glm-jax `GlmConfig` (compute options
included); a converted checkpoint stores the hub `config.json`. `resolve_checkpoint` reads
either into a `GlmConfig`, so no caller mistakes one for the other.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

from glm_jax.cli_errors import ConfigError, InputPathError
from glm_jax.config import GlmConfig

# GlmConfig fields that say how to compute, not what the model is: a checkpoint fixes the
# architecture, and these stay free (flags, keyword arguments) wherever it is loaded.
COMPUTE_OPTIONS = ("dtype", "param_dtype", "moe_backend", "capacity_factor",
                   "attention_backend", "remat_policy")

ACCEPTED = ("a train.py workdir (latest step), one of its step folders, or a converted "
            "checkpoint (glm-jax-convert to-jax)")


class CheckpointPathError(InputPathError):
    """The path is not a checkpoint; the message names it, says what it is, and the fix."""


@dataclasses.dataclass(frozen=True)
class ResolvedCheckpoint:
    path: Path  # absolute: the folder holding the `params` and `config` items
    kind: str  # "train" (a train.py step) or "converted" (glm-jax-convert to-jax)
    config: GlmConfig  # the model the params belong to (compute options as stored)
    stored: dict[str, Any]  # the raw config item: the run config, or the hub config.json

    @property
    def step(self) -> int | None:
        """The training step of a train.py checkpoint (None for a converted one)."""
        return int(self.path.name) if self.kind == "train" else None


def latest_step_dir(folder: Path) -> Path | None:
    """The highest-numbered finished step folder under `folder` (orbax names unfinished
    saves `<step>.orbax-checkpoint-tmp-*`, so they never count)."""
    steps = [d for d in folder.iterdir() if d.name.isdigit() and d.is_dir()]
    return max(steps, key=lambda d: int(d.name)) if steps else None


def _is_hub_folder(path: Path) -> bool:
    return (path / "config.json").is_file() and any(path.glob("*.safetensors"))


def read_stored_config(step_dir: Path) -> dict[str, Any]:
    """The JSON `config` item of a checkpoint folder."""
    with open(step_dir / "config" / "metadata") as f:
        return json.load(f)


def model_config_of(stored: dict[str, Any], **compute_options: Any) -> GlmConfig:
    """The GlmConfig a stored config item describes: a run config's `model` section, or a
    hub config.json. `compute_options` override the stored compute fields."""
    if "model" in stored and isinstance(stored["model"], dict):
        return GlmConfig.from_dict({**stored["model"], **compute_options})
    return GlmConfig.from_hf(stored, **compute_options)


def resolve_checkpoint(path: str | os.PathLike, *, what: str = "checkpoint",
                       **compute_options: Any) -> ResolvedCheckpoint:
    """Resolve `path` (see the module docstring) to the folder holding the weights and its
    model config. `what` names the path in errors (a flag such as '--ckpt' or a config field
    such as 'config.init_from'). Raises CheckpointPathError (a FileNotFoundError) when `path`
    is not a checkpoint, and ConfigError (a ValueError) when its stored config is not a
    valid GlmConfig."""
    given = path
    path = Path(path).absolute()  # orbax's OCDBT specs reject relative paths
    if not path.is_dir():
        raise CheckpointPathError(f"{what} {given}: no such folder; expected {ACCEPTED}")
    if _is_hub_folder(path):
        raise CheckpointPathError(
            f"{what} {given}: a hub folder (config.json + safetensors), not a glm-jax "
            f"checkpoint; convert it first: glm-jax-convert to-jax --hf {given} --out CKPT")
    if (path / "checkpoints").is_dir():  # a train.py workdir
        path = path / "checkpoints"
    if not (path / "params").is_dir():
        latest = latest_step_dir(path)
        if latest is None:
            hint = (" (a train.py workdir with no finished step yet)"
                    if path.name == "checkpoints" else "")
            raise CheckpointPathError(f"{what} {given}: no checkpoint found{hint}; "
                                      f"expected {ACCEPTED}")
        path = latest
    if not (path / "params").is_dir() or not (path / "config" / "metadata").is_file():
        raise CheckpointPathError(f"{what} {given}: not a glm-jax checkpoint (no 'params' and "
                                  f"'config' items in {path}); expected {ACCEPTED}")
    stored = read_stored_config(path)
    kind = "train" if isinstance(stored.get("model"), dict) else "converted"
    try:
        config = model_config_of(stored, **compute_options)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{what} {given}: its stored model config is invalid: {e}") from None
    return ResolvedCheckpoint(path, kind, config, stored)
