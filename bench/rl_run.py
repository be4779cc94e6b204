"""An RL run of `python -m glm_jax.rl` as a benchmark: runs the command (a subprocess, the
exact command recorded), then summarizes its metrics.jsonl: the held-out greedy reward
(config.rl.eval_every) per evaluation, the sampled reward on the first and last steps, trainer tokens/s, rollout tokens/s, the share of wall time in rollout, reward
and training, the dynamic-sampling counts; copies the run's rl_curves.png to docs/ and
appends the section to docs/benchmarks.md.

    python -m bench.rl_run --workdir /tmp/rl -- --config.init_from=runs/sft_tiny \
        --config.train.steps=40

Everything after `--` goes to `python -m glm_jax.rl` unchanged. Not a test: minutes long.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = os.path.join(ROOT, "docs")


def summarize(records: list[dict], first_k: int = 5) -> dict:
    """Figures of a run's metrics records (the steps of one run, in order)."""
    rewards = [r["reward"] for r in records]
    timed = [r for r in records if r.get("trainer_tokens_per_sec") is not None]
    k = min(first_k, max(len(rewards) // 2, 1))

    def med(key: str, rows=timed) -> float | None:
        vals = [r[key] for r in rows if r.get(key) is not None]
        return float(np.median(vals)) if vals else None

    wall = sum(r["step_seconds"] for r in timed) or float("nan")
    return {
        "steps": len(records), "reward_first": float(np.mean(rewards[:k])),
        "reward_last": float(np.mean(rewards[-k:])), "mean_over": k,
        "levels": sorted({r["level_name"] for r in records}),
        "trainer_tokens_per_sec": med("trainer_tokens_per_sec"),
        "rollout_tokens_per_sec": med("rollout_tokens_per_sec"),
        "rollout_share": sum(r["rollout_seconds"] for r in timed) / wall,
        "reward_share": sum(r["reward_seconds"] for r in timed) / wall,
        "train_share": sum(r["train_seconds"] for r in timed) / wall,
        "logprob_share": sum(r["logprob_seconds"] for r in timed) / wall,
        "step_seconds": med("step_seconds"),
        "filtered_groups": sum(r["filtered_groups"] for r in records),
        "prompts_sampled": sum(r["prompts_sampled"] for r in records),
        "padded_groups": sum(r["padded_groups"] for r in records),
        "first_step_seconds": records[0]["step_seconds"] if records else None,
    }


def main() -> None:
    argv = sys.argv[1:]
    passthrough = argv[argv.index("--") + 1:] if "--" in argv else []
    own = argv[:argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", required=True)
    p.add_argument("--no-docs", action="store_true", help="print only; do not append")
    args = p.parse_args(own)
    cmd = [sys.executable, "-m", "glm_jax.rl", "--workdir", args.workdir, *passthrough]
    shown = "python -m glm_jax.rl --workdir " + " ".join([args.workdir, *passthrough])
    load_before = os.getloadavg()
    start = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, check=True)
    wall = time.perf_counter() - start
    load_after = os.getloadavg()
    with open(os.path.join(args.workdir, "metrics.jsonl")) as f:
        everything = [json.loads(line) for line in f if line.strip()]
    records = [r for r in everything if "reward" in r]  # training steps
    evals = [r for r in everything if "eval/reward" in r]
    s = summarize(records)
    levels = sorted({k[len("eval/reward/"):] for r in evals for k in r
                     if k.startswith("eval/reward/")})
    eval_rows = "\n".join(f"| {r['step']} | {r['eval/reward']:.3f} | "
                          + " | ".join(f"{r[f'eval/reward/{n}']:.3f}" for n in levels) + " |"
                          for r in evals)
    eval_table = (f"""
Held-out greedy reward (config.rl.eval_every; fixed prompts per level, temperature 0):

| RL step | all | {' | '.join(levels)} |
|---|---|{'---|' * len(levels)}
{eval_rows}
""" if evals else "")
    fmt = lambda x, spec=".0f": "n/a" if x is None else format(x, spec)  # noqa: E731
    figure = None
    if not args.no_docs and os.path.exists(os.path.join(args.workdir, "rl_curves.png")):
        figure = "rl_curves_tiny.png"
        shutil.copy(os.path.join(args.workdir, "rl_curves.png"), os.path.join(DOCS, figure))
    text = f"""
## RL (issue 16, `python -m glm_jax.rl`): reward curve, trainer tokens/s, wall-time shares

Machine: the shared 2-core VM; load average {load_before[0]:.1f} before, {load_after[0]:.1f}
after (1-minute). One process, one CPU device, float32, colocated synchronous mode.

    {shown}

- {s['steps']} RL steps in {wall:.0f} s wall (the first, compiling, {fmt(s['first_step_seconds'], '.0f')} s;
  then a median {fmt(s['step_seconds'], '.1f')} s per step); levels trained: {', '.join(s['levels'])}.
- Mean reward (all samples of a step, filtered groups included), mean of the first
  {s['mean_over']} steps: {s['reward_first']:.3f}; of the last {s['mean_over']}: {s['reward_last']:.3f}.
- Trainer tokens/s (batch rows x seq_len per second of optimizer steps, padding included):
  median {fmt(s['trainer_tokens_per_sec'])}; rollout tokens/s (generated tokens per second of
  rollout wall time): median {fmt(s['rollout_tokens_per_sec'])}.
- Share of wall time after the first step: rollout {s['rollout_share']:.0%}, reward
  {s['reward_share']:.0%}, training {s['train_share']:.0%} (of which the old-logprob forward
  {s['logprob_share']:.0%}); the rest is batch building, metrics and checkpoints.
- Dynamic sampling: {s['filtered_groups']} of {s['prompts_sampled']} sampled groups filtered
  (all rewards equal); {s['padded_groups']} batch slots padded with masked groups.
""" + eval_table + ("\n![RL curves](rl_curves_tiny.png)\n" if figure else "")
    print(text)
    if not args.no_docs:
        with open(os.path.join(DOCS, "benchmarks.md"), "a") as f:
            f.write(text)


if __name__ == "__main__":
    main()
