"""Reinforcement learning on verifiable rewards:
`python -m glm_jax.rl [--config configs/rl_tiny.py] [--workdir runs/rl_tiny]
[--config.init_from=runs/sft_tiny] [--config.train.steps=40] [--config.rl.levels=add1,add2]
[--config.rl.mode=sync|async] [--config.rl.rollout_devices=N]`.
Modes: sync (default; rollout then training; colocated, or with rollout_devices=N on a
mesh of its own) and async (the rollout generates continuously on its own devices).
Multi-process (jax.distributed; sync mode): --coordinator_address, --num_processes,
--process_id.
Every config field is a flag (`--help` lists them with their defaults). A workdir holding
checkpoints is resumed exactly (same curriculum level, prompts and samples); SIGTERM saves
and exits. Bad flags or config: one line naming it, exit code 2.
"""

import os
import sys

from absl import app

from glm_jax.cli_errors import report_user_errors
from glm_jax.train import cli

PROG = "python -m glm_jax.rl"
DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))), "configs", "rl_tiny.py")


def _main(argv):
    from glm_jax.rl.loop import run_rl

    from absl import flags

    from glm_jax.train.loop import maybe_initialize_distributed

    cfg, workdir = cli.section_command(argv, PROG, "rl")
    F = flags.FLAGS
    maybe_initialize_distributed(F.coordinator_address, F.num_processes, F.process_id)
    report_user_errors(PROG, lambda: run_rl(cfg, workdir, overrides=cli.overrides()))


if __name__ == "__main__":
    cli.define_flags(sys.argv[1:], PROG, DEFAULT_CONFIG)
    __doc__ = cli.help_text(__doc__, sys.argv[1:], DEFAULT_CONFIG)
    app.run(_main, flags_parser=cli.flags_parser(PROG))
