"""The `bench` train step of two git revisions of this repository, side by side in one run:
`python -m bench.compare_revisions --base <commit>` (the working tree is the other side).

Each side runs in a process of its own, from its own source tree (the base is extracted
with `git archive` into a temporary folder), builds the step with its own
`bench.common.jax_train_step`, and reports the seconds to compile the step and the seconds
of each timed step; the processes take turns, --steps-per-turn steps each, the first of a
turn untimed (see bench/train_step.py for why turns). Used for refactors that must not
slow the step down."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tarfile
import tempfile

import numpy as np

from bench.common import append_section

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Runs inside each side's tree: build, compile (timed), then serve turns on stdin/stdout.
WORKER = r"""
import json, sys, time
import jax
from bench.common import jax_train_step, load_config
config = load_config(sys.argv[1])
made, state, data = jax_train_step(config, int(sys.argv[2]), int(sys.argv[3]))
t = time.perf_counter()
# Either side's API: a Trainer (lower(batch)) or a jitted step function (lower(state, batch)).
lowered = made.lower(data) if hasattr(made, "init") else made.lower(state, data)
compiled = lowered.compile()
compile_s = time.perf_counter() - t
state, m = compiled(state, data)
jax.block_until_ready(m["loss"])
print(json.dumps({"compile": compile_s}), flush=True)
for line in sys.stdin:
    times = []
    for _ in range(int(line)):
        t = time.perf_counter()
        state, m = compiled(state, data)
        jax.block_until_ready(m["loss"])
        times.append(time.perf_counter() - t)
    print(json.dumps({"times": times, "loss": float(m["loss"])}), flush=True)
"""


def extract(commit: str, dest: str) -> None:
    archive = os.path.join(dest, "src.tar")
    subprocess.run(["git", "-C", ROOT, "archive", "-o", archive, commit], check=True)
    with tarfile.open(archive) as tar:
        tar.extractall(dest, filter="data")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", required=True, help="git commit to compare the working tree to")
    p.add_argument("--config", default="bench")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--steps-per-turn", type=int, default=3)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        extract(args.base, tmp)
        sides = {f"base {args.base[:8]}": tmp, "working tree": ROOT}
        procs, compile_s = {}, {}
        for name, tree in sides.items():  # one at a time: compilation is not timed against
            env = dict(os.environ, PYTHONPATH=tree)
            proc = subprocess.Popen([sys.executable, "-c", WORKER, args.config,
                                     str(args.batch), str(args.seq)], cwd=tree, env=env,
                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            line = proc.stdout.readline()
            if not line:
                raise RuntimeError(f"the {name} worker died while building its step "
                                   f"(exit code {proc.wait()})")
            compile_s[name] = json.loads(line)["compile"]
            procs[name] = proc
        times = {name: [] for name in sides}
        for _ in range(args.rounds):
            for name, proc in procs.items():
                proc.stdin.write(f"{args.steps_per_turn}\n")
                proc.stdin.flush()
                line = proc.stdout.readline()
                if not line:
                    raise RuntimeError(f"the {name} worker died during a turn (exit code "
                                       f"{proc.wait()}; -9 is the kernel's OOM killer)")
                times[name] += json.loads(line)["times"][1:]
        for proc in procs.values():
            proc.stdin.close()
            proc.wait()
    base = float(np.median(times[next(iter(sides))]))
    rows = []
    for name, ts in times.items():
        sec = float(np.median(ts))
        rows.append(f"| {name} | {sec:.2f} | {min(ts):.2f}-{max(ts):.2f} | {base / sec:.2f}x | "
                    f"{compile_s[name]:.1f} |")
        print(rows[-1], flush=True)
    append_section(
        f"Train step of `{args.config}`: working tree against {args.base[:8]}",
        "| source | s/step (median) | range | speed vs base | compile s |\n"
        "|---|---|---|---|---|\n" + "\n".join(rows),
        f"batch {args.batch}x{args.seq}, float32, each side's bench.common.jax_train_step "
        f"(AdamW, clipping, bias update); {args.rounds} turns each of {args.steps_per_turn} "
        "steps, alternated, the first of each turn untimed; compile = lower + compile of the "
        "step, once.")


if __name__ == "__main__":
    main()
