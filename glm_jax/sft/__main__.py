"""Supervised fine-tuning: `python -m glm_jax.sft --config.init_from=runs/tiny
[--config configs/sft_tiny.py] [--workdir runs/sft_tiny] [--config.sft.data=a.jsonl,b.jsonl]
[--config.train.steps=150]`. Every config field is a flag (`--help` lists them with their
defaults). A workdir holding checkpoints is resumed exactly. Bad flags, config or data: one
line naming it, exit code 2.
"""

import os
import sys

from absl import app

from glm_jax.cli_errors import report_user_errors
from glm_jax.train import cli

PROG = "python -m glm_jax.sft"
DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))), "configs", "sft_tiny.py")


def _main(argv):
    from glm_jax.sft.train import prepare, run_sft

    from glm_jax.train import run_config

    cfg, workdir = cli.section_command(argv, PROG, "sft")

    def checked():  # init_from and the resumed run first: they cost JSON reads, the data more
        run_config.resolve(cfg, workdir, cli.overrides())
        return prepare(cfg)

    prepared = report_user_errors(PROG, checked, also=(ValueError, FileNotFoundError))
    report_user_errors(PROG, lambda: run_sft(cfg, workdir, prepared=prepared,
                                             overrides=cli.overrides()))


if __name__ == "__main__":
    cli.define_flags(sys.argv[1:], PROG, DEFAULT_CONFIG, multi_process=False)
    __doc__ = cli.help_text(__doc__, sys.argv[1:], DEFAULT_CONFIG)
    app.run(_main, flags_parser=cli.flags_parser(PROG))
