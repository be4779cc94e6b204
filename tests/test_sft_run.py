"""The SFT command on the pretraining loop: a very short run of a very small model on the
embedded task set writes checkpoints, metrics (losses, trained tokens, held-out accuracy
per mode) and plots, and resumes where it stopped; init_from accepts a run's workdir; bad
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
from glm_jax.sft.train import run_sft
from glm_jax.train import checkpoint
from train_config import OVERRIDES

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(**changes):
    cfg = sft_tiny.get_config()
    model = {k: v for k, v in OVERRIDES.items() if k.startswith("model.")}
    for key, value in {**model, "train.batch_size": 8, "train.seq_len": 320,
                       "train.steps": 3, "train.log_every": 1, "train.peak_flops": 1e11,
                       "checkpoint.every": 2, "sft.tasks": "add,sub",
                       "sft.train_problems": 24, "sft.eval_problems": 1,
                       "sft.eval_at_start": False, "sft.eval_max_new_tokens": 4,
                       **changes}.items():
        section, name = key.split(".")
        cfg[section][name] = value
    return cfg


def test_short_sft_run_writes_checkpoints_and_metrics_and_resumes(tmp_path):
    workdir = str(tmp_path / "sft")
    cfg = _config()
    first = run_sft(cfg, workdir, progress=False, stop_at=2)
    assert first["step"] == 2 and sorted(first["losses"]) == [1, 2] and not first["eval"]
    assert first["truncated"] == 0  # arithmetic conversations fit 320 tokens whole
    second = run_sft(cfg, workdir, progress=False)  # finds step 2 and continues
    assert sorted(second["losses"]) == [3] and int(second["state"].step) == 3
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2", "3"]

    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3]
    # Only assistant tokens are targets: far fewer than the batch's 8 x 320 positions.
    assert all(0 < r["valid_tokens"] < 8 * 320 * 0.5 for r in steps)
    evals = [r for r in records if "eval/accuracy/all" in r]
    assert [r["step"] for r in evals] == [3]
    for key in ("thinking", "non_thinking", "task/add"):
        assert 0.0 <= evals[0][f"eval/accuracy/{key}"] <= 1.0
    with open(os.path.join(workdir, "eval", "step_3.jsonl")) as f:
        played = [json.loads(line) for line in f]
    assert sorted(r["thinking"] for r in played) == [False, True]
    for name in ("loss_curve.png", "eval_accuracy.png"):
        assert os.path.getsize(os.path.join(workdir, name)) > 1000

    # The workdir is a valid init_from for this model, and names the mismatch for another.
    model_cfg = GlmConfig.from_dict(cfg.model.to_dict())
    checkpoint.check_init_from(workdir, model_cfg)
    other = GlmConfig.from_dict({**cfg.model.to_dict(), "hidden_size": 48})
    with pytest.raises(ValueError, match="config.model differs"):
        checkpoint.check_init_from(workdir, other)


@pytest.mark.parametrize("flag, message", [
    ("--config.sft.data=/nonexistent/c.jsonl", "/nonexistent/c.jsonl: cannot open"),
    ("--config.sft.tasks=add,div", "config.sft.tasks='add,div': unknown task(s) ['div']"),
])
def test_sft_cli_bad_input_is_one_line_exit_2(flag, message):
    proc = subprocess.run([sys.executable, "-m", "glm_jax.sft", flag], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [f"python -m glm_jax.sft: " +
                                               proc.stderr.strip().split(": ", 1)[1]]
    assert message in proc.stderr
