"""End-to-end runs of the training loop: the loss falls, resume is exact, SIGTERM leaves a
checkpoint that resumes, and a two-process (jax.distributed, CPU) run matches one
process over the same global batch."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from glm_jax.train import loop
from train_config import flag_args, small_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 20  # 2N
N = 10


def _metrics(workdir) -> list[dict]:
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    """2N steps in one go (the reference for the other tests)."""
    workdir = str(tmp_path_factory.mktemp("full"))
    out = loop.run(small_config(**{"train.steps": STEPS, "checkpoint.every": N}), workdir,
                   progress=False)
    return workdir, out


def test_loss_falls_and_run_writes_its_outputs(full_run):
    workdir, out = full_run
    losses = [out["losses"][s] for s in range(1, STEPS + 1)]
    # Byte-level text: the first steps learn the byte distribution (from ln(320) ~ 5.8 + MTP).
    assert np.mean(losses[-3:]) < losses[0] - 1.5, losses
    records = _metrics(workdir)
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    for key in ("loss", "mtp_loss", "grad_norm", "lr", "tokens_per_sec", "mfu",
                "load_imbalance", "dropped_fraction"):
        assert key in records[-1], key
    assert records[-1]["tokens_per_sec"] > 0 and records[-1]["mtp_loss"] > 0
    for name in ("loss_curve.png", "expert_load.png"):
        assert os.path.getsize(os.path.join(workdir, name)) > 1000
    assert os.listdir(os.path.join(workdir, "tensorboard"))
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == [str(N), str(STEPS)]


def test_resume_is_exact(full_run, tmp_path):
    _, full = full_run
    workdir = str(tmp_path)
    cfg = small_config(**{"train.steps": STEPS, "checkpoint.every": N})
    first = loop.run(cfg, workdir, progress=False, stop_at=N)
    assert first["step"] == N
    second = loop.run(cfg, workdir, progress=False)  # a fresh start that finds step N
    losses = {**first["losses"], **second["losses"]}
    assert sorted(second["losses"]) == list(range(N + 1, STEPS + 1))
    for s in range(1, STEPS + 1):
        assert losses[s] == full["losses"][s], (s, losses[s], full["losses"][s])
    for key in ("params", "biases", "opt_state", "step"):
        jax.tree.map(np.testing.assert_array_equal, jax.device_get(getattr(second["state"], key)),
                     jax.device_get(getattr(full["state"], key)))


def _env(devices: int, cache: str) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
               JAX_COMPILATION_CACHE_DIR=cache,
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    return env


def test_sigterm_saves_a_checkpoint_that_resumes(tmp_path):
    workdir, cache = str(tmp_path / "run"), str(tmp_path / "xla")
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), "--workdir", workdir,
           *flag_args(**{"train.steps": 100_000, "checkpoint.every": 100_000})]
    proc = subprocess.Popen(cmd, env=_env(1, cache), cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 600  # a hang guard, not a timing assertion
        while len(_metrics(workdir)) < 3:
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() < deadline, "no training progress"
            time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, output
    assert "stopped by SIGTERM" in output, output
    saved = int(max(os.listdir(os.path.join(workdir, "checkpoints")), key=int))
    assert saved >= 3
    # Run again with the same workdir: it resumes at the saved step and trains on.
    cmd[cmd.index("--config.train.steps=100000")] = f"--config.train.steps={saved + 2}"
    again = subprocess.run(cmd, env=_env(1, cache), cwd=ROOT, capture_output=True,
                           text=True, timeout=600)
    assert again.returncode == 0, again.stdout + again.stderr
    assert f"resumed from step {saved}" in again.stdout
    steps = [r["step"] for r in _metrics(workdir)]
    assert steps[-2:] == [saved + 1, saved + 2] and steps.count(saved + 1) == 1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_match_one_process(full_run, tmp_path):
    """Two processes of one device each (jax.distributed on localhost), each feeding its
    own half of every global batch, against the in-process 8-device run of the fixture."""
    _, full = full_run
    steps = 4
    port = _free_port()
    workdir, cache = str(tmp_path / "run"), str(tmp_path / "xla")
    procs = [subprocess.Popen(
        [sys.executable, os.path.join(ROOT, "train.py"), "--workdir", workdir,
         "--coordinator_address", f"localhost:{port}", "--num_processes", "2",
         "--process_id", str(i),
         # Losses 1..4 see only the updates of steps 1..3, all inside the 3-step warmup, so
         # the learning rates equal those of the fixture's 20-step schedule.
         *flag_args(**{"train.steps": steps, "train.mesh": "data=2", "checkpoint.every": 0})],
        env=_env(1, cache), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True) for i in range(2)]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out
    records = _metrics(workdir)  # written by process 0 only
    assert [r["step"] for r in records] == list(range(1, steps + 1))
    # Same global batches and init; only the device count (2 vs 8) changes the order of
    # the cross-device reductions, hence a float32-rounding tolerance.
    np.testing.assert_allclose([r["loss"] for r in records],
                               [full["losses"][s] for s in range(1, steps + 1)], rtol=2e-5)
