"""The absl command lines (train.py, python -m glm_jax.sft / glm_jax.rl): flag errors as one line, and
`--help` that lists the config.

absl prints a flag error as two lines (and ml_collections a typo'd config field as a
traceback ending in `Did you mean "steps"`); here every one becomes one line naming the
flag and the fix, exit code 2. `--help` shows the module docstring followed by every field
of the config file with its default, generated from the file itself so it cannot go stale.
"""

from __future__ import annotations

import difflib
import importlib.util
import os
from collections.abc import Sequence
from typing import Any

import ml_collections

from glm_jax.cli_errors import fail

PROG = "train.py"
DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))), "configs", "tiny.py")


def _help_command(prog: str) -> str:
    """How to ask `prog` for its --help: `python train.py --help`, `python -m ... --help`."""
    return f"{prog if prog.startswith('python') else 'python ' + prog} --help"


def config_file(argv: Sequence[str], default: str = DEFAULT_CONFIG) -> str:
    """The config file named by --config (either spelling), else the default."""
    for i, arg in enumerate(argv):
        if arg.startswith("--config="):
            return arg.split("=", 1)[1]
        if arg == "--config" and i + 1 < len(argv):
            return argv[i + 1]
    return default


def load_config(path: str) -> ml_collections.ConfigDict:
    spec = importlib.util.spec_from_file_location("glm_jax_train_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def field_listing(cfg: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
    """'section.field = default' for every leaf field, in the config's order."""
    lines = []
    for key, value in cfg.items():
        if isinstance(value, ml_collections.ConfigDict):
            lines += field_listing(value, f"{prefix}{key}.")
        else:
            lines.append(f"  --config.{prefix}{key}={value!r}")
    return lines


def help_text(doc: str, argv: Sequence[str], default: str = DEFAULT_CONFIG) -> str:
    path = config_file(argv, default)
    try:
        fields = field_listing(load_config(path))
    except Exception as e:  # noqa: BLE001 -- help must print even for a broken config
        fields = [f"  (cannot list the fields of {path}: {e})"]
    return (f"{doc.rstrip()}\n\nConfig fields of {os.path.relpath(path)} and their defaults "
            "(each is a flag):\n" + "\n".join(fields) + "\n")


def _nearest(cfg: ml_collections.ConfigDict, parts: list[str]) -> list[str] | None:
    """The existing field path closest to `parts`, one component at a time."""
    node: Any = cfg
    fixed = []
    for key in parts:
        if not isinstance(node, ml_collections.ConfigDict):
            return None
        if key not in node:
            near = difflib.get_close_matches(key, list(node.keys()), n=1)
            if not near:
                return None
            key = near[0]
        fixed.append(key)
        node = node[key]
    return fixed


def _unknown_field(argv: Sequence[str], prog: str, default: str) -> str:
    """The one-line report of the first --config.X override whose field does not exist."""
    try:
        cfg = load_config(config_file(argv, default))
    except Exception:  # noqa: BLE001 -- then the config file itself is the error
        return f"cannot load the config file {config_file(argv, default)}"
    for arg in argv:
        if not arg.startswith("--config."):
            continue
        path = arg[len("--config."):].split("=", 1)[0]
        if _nearest(cfg, path.split(".")) == path.split("."):
            continue  # this one exists
        near = _nearest(cfg, path.split("."))
        guess = f"; did you mean --config.{'.'.join(near)}?" if near else ""
        return (f"--config.{path}: the config has no field {path!r}{guess} ({_help_command(prog)} "
                "lists the fields)")
    return "a --config override names a field the config does not have"


def define_flags(argv: Sequence[str], prog: str = PROG, default: str = DEFAULT_CONFIG,
                 multi_process: bool = True) -> None:
    """The flags --config (default `default`), --workdir and, with `multi_process`, the
    jax.distributed ones. ml_collections applies the --config.* overrides while the config
    flag is defined, so a missing config file or a typo'd field is reported here."""
    from absl import flags
    from ml_collections import config_flags

    path = config_file(argv, default)
    if not os.path.isfile(path):
        fail(prog, f"--config {path}: no such file (the config files are in configs/)")
    try:
        config_flags.DEFINE_config_file("config", default, "ml_collections config file",
                                        lock_config=True)
    except (AttributeError, KeyError):  # an override of a field the config does not have
        fail(prog, _unknown_field(argv, prog, default))
    flags.DEFINE_string("workdir", None, "run folder (default runs/<config name>); a folder "
                        "holding checkpoints is resumed")
    if not multi_process:
        return
    flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-process)")
    flags.DEFINE_integer("num_processes", None, "number of processes (multi-process)")
    flags.DEFINE_integer("process_id", None, "this process's index (multi-process)")


def flags_parser(prog: str = PROG):
    """absl's flag parser with one-line errors (for app.run(flags_parser=...))."""
    from absl import flags

    def parse(argv: list[str]) -> list[str]:
        try:
            return flags.FLAGS(argv)
        except flags.Error as e:
            fail(prog, f"{e} (see {_help_command(prog)})")

    return parse


def overrides() -> tuple[str, ...]:
    """The config fields set on the command line (for the resume guard and init_from)."""
    from absl import flags
    from ml_collections import config_flags

    return tuple(config_flags.get_override_values(flags.FLAGS["config"]))


def section_command(argv: Sequence[str], prog: str, section: str
                    ) -> tuple[ml_collections.ConfigDict, str]:
    """The shared start of a post-training command's main (`python -m glm_jax.sft`,
    `python -m glm_jax.rl`), after absl parsed the flags: refuses stray arguments and a
    config without its `section`, quiets orbax's per-save INFO logs unless --verbosity was
    given, and returns (the config, the workdir: --workdir, else runs/<config file name>).
    Exits with one line (code 2) on a user's mistake."""
    from absl import flags, logging

    if len(argv) > 1:
        fail(prog, f"unexpected arguments {list(argv[1:])} (config fields are flags: "
             "--config.train.steps=100)")
    FLAGS = flags.FLAGS
    if not FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    cfg = FLAGS.config
    config_path = FLAGS["config"].config_filename
    if section not in cfg:
        fail(prog, f"{config_path} has no '{section}' section (start from "
             f"configs/{section}_tiny.py)")
    workdir = FLAGS.workdir or os.path.join(
        "runs", os.path.splitext(os.path.basename(config_path))[0])
    return cfg, workdir
