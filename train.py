"""Pretrain GLM-4.5-style models: `python train.py [--config configs/tiny.py]
[--workdir runs/tiny] [--config.train.steps=200] [--config.model.num_experts_per_tok=2]`.

On CPU hosts, `bin/glm-jax-python train.py ...` runs it with glibc's huge-page malloc
(faster steps; see glm_jax/heap.py). Plain `python train.py` trains the tiny config on the embedded default data (the Python
standard library's source, byte-level) on CPU. Multi-process: pass --coordinator_address,
--num_processes, --process_id (or set JAX_COORDINATOR_ADDRESS etc.).
"""

import os

from absl import app, flags
from ml_collections import config_flags

_HERE = os.path.dirname(os.path.abspath(__file__))

config_flags.DEFINE_config_file("config", os.path.join(_HERE, "configs", "tiny.py"),
                                "ml_collections config file", lock_config=True)
flags.DEFINE_string("workdir", None, "run folder (default runs/<config name>); a folder "
                    "holding checkpoints is resumed")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-process)")
flags.DEFINE_integer("num_processes", None, "number of processes (multi-process)")
flags.DEFINE_integer("process_id", None, "this process's index (multi-process)")


def _main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from glm_jax.train.loop import main

    main()


if __name__ == "__main__":
    app.run(_main)
