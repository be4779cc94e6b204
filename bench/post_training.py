"""The post-training demo end to end, as a checked benchmark: pretrain the tiny model, SFT it
with configs/sft_tiny.py's defaults, then RL it, each a real `python ...` subprocess (the
exact commands recorded), and check what the issues ask:

- SFT lifts the held-out accuracy well above the pretrained model's (`--min-sft-lift`,
  default 0.3 absolute, both modes together: a generous bar, the demo reaches ~0.9);
- a short RL run raises the mean reward: the held-out reward sampled at temperature 1
  (config.rl.eval_samples; the expectation the policy gradient climbs), averaged over the
  evaluations after step 0, must exceed step 0's by `--min-rl-gain` (default 0.03). The
  greedy reward is reported beside it.

RL starts from the SFT checkpoint whose held-out non-thinking accuracy is nearest 0.5, on
the SFT task's level (add2), in the non-thinking mode: group-relative advantages carry
signal only where a prompt's samples disagree. The final SFT model answers ~98% of two-digit
sums and samples nearly deterministically (entropy ~0.02 nats per token); on three-digit
sums (~29% right) most groups are all-wrong, 1-4 of 8 carry signal, and 40 steps lowered
the reward (docs/benchmarks.md, "RL from the SFT demo, session 7").

Prints the figures and appends a section to docs/benchmarks.md (wall time of each stage,
accuracies, the evaluations); exits 1 if a check fails. Not a test: ~40 minutes on two
quiet CPU cores (pretraining ~14, SFT ~20, RL ~3).

    python -m bench.post_training --workdir /tmp/post [--base runs/tiny] [--rl-level add2]

--base skips pretraining (a `train.py` workdir of configs/tiny.py).
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
DOCS = os.path.join(ROOT, "docs", "benchmarks.md")
PRETRAIN_STEPS = 2000  # a 200-step base does not copy from its context (docs/benchmarks.md)


def run(args: list[str]) -> tuple[str, float]:
    """Runs `python args...` in the repository; returns (the command as shown, wall seconds).
    A failed stage ends the benchmark with its exit code (the stage printed why)."""
    start = time.perf_counter()
    shown = "python " + " ".join(args)
    code = subprocess.run([sys.executable, *args], cwd=ROOT).returncode
    if code:
        sys.exit(f"bench.post_training: stopped: `{shown}` exited with {code}")
    return shown, time.perf_counter() - start


def evaluations(workdir: str, key: str) -> list[dict]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if key in r]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", required=True)
    p.add_argument("--base", default="", help="a pretrained train.py workdir (skips pretraining)")
    p.add_argument("--rl-level", default="add2", help="the RL level (the SFT demo's task)")
    p.add_argument("--rl-steps", type=int, default=40)
    p.add_argument("--rl-eval-prompts", type=int, default=100,
                   help="held-out prompts (32 by default in the config: too noisy to check)")
    p.add_argument("--min-sft-lift", type=float, default=0.3)
    p.add_argument("--min-rl-gain", type=float, default=0.03)
    p.add_argument("--no-docs", action="store_true", help="print only; do not append")
    args = p.parse_args()
    from glm_jax.rl.levels import parse_levels

    try:
        parse_levels(args.rl_level)
    except ValueError as e:
        p.error(f"--rl-level: {e}")
    if args.base and not os.path.isdir(args.base):
        p.error(f"--base {args.base}: no such folder (a train.py workdir of configs/tiny.py; "
                "leave --base out to pretrain one)")
    os.makedirs(args.workdir, exist_ok=True)
    commands, walls = [], []
    base = args.base
    if not base:
        base = os.path.join(args.workdir, "tiny")
        cmd, wall = run(["train.py", "--workdir", base, f"--config.train.steps={PRETRAIN_STEPS}"])
        commands.append(cmd), walls.append(wall)
    sft = os.path.join(args.workdir, "sft_tiny")
    cmd, wall = run(["-m", "glm_jax.sft", "--workdir", sft, f"--config.init_from={base}",
                     "--config.checkpoint.keep=10"])  # every evaluated step stays on disk
    commands.append(cmd), walls.append(wall)
    sft_evals = evaluations(sft, "eval/accuracy/all")
    saved = {int(d) for d in os.listdir(os.path.join(sft, "checkpoints")) if d.isdigit()}
    start = min((r for r in sft_evals if r["step"] in saved),
                key=lambda r: abs(r["eval/accuracy/non_thinking"] - 0.5))
    rl = os.path.join(args.workdir, f"rl_{args.rl_level}_from_{start['step']}")
    cmd, wall = run(["-m", "glm_jax.rl", "--workdir", rl,
                     f"--config.init_from={os.path.join(sft, 'checkpoints', str(start['step']))}",
                     f"--config.rl.levels={args.rl_level}",
                     f"--config.train.steps={args.rl_steps}",
                     f"--config.rl.eval_prompts={args.rl_eval_prompts}"])
    commands.append(cmd), walls.append(wall)

    before, after = sft_evals[0], sft_evals[-1]
    lift = after["eval/accuracy/all"] - before["eval/accuracy/all"]
    rl_evals = evaluations(rl, "eval/sampled_reward")
    start_reward = rl_evals[0]["eval/sampled_reward"]
    later = float(np.mean([r["eval/sampled_reward"] for r in rl_evals[1:]]))
    checks = [(f"SFT lifts held-out accuracy by >= {args.min_sft_lift}", lift >= args.min_sft_lift),
              (f"RL raises the held-out sampled reward by >= {args.min_rl_gain} (mean of the "
               "later evaluations vs step 0)", later - start_reward >= args.min_rl_gain)]

    def acc(r: dict) -> str:
        return (f"{r['eval/accuracy/all']:.1%} (thinking {r['eval/accuracy/thinking']:.1%}, "
                f"non-thinking {r['eval/accuracy/non_thinking']:.1%})")

    shown = "\n".join(f"    {c}    # {w / 60:.1f} min" for c, w in zip(commands, walls))
    text = f"""
## Post-training demo end to end (issues 15-16, `bench/post_training.py`)

Machine: the shared 2-core VM, load average {os.getloadavg()[0]:.1f} at the end (1-minute);
one process, one CPU device, float32.

    python -m bench.post_training {' '.join(sys.argv[1:])}

which ran (wall time of each):

{shown}

- SFT held-out accuracy (greedy, {len(sft_evals)} evaluations): step {before['step']} {acc(before)};
  step {after['step']} {acc(after)}; by step: {', '.join(f"{r['step']}: {r['eval/accuracy/all']:.1%}" for r in sft_evals)}.
- RL from SFT step {start['step']} (held-out non-thinking accuracy {start['eval/accuracy/non_thinking']:.1%}), level {args.rl_level};
  held-out reward sampled at T=1 by step: {', '.join(f"{r['step']}: {r['eval/sampled_reward']:.3f}" for r in rl_evals)}
  (mean after step 0 {later:.3f} against {start_reward:.3f}); greedy: {', '.join(f"{r['step']}: {r['eval/reward']:.3f}" for r in rl_evals)}.
- Checks: {'; '.join(f"{name}: {'passed' if ok else 'FAILED'}" for name, ok in checks)}.
"""
    print(text)
    if not args.no_docs:
        with open(DOCS, "a") as f:
            f.write(text)
    sys.exit(0 if all(ok for _, ok in checks) else 1)


if __name__ == "__main__":
    main()
