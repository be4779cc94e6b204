"""The SFT command on the pretraining loop: a very short run of a very small model on the
embedded task set (`python -m glm_jax.sft` in a subprocess) writes checkpoints, metrics
(losses, trained tokens, held-out accuracy per mode) and plots, and resumes where it stopped; init_from accepts a run's workdir; bad
config -> one line, exit 2. Not timed: the accuracy a real run reaches is in
docs/benchmarks.md."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from configs import sft_tiny
from glm_jax.config import GlmConfig
from glm_jax.train import run_config
from train_config import OVERRIDES

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# A very small model (tests/train_config.py's sizes) on short arithmetic conversations.
FLAGS = {**{k: v for k, v in OVERRIDES.items() if k.startswith("model.")},
         "train.batch_size": 4, "train.seq_len": 320, "train.log_every": 1,
         "train.peak_flops": 1e11, "checkpoint.every": 2, "sft.tasks": "add,sub",
         "sft.train_problems": 16, "sft.eval_problems": 1, "sft.eval_at_start": False,
         "sft.eval_max_new_tokens": 4, "sft.eval_batch_size": 2}


def _sft(workdir: str, cache: str, steps: int, **flags) -> subprocess.CompletedProcess:
    # One device and a shared compilation cache: the resumed run reuses the first's
    # compiled step and generation programs.
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1",
               XLA_FLAGS="--xla_force_host_platform_device_count=1",
               JAX_COMPILATION_CACHE_DIR=cache, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    cmd = [sys.executable, "-m", "glm_jax.sft", "--workdir", workdir,
           *[f"--config.{k}={v}" for k, v in {**FLAGS, "train.steps": steps, **flags}.items()]]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=600)  # a hang guard, not a timing assertion
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    """A 2-step SFT run (workdir, compilation cache, process): the resume test trains it on,
    the distillation test takes it as its teacher."""
    root = tmp_path_factory.mktemp("sft")
    workdir, cache = str(root / "sft"), str(root / "xla")
    return workdir, cache, _sft(workdir, cache, steps=2)


def test_short_sft_run_writes_checkpoints_and_metrics_and_resumes(first_run, tmp_path):
    workdir, cache, first = first_run
    assert "0 of 32 conversations longer than train.seq_len=320 are cut" in first.stdout
    second = _sft(workdir, cache, steps=3)  # finds step 2 and trains on
    assert "resumed from step 2" in second.stdout, second.stdout
    assert "eval step 3: held-out accuracy" in second.stdout
    # Orbax also keeps the first step it saw (step 1); 2 is the interval's, 3 the end's.
    assert {"2", "3"} <= set(os.listdir(os.path.join(workdir, "checkpoints")))

    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3]
    # Only assistant tokens are targets: ~60% of these arithmetic rows (744-783 of 1280
    # positions seen), against ~95% of the positions without the mask.
    assert all(0 < r["valid_tokens"] < 4 * 320 * 0.75 for r in steps)
    evals = [r for r in records if "eval/accuracy/all" in r]
    assert [r["step"] for r in evals] == [2, 3]  # the end of each run
    for key in ("thinking", "non_thinking", "task/add"):
        assert 0.0 <= evals[-1][f"eval/accuracy/{key}"] <= 1.0
    with open(os.path.join(workdir, "eval", "step_3.jsonl")) as f:
        played = [json.loads(line) for line in f]
    assert sorted(r["thinking"] for r in played) == [False, True]
    for name in ("loss_curve.png", "eval_accuracy.png"):
        assert os.path.getsize(os.path.join(workdir, name)) > 1000

    # The workdir is a valid init_from: a fine-tune of it takes its model, whatever the
    # config file's model section says.
    cfg = sft_tiny.get_config()
    model = {**cfg.model.to_dict(), **{k.split(".")[1]: v for k, v in FLAGS.items()
                                       if k.startswith("model.")}}
    cfg.init_from = workdir
    cfg.model.hidden_size = 48
    resolved, resume_step = run_config.resolve(cfg, str(tmp_path / "again"))
    assert resume_step is None
    assert GlmConfig.from_dict(resolved.model.to_dict()) == GlmConfig.from_dict(model)


def test_sft_distills_a_saved_checkpoint(first_run, tmp_path):
    """--config.sft.teachers: 2 steps toward a teacher checkpoint (the first run's), the KL
    in metrics.jsonl; a student with another vocabulary is refused in one line."""
    teacher, cache, _ = first_run
    workdir = str(tmp_path / "distill")
    proc = _sft(workdir, cache, steps=2, **{"sft.teachers": teacher})
    assert "distilling from 1 teacher(s)" in proc.stdout, proc.stdout
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        steps = [r for r in map(json.loads, f) if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2]
    for r in steps:
        # ce_weight 0: the loss is the KL plus the MTP depth's next-token loss (weight 0.3).
        assert r["kl"] > 0 and r["kl/teacher_0"] == pytest.approx(r["kl"], rel=1e-6)
        assert r["loss"] == pytest.approx(r["kl"] + 0.3 * r["mtp_loss"], rel=1e-5)
        assert r["distilled_tokens"] == r["valid_tokens"] > 0

    bad = subprocess.run([sys.executable, "-m", "glm_jax.sft", f"--config.sft.teachers={teacher}",
                          "--config.model.vocab_size=400", "--workdir", str(tmp_path / "bad")],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2, bad.stderr
    assert bad.stderr.strip() == (
        f"python -m glm_jax.sft: error: config.sft.teachers: teacher {teacher} has "
        "vocab_size=320 but the student has vocab_size=400; distillation needs the same "
        "vocabulary (use a teacher trained with the student's tokenizer)")


@pytest.mark.parametrize("flag, message", [
    ("--config.sft.data=/nonexistent/c.jsonl", "/nonexistent/c.jsonl: cannot open"),
    ("--config.sft.tasks=add,div", "config.sft.tasks='add,div': unknown task(s) ['div']"),
    ("--config.train.stpes=3", "did you mean --config.train.steps?"),
])
def test_sft_cli_bad_input_is_one_line_exit_2(flag, message):
    proc = subprocess.run([sys.executable, "-m", "glm_jax.sft", flag], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == ["python -m glm_jax.sft: " +
                                               proc.stderr.strip().split(": ", 1)[1]]
    assert message in proc.stderr
