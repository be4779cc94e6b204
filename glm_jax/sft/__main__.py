"""Supervised fine-tuning: `python -m glm_jax.sft --config.init_from=runs/tiny
[--config configs/sft_tiny.py] [--workdir runs/sft_tiny] [--config.sft.data=a.jsonl,b.jsonl]
[--config.train.steps=150]`. Every config field is a flag. A workdir holding checkpoints is
resumed exactly. Bad config or data: one line naming it, exit code 2.
"""

import os
import sys

from absl import app, flags
from ml_collections import config_flags

_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

config_flags.DEFINE_config_file("config", os.path.join(_ROOT, "configs", "sft_tiny.py"),
                                "ml_collections config file", lock_config=True)
flags.DEFINE_string("workdir", None, "run folder (default runs/<config name>); a folder "
                    "holding checkpoints is resumed")


def _main(argv):
    if len(argv) > 1:
        print(f"python -m glm_jax.sft: unexpected arguments {argv[1:]} (config fields are "
              "flags: --config.train.steps=100)", file=sys.stderr)
        sys.exit(2)
    from absl import logging

    from glm_jax.sft.train import prepare, run_sft

    FLAGS = flags.FLAGS
    if not FLAGS["verbosity"].present:  # orbax logs every save at INFO
        logging.set_verbosity(logging.WARNING)
    cfg = FLAGS.config
    if "sft" not in cfg:
        print(f"python -m glm_jax.sft: {FLAGS['config'].config_filename} has no 'sft' "
              "section (start from configs/sft_tiny.py)", file=sys.stderr)
        sys.exit(2)
    workdir = FLAGS.workdir or os.path.join(
        "runs", os.path.splitext(os.path.basename(FLAGS["config"].config_filename))[0])
    try:
        prepared = prepare(cfg)
    except (ValueError, FileNotFoundError) as e:
        print(f"python -m glm_jax.sft: {e}", file=sys.stderr)
        sys.exit(2)
    run_sft(cfg, workdir, prepared=prepared)


if __name__ == "__main__":
    app.run(_main)
