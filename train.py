"""Pretrain or fine-tune GLM-4.5-style models.

    python train.py [--config configs/tiny.py] [--workdir runs/tiny] [--config.FIELD=VALUE ...]

Plain `python train.py` trains the tiny config on the embedded default data (the Python
standard library's source, byte-level) on CPU. Every config field is a flag (listed below
with its default), e.g. --config.train.steps=1000 --config.optimizer.name=muon.

A rerun with the same --workdir resumes from its latest checkpoint; it refuses a changed
model architecture or optimizer (naming the fields), and stops at once when the run is
already at config.train.steps.

Fine-tuning: --config.init_from=CKPT starts from the weights of CKPT (a converted hub
checkpoint from `glm-jax-convert to-jax`, a train.py workdir, or one of its step folders)
with a fresh optimizer and data stream. The model architecture is the checkpoint's, so no
--config.model.* flags are needed; compute options (dtype, param_dtype, moe_backend,
capacity_factor, attention_backend, remat_policy) still come from the config and flags.

Own data: --config.data.path=DIR, a token folder from `python -m glm_jax.train.data prepare`.

On CPU hosts, `bin/glm-jax-python train.py ...` runs it with glibc's huge-page malloc
(faster steps; see glm_jax/heap.py).

Multi-process: pass --coordinator_address, --num_processes, --process_id (or set
JAX_COORDINATOR_ADDRESS etc.).
"""

import sys

from absl import app


def _main(argv):
    from glm_jax.cli_errors import fail, report_user_errors
    from glm_jax.train.cli import PROG

    if len(argv) > 1:
        fail(PROG, f"unexpected arguments {argv[1:]}; flags are spelled --name=value "
             f"(python {PROG} --help)")
    from glm_jax.train.loop import main

    report_user_errors(PROG, main)


if __name__ == "__main__":
    from glm_jax.train.cli import define_flags, flags_parser, help_text

    define_flags(sys.argv[1:])
    __doc__ = help_text(__doc__, sys.argv[1:])  # absl's --help prints the main module's doc
    app.run(_main, flags_parser=flags_parser())
