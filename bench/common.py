"""Shared pieces of the benchmarks: configs by name, timing, and
appending a result section to docs/benchmarks.md with the exact command."""

from __future__ import annotations

import argparse
import datetime
import importlib
import os
import platform
import sys
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import ml_collections

from configs.training import add_training_sections
from glm_jax import GlmConfig
from glm_jax import heap
from glm_jax.train.trainer import make_trainer
from sharding.mesh import make_mesh

DOCS = os.path.join(os.path.dirname(__file__), "..", "docs", "benchmarks.md")


def shape_parser(description: str) -> argparse.ArgumentParser:
    """The options every step benchmark shares: config name, batch, sequence, repeats."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--config", default="bench")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--repeats", type=int, default=3)
    return p


def load_config(name: str, **overrides) -> GlmConfig:
    """GlmConfig of configs/<name>.py's model section, with field overrides."""
    fields = importlib.import_module(f"configs.{name}").get_config().model.to_dict()
    return GlmConfig.from_dict({**fields, **overrides})


def jax_train_step(config: GlmConfig, batch: int, seq: int, micro_batches: int = 1):
    """The real glm-jax train step (glm_jax.train.make_trainer: AdamW with the training
    sections' defaults, clipping, bias update) on one device and random tokens:
    (trainer, state, batch); `trainer.step(state, batch)` donates the state."""
    cfg = ml_collections.ConfigDict({"model": config.to_dict()})
    add_training_sections(cfg, steps=1000, batch_size=batch, seq_len=seq, learning_rate=3e-4,
                          warmup_steps=0, checkpoint_every=0, log_every=1)
    cfg.train.micro_batches = micro_batches
    trainer = make_trainer(cfg, make_mesh({"data": 1}, jax.devices()[:1]))
    tokens = jnp.asarray(np.random.RandomState(0).randint(0, config.vocab_size, (batch, seq)))
    data = {"tokens": tokens, "segment_ids": jnp.ones_like(tokens),
            "positions": jnp.broadcast_to(jnp.arange(seq), (batch, seq))}
    return trainer, trainer.init(), data


def time_calls(fn: Callable[[], object], repeats: int) -> list[float]:
    """Wall seconds of `repeats` calls of fn (which must block until its result is ready)."""
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def append_section(title: str, table: str, notes: str = "") -> None:
    """Append `title`, the exact command, the machine and `table` to docs/benchmarks.md."""
    # As typed (`python -m bench.x ...`): the bench modules import each other as a package.
    command = "python " + " ".join(sys.orig_argv[1:])
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    text = (f"\n## {title}\n\n`{command}` ({when}; {os.cpu_count()} cores, "
            f"{platform.machine()}, jax {jax.__version__}; heap {heap.describe()}; load average "
            f"at the end {load}: other jobs shared the cores when it is above ~2)\n\n{table}\n"
            + (f"\n{notes}\n" if notes else ""))
    with open(DOCS, "a") as f:
        f.write(text)
    print(text)
