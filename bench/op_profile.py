"""Where one train step's time goes, op by op: the `bench` train step (the real
glm_jax.train.make_trainer step, AdamW) is traced with XLA:CPU's per-thunk trace events, and each
thunk's own time (minus the thunks nested in it) is credited to the model part named by the
`jax.named_scope` in its op metadata (attention, moe/router, moe/routed_experts, ...),
forward or backward. Run as `python -m bench.op_profile`.

Thunk times are wall times on the thread that ran the thunk: XLA:CPU may run two
independent thunks at once on the two cores, and a matmul's helper thread is not a thunk
of its own, so the column sums to more or less than the step's wall time; shares are of
the summed thunk time."""

from __future__ import annotations

import os

# XLA reads its flags when the backend starts: set before jax is imported.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_cpu_enable_xprof_traceme=true").strip()

import collections  # noqa: E402
import glob  # noqa: E402
import gzip  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402

from bench.common import (append_section, jax_train_step, load_config,  # noqa: E402
                          shape_parser)

# Most specific first: an op inside moe/routed_experts/expert_matmuls is an expert matmul.
PARTS = (("expert_matmuls", "MoE: routed expert matmuls (block_swiglu)"),
         ("routed_experts", "MoE: dispatch (sort, scatter into blocks, gather, mix)"),
         ("router", "MoE: router, top-k"),
         ("shared_expert", "MoE: shared expert"),
         ("moe", "MoE: rest (norm, residual, counts)"),
         ("core", "attention: core (scores, softmax, weighted sum)"),
         ("attention", "attention: norm, q/k/v/o projections, QK-norm, RoPE"),
         ("mlp", "dense MLP (first layer)"),
         ("mtp", "MTP layer"),
         ("lm_head", "final norm + lm_head"),
         ("cross_entropy", "cross-entropy"),
         ("optimizer", "clipping + AdamW + bias update"))
REST = "unscoped: layer scan (per-layer slices, stacked grads), embedding, zeros"


def part_of(op_name: str) -> str:
    for scope, label in PARTS:
        if re.search(rf"[(/]{scope}[)/]", op_name):
            return label
    return REST


def op_names(hlo_text: str) -> dict[str, str]:
    """HLO instruction name -> its op_name metadata (the thunk names in the trace)."""
    out = {}
    for m in re.finditer(r"^\s*(?:ROOT )?%?([\w.\-]+) = .*?op_name=\"([^\"]*)\"", hlo_text,
                         re.M):
        out[m.group(1)] = m.group(2)
    return out


def self_times(trace_file: str) -> dict[str, float]:
    """Seconds per event name, each event's duration minus its nested events (per thread)."""
    with gzip.open(trace_file) as f:
        trace = json.load(f)
    events = [e for e in (trace["traceEvents"] if isinstance(trace, dict) else trace)
              if e.get("ph") == "X"]
    threads = collections.defaultdict(list)
    for e in events:
        threads[e["tid"]].append(e)
    own = collections.defaultdict(float)
    for evs in threads.values():
        evs.sort(key=lambda e: (e["ts"], -e.get("dur", 0)))
        stack = []
        for e in evs:
            while stack and stack[-1]["ts"] + stack[-1].get("dur", 0) <= e["ts"]:
                stack.pop()
            if stack:
                own[stack[-1]["name"]] -= e.get("dur", 0) / 1e6
            stack.append(e)
            own[e["name"]] += e.get("dur", 0) / 1e6
    return own


def main() -> None:
    args = shape_parser(__doc__).parse_args()
    config = load_config(args.config)
    trainer, state, data = jax_train_step(config, args.batch, args.seq)
    compiled = trainer.lower(data).compile()
    names = op_names(compiled.as_text())
    for _ in range(2):  # warm up: the first calls fault in memory
        state, metrics = compiled(state, data)
        jax.block_until_ready(metrics["loss"])
    with tempfile.TemporaryDirectory() as d:
        with jax.profiler.trace(d, create_perfetto_trace=True):
            t = time.perf_counter()
            state, metrics = compiled(state, data)
            jax.block_until_ready(metrics["loss"])
            wall = time.perf_counter() - t
        own = self_times(glob.glob(f"{d}/**/perfetto_trace.json.gz", recursive=True)[0])

    parts = collections.defaultdict(lambda: [0.0, 0.0])
    for name, sec in own.items():
        if name in names:
            parts[part_of(names[name])]["transpose(" in names[name]] += sec
    total = sum(sum(v) for v in parts.values())
    rows = [f"| {label} | {fwd:.2f} | {bwd:.2f} | {fwd + bwd:.2f} | {(fwd + bwd) / total:.0%} |"
            for label, (fwd, bwd) in sorted(parts.items(), key=lambda kv: -sum(kv[1]))]
    print("\n".join(rows))
    append_section(
        f"Op profile of one `{args.config}` train step (issue 7)",
        "| part | forward (s) | backward (s) | total (s) | share |\n|---|---|---|---|---|\n"
        + "\n".join(rows) + f"\n| all thunks | | | {total:.2f} | 100% |",
        f"batch {args.batch}x{args.seq}, float32, dropless `buckets` experts, AdamW. The traced "
        f"step took {wall:.2f} s of wall time. Each row is the thunks' own time (nested "
        "thunks subtracted) on the thread that ran them, credited by the `jax.named_scope` "
        "in their op metadata; backward = ops under `transpose(...)`. XLA:CPU can run two "
        "thunks at once on the two cores and a matmul's helper thread has no event of its "
        "own, so the total is not the wall time.")


if __name__ == "__main__":
    main()
