"""Reinforcement learning on verifiable rewards (synchronous, colocated):
`python -m glm_jax.rl [--config configs/rl_tiny.py] [--workdir runs/rl_tiny]
[--config.init_from=runs/sft_tiny] [--config.train.steps=40] [--config.rl.levels=add1,add2]`.
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

    cfg, workdir = cli.section_command(argv, PROG, "rl")
    report_user_errors(PROG, lambda: run_rl(cfg, workdir, overrides=cli.overrides()))


if __name__ == "__main__":
    cli.define_flags(sys.argv[1:], PROG, DEFAULT_CONFIG, multi_process=False)
    __doc__ = cli.help_text(__doc__, sys.argv[1:], DEFAULT_CONFIG)
    app.run(_main, flags_parser=cli.flags_parser(PROG))
