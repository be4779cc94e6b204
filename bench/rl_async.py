"""Synchronous vs asynchronous RL on the same devices split between the roles: runs
`python -m glm_jax.rl` twice (real subprocesses, the exact commands recorded) with
`--config.rl.rollout_devices=R`, once `--config.rl.mode=sync` (rollout, then training,
in turns, on their own meshes) and once `--config.rl.mode=async` (the rollout generating
continuously in a background thread), then compares from their metrics.jsonl:

- the wall time to a fixed number of trained samples (samples with a non-zero loss mask,
  counted after each run's first, compiling, step; async drops stale groups, so it may
  need more steps for as many samples),
- the reward per step and the held-out greedy reward (config.rl.eval_every) of both runs
  (a figure: docs/rl_async_vs_sync.png), the staleness of what was trained and the stale
  groups dropped.

On simulated CPU devices every role shares the same cores, so async shows overlap (the
trainer's idle time behind the rollout goes away), not a speed-up.

    python -m bench.rl_async --workdir /tmp/rl_async --devices 8 --rollout-devices 4 \
        --samples 640 -- --config.init_from=runs/sft_tiny --config.train.steps=20

Everything after `--` goes to both runs. Not a test: minutes long.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = os.path.join(ROOT, "docs")
FIGURE = "rl_async_vs_sync.png"


def time_to_samples(records: list[dict], samples: int) -> tuple[float | None, int]:
    """(seconds of steps after the first until `samples` trained samples, steps taken);
    (None, steps) when the run ends first."""
    seconds, trained = 0.0, 0
    for i, r in enumerate(records[1:], start=2):
        seconds += r["step_seconds"]
        trained += r["trained_samples"]
        if trained >= samples:
            return seconds, i
    return None, len(records)


def plot(runs: dict[str, list[dict]], evals: dict[str, list[dict]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from glm_jax.train.metrics import save_figure

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name, records in runs.items():
        steps = [r["step"] for r in records]
        axes[0].plot(steps, [r["reward"] for r in records], label=f"{name}, sampled", alpha=0.5)
        if evals[name]:
            axes[0].plot([r["step"] for r in evals[name]],
                         [r["eval/reward"] for r in evals[name]], "s-",
                         label=f"{name}, held-out greedy")
        elapsed = np.cumsum([r["step_seconds"] for r in records])
        axes[1].plot(elapsed, np.cumsum([r["trained_samples"] for r in records]), label=name)
    axes[0].set(xlabel="RL step", ylabel="mean reward",
                title="reward per step")
    axes[1].set(xlabel="wall seconds (first step: compilation)",
                ylabel="trained samples", title="trained samples over time")
    for ax in axes:
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path)


def main() -> None:
    argv = sys.argv[1:]
    passthrough = argv[argv.index("--") + 1:] if "--" in argv else []
    own = argv[:argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", required=True)
    p.add_argument("--devices", type=int, default=8, help="simulated CPU devices")
    p.add_argument("--rollout-devices", type=int, default=4)
    p.add_argument("--samples", type=int, default=640,
                   help="trained samples to time (after the first step)")
    p.add_argument("--no-docs", action="store_true", help="print only; do not append")
    args = p.parse_args(own)
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={args.devices}")
    runs, evals, walls, shown = {}, {}, {}, {}
    load_before = os.getloadavg()
    for mode in ("sync", "async"):
        workdir = os.path.join(args.workdir, mode)
        flags = [f"--config.rl.mode={mode}", f"--config.rl.rollout_devices={args.rollout_devices}",
                 *passthrough]
        shown[mode] = " ".join(["python -m glm_jax.rl --workdir", workdir, *flags])
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "glm_jax.rl", "--workdir", workdir, *flags],
                       cwd=ROOT, env=env, check=True)
        walls[mode] = time.perf_counter() - start
        with open(os.path.join(workdir, "metrics.jsonl")) as f:
            everything = [json.loads(line) for line in f if line.strip()]
        runs[mode] = [r for r in everything if "reward" in r]  # training steps
        evals[mode] = [r for r in everything if "eval/reward" in r]
    load_after = os.getloadavg()
    if not args.no_docs:
        plot(runs, evals, os.path.join(DOCS, FIGURE))

    lines = []
    for mode, records in runs.items():
        seconds, steps = time_to_samples(records, args.samples)
        rewards = [r["reward"] for r in records]
        k = max(len(rewards) // 4, 1)
        after = records[1:]
        lines.append(
            f"- {mode}: {len(records)} steps in {walls[mode]:.0f} s wall (first step "
            f"{records[0]['step_seconds']:.0f} s); {args.samples} trained samples after the "
            f"first step in "
            + (f"{seconds:.0f} s ({steps} steps)" if seconds is not None else
               f"more than the run's {sum(r['trained_samples'] for r in after)}")
            + f"; median step {np.median([r['step_seconds'] for r in after]):.1f} s, of which "
            + (f"waiting for the rollout's batch "
               f"{np.median([r['queue_wait_seconds'] for r in after]):.1f} s"
               if mode == "async" else
               f"rollout {np.median([r['rollout_seconds'] for r in after]):.1f} s")
            + "; "
            f"reward first {k} steps {np.mean(rewards[:k]):.3f}, last {k} "
            f"{np.mean(rewards[-k:]):.3f}; staleness of trained tokens max "
            f"{max(r['staleness_max'] for r in records)}, stale groups dropped "
            f"{sum(r['stale_groups'] for r in records)}"
            + ("; held-out greedy reward by step: " + ", ".join(
                f"{r['step']}: {r['eval/reward']:.3f}" for r in evals[mode]) if evals[mode]
               else "") + ".")
    text = f"""
## RL sync vs async on split devices (issue 17, `bench/rl_async.py`)

Machine: the shared 2-core VM, {args.devices} simulated CPU devices,
{args.devices - args.rollout_devices} train / {args.rollout_devices} generate; load average
{load_before[0]:.1f} before, {load_after[0]:.1f} after (1-minute). All devices share the same 2 cores: async shows overlap, not speed-up.

    python -m bench.rl_async {' '.join(own)} -- {' '.join(passthrough)}

which ran

    {shown['sync']}
    {shown['async']}

""" + "\n".join(lines) + (f"\n\n![sync vs async]({FIGURE})\n" if not args.no_docs else "\n")
    print(text)
    if not args.no_docs:
        with open(os.path.join(DOCS, "benchmarks.md"), "a") as f:
            f.write(text)


if __name__ == "__main__":
    main()
