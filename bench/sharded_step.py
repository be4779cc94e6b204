"""The real train step of the `bench` config on 8 simulated CPU devices, per mesh layout,
against one device of the same CPU: `python -m bench.sharded_step`.

Each layout builds the training loop's own trainer (`glm_jax.train.make_trainer`: the
state created straight into the rules' shardings, AdamW with the config's schedule, one
step jitted with the state / batch shardings and traced under `jax.set_mesh`), compiles
the step once, and times calls of that executable. The bytes each
collective sends per device per step are read from its compiled HLO by the scale plan's
parser (`sharding.plan.collective_bytes`).

The 8 devices are simulated on the same cores as the single device, so the ratio shows the
cost of partitioning (collectives, padding, resharding), not a speed-up. The one-device step
is timed first and last; ratios are to the mean of the two.
"""

from __future__ import annotations

import os

# Simulated devices must be requested before jax initialises its backend.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import importlib  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

from bench.common import append_section, shape_parser  # noqa: E402
from glm_jax.train import loop  # noqa: E402
from glm_jax.train.trainer import make_trainer  # noqa: E402
from sharding.mesh import make_mesh, parse_mesh, resolve_axes  # noqa: E402
from sharding.plan import COLLECTIVES, collective_bytes  # noqa: E402

LAYOUTS = ["data=8", "fsdp=8", "expert=8", "data=2,expert=2,tensor=2", "fsdp=2,expert=4"]
MiB = 1024 ** 2


def measure(cfg, spec: str, devices: list, steps: int) -> dict:
    """Compile and time the loop's train step on a mesh `spec` over `devices`."""
    model_cfg = loop.validate(cfg)
    mesh = make_mesh(resolve_axes(parse_mesh(spec), len(devices)), devices)
    trainer = make_trainer(cfg, mesh)
    state = trainer.init()
    t = cfg.train
    tokens = np.random.default_rng(0).integers(
        0, model_cfg.vocab_size, (t.batch_size, t.seq_len), dtype=np.int32)
    batch = {"tokens": tokens, "segment_ids": np.ones_like(tokens),
             "positions": np.broadcast_to(np.arange(t.seq_len, dtype=np.int32), tokens.shape)}
    batch = {k: jax.device_put(v, trainer.batch_sharding) for k, v in batch.items()}

    t0 = time.perf_counter()
    compiled = trainer.lower(batch).compile()
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    sent = collective_bytes(compiled.as_text(), mesh.size)
    times, losses = [], []
    for i in range(steps + 1):  # call 0 warms up (allocations, thread pools)
        t0 = time.perf_counter()
        state, metrics = compiled(state, batch)
        jax.block_until_ready((state, metrics))
        if i:
            times.append(time.perf_counter() - t0)
        losses.append(float(metrics["loss"]))
    if not all(np.isfinite(losses)):
        raise RuntimeError(f"{spec}: non-finite loss {losses}")
    print(f"  {spec}: step {statistics.median(times):.3f} s (of {[round(x, 2) for x in times]}), "
          f"compile {compile_s:.0f} s, losses {[round(x, 4) for x in losses]}", flush=True)
    return {"step": statistics.median(times), "compile": compile_s, "sent": sent,
            "temp": mem.temp_size_in_bytes, "loss0": losses[0]}


def main(argv: list[str] | None = None) -> None:
    parser = shape_parser(__doc__.split("\n\n")[0])
    # A global batch must divide over 8 batch shards: 8 x 512 is the bench's 4 x 1024 tokens.
    parser.set_defaults(batch=8, seq=512)
    parser.add_argument("--layers", type=int, default=None,
                        help="num_hidden_layers instead of the config's 6 (data=8 keeps 8 "
                             "replicas of params + AdamW state in one host's memory)")
    parser.add_argument("--layouts", default=";".join(LAYOUTS),
                        help="';'-separated mesh specs over 8 devices")
    parser.add_argument("--no-write", action="store_true", help="do not append to the docs")
    args = parser.parse_args(argv)
    if jax.device_count() < 8:
        raise SystemExit(f"needs 8 simulated devices, jax sees {jax.device_count()}")

    cfg = importlib.import_module(f"configs.{args.config}").get_config()
    cfg.train.batch_size, cfg.train.seq_len = args.batch, args.seq
    if args.layers is not None:
        cfg.model.num_hidden_layers = args.layers
    m = cfg.model
    load = os.getloadavg()[0]
    print(f"{args.config} config: {m.num_hidden_layers} layers ({m.first_k_dense_replace} dense), "
          f"{m.n_routed_experts} experts top-{m.num_experts_per_tok}, moe_backend "
          f"{m.moe_backend}; batch {args.batch} x {args.seq}; load average {load:.1f}",
          flush=True)

    one = jax.devices()[:1]
    results = {"1 device (first)": measure(cfg, "data=1", one, args.repeats)}
    for spec in filter(None, args.layouts.split(";")):
        results[spec] = measure(cfg, spec, jax.devices()[:8], args.repeats)
    results["1 device (last)"] = measure(cfg, "data=1", one, args.repeats)
    base = (results["1 device (first)"]["step"] + results["1 device (last)"]["step"]) / 2

    kinds = [k for k in COLLECTIVES if any(r["sent"].get(k) for r in results.values())]
    head = ("| layout | step (s) | vs 1 device | compile (s) | temp / device (GiB) | "
            + " | ".join(f"{k} (MiB)" for k in kinds) + " |")
    rows = [head, "|" + "---|" * (5 + len(kinds))]
    for name, r in results.items():
        rows.append(f"| {name} | {r['step']:.2f} | {r['step'] / base:.2f}x | {r['compile']:.0f} | "
                    f"{r['temp'] / 1024 ** 3:.2f} | "
                    + " | ".join(f"{r['sent'].get(k, 0.0) / MiB:.1f}" for k in kinds) + " |")
    table = "\n".join(rows)
    notes = (f"{args.config} config with num_hidden_layers={m.num_hidden_layers}, global batch "
             f"{args.batch} x {args.seq}, AdamW, the loop's step (make_trainer); median of "
             f"{args.repeats} steps after one warm-up call; load average {load:.1f} before and "
             f"{os.getloadavg()[0]:.1f} after the run on {os.cpu_count()} cores. Collective "
             "columns: bytes each device sends per step (sharding.plan.collective_bytes; scan bodies counted once "
             "per trip). Ratios are to the mean of the two one-device runs.")
    print(table)
    if not args.no_write:
        append_section("Train step on 8 simulated devices per mesh layout (issue 4)", table,
                       notes)


if __name__ == "__main__":
    main()
