"""The RL command (`python -m glm_jax.rl`, glm_jax.rl.loop): dynamic-sampling refill, bad
flags as one line, and SIGTERM + resume continuing the same curriculum, temperature and
batches (real subprocesses). The reward rising on an easy level from the SFT demo model is
a run of minutes: bench/rl_run.py, reported in docs/benchmarks.md."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import types

import numpy as np
import pytest

from glm_jax.rl.rewards import RewardResult
from glm_jax.rl.sampling import ScoredRound, build_batch, collect
from train_config import OVERRIDES

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
G = 4  # samples per prompt in the refill tests


def _round(group_rewards: list[list[float]], prompt_len: int = 3, width: int = 9,
           routed: bool = True) -> ScoredRound:
    """A scored round of len(group_rewards) prompts x G samples: rows of `prompt_len` prompt
    tokens and a completion of 1 + row % 4 tokens (what the rollout engine returns)."""
    n = len(group_rewards) * G
    rng = np.random.default_rng(n)
    completion = 1 + np.arange(n) % 4
    tokens = np.full((n, width), 0, np.int32)
    for i in range(n):
        tokens[i, :prompt_len + completion[i]] = rng.integers(1, 50, prompt_len + completion[i])
    rollout = types.SimpleNamespace(
        tokens=tokens, prompt_lengths=np.full(n, prompt_len, np.int32),
        completion_lengths=completion.astype(np.int32),
        logprobs=-rng.random((n, width)).astype(np.float32),
        routed_experts=rng.integers(0, 8, (n, width, 2, 3)).astype(np.int32) if routed else None,
        temperature=np.full(n, 1.1, np.float32), prompt_index=np.repeat(np.arange(n // G), G),
        generated_tokens=int(completion.sum()))
    results = [RewardResult(float(x), "correct" if x else "wrong_answer")
               for group in group_rewards for x in group]
    return ScoredRound(rollout, [None] * len(group_rewards), results, 0.5, 0.1)


def test_refill_fills_the_batch_and_counts_what_it_filtered():
    script = [
        [[0, 0, 0, 0], [1, 0, 0, 1], [1, 1, 1, 1], [0, 1, 0, 0]],  # 2 with signal
        [[1, 0, 1, 1], [0, 0, 0, 0]],  # +1
        [[0, 1, 1, 1], [1, 0, 0, 0]],  # +2: 5 >= 4, one surplus
    ]
    asked = []

    def run_round(round_, count):
        asked.append((round_, count))
        return _round(script[round_])

    got = collect(run_round, prompts=4, over_sampling_prompts=2, max_extra_prompts=10)
    assert asked == [(0, 4), (1, 2), (2, 2)]
    s = got.stats
    assert (s.rounds, s.prompts_sampled, s.filtered_groups) == (3, 8, 3)
    assert (s.filtered_all_pass, s.filtered_all_fail) == (1, 2)
    assert (s.surplus_groups, s.padded_groups) == (1, 0)
    assert got.kept == [(0, 1), (0, 3), (1, 0), (2, 0)] and got.padded == []
    assert got.all_rewards().size == 8 * G  # the curriculum sees every sample scored

    batch = build_batch(got, samples=G, seq_len=12, pad_id=0, eps_low=0.2, eps_high=0.3)
    assert batch["tokens"].shape == (16, 12) and batch["routed_experts"].shape == (16, 12, 2, 3)
    # Row 0 of the batch is round 0, prompt 1, sample 0: its completion (1 token) is trained.
    first = got.rounds[0].rollout
    np.testing.assert_array_equal(batch["tokens"][0, :9], first.tokens[4])
    np.testing.assert_array_equal(batch["loss_mask"][0], [0, 0, 0, 1] + [0] * 8)
    np.testing.assert_array_equal(batch["loss_mask"].sum(1), [1, 2, 3, 4] * 4)
    # GRPO advantages of the group [1, 0, 0, 1]: +-1 / std (ddof=1) = +-0.866.
    np.testing.assert_allclose(batch["advantages"][:4], [0.866, -0.866, -0.866, 0.866],
                               atol=1e-3)
    np.testing.assert_array_equal(batch["temperature"], np.float32(1.1))
    np.testing.assert_array_equal(batch["eps_high"], np.float32(0.3))
    np.testing.assert_array_equal(batch["rollout_logprobs"][:, 9:], 0.0)


def test_refill_stops_at_its_budget_and_pads_with_masked_groups():
    def run_round(round_, count):
        return _round([[0, 0, 0, 0]] * (count - 1) + [[0, 1, 0, 0]], routed=False)

    got = collect(run_round, prompts=4, over_sampling_prompts=3, max_extra_prompts=5)
    s = got.stats
    # 4 + 3 + 2 prompts (the budget of 5 extra is spent), one group with signal per round.
    assert (s.rounds, s.prompts_sampled, len(got.kept), s.padded_groups) == (3, 9, 3, 1)
    assert s.filtered_groups == 6 and s.filtered_all_fail == 6
    batch = build_batch(got, samples=G, seq_len=9, pad_id=0, eps_low=0.2, eps_high=0.3)
    assert batch["tokens"].shape == (16, 9) and "routed_experts" not in batch
    assert batch["loss_mask"][12:].sum() == 0 and (batch["advantages"][12:] == 0).all()
    assert batch["loss_mask"][:12].sum() > 0
    with pytest.raises(ValueError, match="train.seq_len=8"):
        build_batch(got, samples=G, seq_len=8, pad_id=0, eps_low=0.2, eps_high=0.3)
    # No refill budget: one round, whatever it holds.
    assert collect(run_round, prompts=4, over_sampling_prompts=3,
                   max_extra_prompts=0).stats.rounds == 1


# A very small model from random weights (tests/train_config.py's sizes), two prompts of
# four samples per step. The temperature rule's patience of 1 step makes the temperature
# climb every step (the reward stays 0), so a resume that lost its state would show.
FLAGS = {**{k: v for k, v in OVERRIDES.items() if k.startswith("model.")},
         "model.num_nextn_predict_layers": 0, "init_from": "",
         "train.batch_size": 8, "train.seq_len": 40, "checkpoint.every": 100_000,
         "rl.levels": "add1,add2", "rl.prompts_per_step": 2, "rl.samples_per_prompt": 4,
         "rl.max_new_tokens": 8, "rl.over_sampling_prompts": 2, "rl.max_extra_prompts": 2,
         "rl.temperature_patience": 1, "rl.temperature_step": 0.02, "rl.max_temperature": 2.0,
         "rl.eval_every": 0}  # the held-out evaluation: tests/test_rl_async.py


def _env(cache: str) -> dict:
    return dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1",
                XLA_FLAGS="--xla_force_host_platform_device_count=1",
                JAX_COMPILATION_CACHE_DIR=cache, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")


def _cmd(workdir: str, **changes) -> list[str]:
    return [sys.executable, "-m", "glm_jax.rl", "--workdir", workdir,
            *[f"--config.{k}={v}" for k, v in {**FLAGS, **changes}.items()]]


def _metrics(workdir: str) -> list[dict]:
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def test_sigterm_then_resume_continues_the_same_curriculum_and_batches(tmp_path):
    workdir, cache = str(tmp_path / "rl"), str(tmp_path / "xla")
    proc = subprocess.Popen(_cmd(workdir, **{"train.steps": 1000}), env=_env(cache), cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 600  # a hang guard, not a timing assertion
        while len(_metrics(workdir)) < 2:
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() < deadline, "no RL progress"
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0 and "stopped by SIGTERM" in output, output
    saved = max(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())
    assert saved >= 2 and len(_metrics(workdir)) == saved

    again = subprocess.run(_cmd(workdir, **{"train.steps": saved + 1}), env=_env(cache),
                           cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout + again.stderr
    assert f"resumed from step {saved}" in again.stdout
    # The reference: one uninterrupted run to the same step.
    ref_dir = str(tmp_path / "ref")
    ref = subprocess.run(_cmd(ref_dir, **{"train.steps": saved + 1}), env=_env(cache),
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert ref.returncode == 0, ref.stdout + ref.stderr
    got, want = _metrics(workdir), _metrics(ref_dir)
    assert [r["step"] for r in got] == list(range(1, saved + 2)) == [r["step"] for r in want]
    for a, b in zip(got, want):
        for key in ("batch_digest", "level", "temperature", "eps_low", "eps_high",
                    "curriculum_window_pass_rate", "policy_version", "reward", "loss"):
            assert a[key] == b[key], (a["step"], key, a[key], b[key])
    # With patience 1 the temperature rises from step 3 on (the first update sets the
    # reward baseline), every step, across the resume too.
    temps = [r["temperature"] for r in got]
    assert all(b > a for a, b in zip(temps[1:], temps[2:])) and temps[-1] > temps[0], temps
    assert got[-1]["run_start"] and not want[-1]["run_start"]
    assert os.path.getsize(os.path.join(workdir, "rl_curves.png")) > 1000


@pytest.mark.parametrize("flag, message", [
    ("--config.rl.levles=add1", "did you mean --config.rl.levels?"),
    ("--config.rl.levels=add1,div", "config.rl.levels='add1,div': unknown level(s) ['div']"),
    ("--config.train.batch_size=12", "set --config.train.batch_size=64"),
    ("--config.init_from=/nonexistent/sft", "config.init_from=/nonexistent/sft: no such"),
    ("--config.rl.mode=overlap", "config.rl.mode='overlap': must be 'sync'"),
    ("--config.rl.mode=async", "config.rl.rollout_devices=0: async mode needs the rollout"),
    ("--config.init_from= --config.rl.rollout_devices=9",  # the tests' 8 CPU devices
     "leave the trainer at least one of the 8 devices; on CPU, simulate 18 devices with "
     "XLA_FLAGS=--xla_force_host_platform_device_count=18"),
])
def test_bad_flags_are_one_line_exit_2(flag, message, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "glm_jax.rl", "--workdir", str(tmp_path),
                           *flag.split()], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("python -m glm_jax.rl: error: "), lines
    assert message in lines[0]
