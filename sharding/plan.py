"""Scale plan: lower and compile the full train step ahead of time on simulated CPU devices
or for a Cloud TPU slice (abstract shapes only: nothing is allocated) and print per-device
memory and the bytes each collective moves per step; for TPU also the compiler's FLOPs and
cost-model step time.

    python -m sharding.plan --config configs/glm4_5.py --mesh fsdp=16,expert=16 \\
        --seq-len 4096 --global-batch 1024 [--target tpu-v5p-512]

The layout that fits 95 GiB per device, and what is specific to the CPU lowering (attention
backend, bf16 computed in f32, scheduler, collectives): docs/scaling.md.

`--layers N` compiles a model with N MoE layers instead of the config's count (the dense
prefix and MTP layers are kept) and, with `--extrapolate`, compiles a second size and
extrapolates every figure linearly to the real depth. The layers run under one `nnx.scan`,
so each MoE layer adds exactly the same parameters, optimizer state, saved activations and
collectives: two sizes determine the line, and the extrapolation is exact up to XLA making a
different buffer-sharing choice at different depths (the CLI prints both measured points).

This is a CLI at the top of the import graph, like train.py: it imports glm_jax inside
`main`. The library modules of `sharding/` (mesh, rules, expert_parallel) never do.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import time
from dataclasses import dataclass

# COLLECTIVES and collective_bytes are also imported from here (bench/sharded_step.py, tests)
from sharding.hlo_stats import (COLLECTIVES, collective_bytes, hbm_bytes,  # noqa: F401
                                kernel_flops, matmul_flops, splash_flops)

GiB = 1024 ** 3


@dataclass
class Plan:
    params: float  # bytes per device
    opt_state: float
    other_state: float  # router biases, counters
    temp: float  # activations and scratch (XLA temp allocation)
    code: float
    total: float  # arguments + temp + outputs not aliased to arguments
    collectives: dict[str, float]  # kind -> bytes per device per step (see collective_bytes)
    compile_seconds: float  # wall: trace + lower + XLA compile
    step_seconds: float | None = None  # measured median, only with --run-steps
    flops: float = 0.0  # per device per step, the compiler's cost analysis
    analytic_flops: float = 0.0  # per device per step, glm_jax.train.metrics.flops_per_token
    cost_model_seconds: float | None = None  # the TPU compiler's estimate (optimal_seconds)
    kernel_flops: dict[str, float] | None = None  # per device, as Pallas kernels declare
    kernel_flops_once: dict[str, float] | None = None  # the same, loop bodies counted once
    grouped_matmul_fill: float = 1.0  # mean real rows / static rows of the expert buffers
    lower_seconds: float = 0.0  # wall: tracing the step and lowering it to StableHLO
    compile_cpu_seconds: float = 0.0  # process CPU time (all threads) of trace + compile
    # From the HLO, loop bodies once per trip (the cost analysis counts them once):
    matmul_flops: float = 0.0  # per device per step, XLA's dots and convolutions
    attention_kernel_flops: float = 0.0  # the splash kernels' (they declare none)
    hbm_bytes: float = 0.0  # operands + results of the top-level ops (an upper bound)
    compiler_bytes: float = 0.0  # the cost analysis's "bytes accessed" (bodies once)

    @property
    def flops_at_real_rows(self) -> float:
        """`flops` with the grouped-matmul kernels (megablox gmm/tgmm) counted at the rows
        they compute: they declare 2 M K N for all M rows of their static receive buffer, but
        visit only the row tiles that hold routed rows (the grid's tile count is computed at
        run time). Summed over devices the routed rows are exactly tokens x k, so the mean
        per device is `grouped_matmul_fill` of the buffer; per-group partial tiles (under
        one 128-row tile per local expert) are not counted."""
        declared = sum(v for k, v in (self.kernel_flops_once or {}).items()
                       if k in ("gmm", "tgmm"))  # counted as `flops` counts them
        return self.flops - (1.0 - self.grouped_matmul_fill) * declared

    @property
    def executed_flops(self) -> float:
        """FLOPs per device per step the chip executes, every loop trip counted: XLA's
        matmuls, the splash kernels, and the grouped-matmul kernels at their real rows
        (elementwise work left out). Includes rematerialization, unlike analytic_flops."""
        kernels = self.kernel_flops or {}
        grouped = sum(v for k, v in kernels.items() if k in ("gmm", "tgmm"))
        other = sum(v for k, v in kernels.items() if k not in ("gmm", "tgmm"))
        return (self.matmul_flops + self.attention_kernel_flops
                + self.grouped_matmul_fill * grouped + other)


@dataclass
class StepEstimate:
    """A roofline estimate of one step's time on a chip, from the compiled program's own
    counts (not a measurement; the TPU cost model gives none for a train step)."""
    compute: float  # executed FLOPs / peak bf16 FLOP/s
    hbm: float  # HBM bytes / HBM bandwidth
    collectives: dict[str, float]  # kind -> bytes sent / one torus axis's ring bandwidth
    overlapped: float  # max(compute, hbm, all collectives): everything overlaps
    serial: float  # max(compute, hbm) + all collectives: no collective overlaps
    mfu_overlapped: float  # analytic model FLOPs / (seconds x peak)
    mfu_serial: float


def step_estimate(plan: Plan, chip) -> StepEstimate:
    """`plan` on `chip` (sharding.topology.Chip). Every collective is priced as a ring
    along one torus axis (two of the chip's ports; an axis spanning several torus
    dimensions would have more), so the collective terms are upper bounds; so is the HBM
    term (see hlo_stats.hbm_bytes), while compute at the bf16 peak is a lower bound."""
    compute = plan.executed_flops / chip.peak_bf16_flops
    hbm = plan.hbm_bytes / chip.hbm_bytes_per_second
    coll = {k: v / chip.ring_bytes_per_second for k, v in plan.collectives.items()}
    comm = sum(coll.values())
    overlapped, serial = max(compute, hbm, comm), max(compute, hbm) + comm

    def mfu(seconds: float) -> float:
        return plan.analytic_flops / seconds / chip.peak_bf16_flops if seconds else 0.0

    return StepEstimate(compute, hbm, coll, overlapped, serial, mfu(overlapped), mfu(serial))


# ------------------------------------------------------------------------ compiling
def _load_config(path: str):
    spec = importlib.util.spec_from_file_location("plan_config", path)
    if spec is None or spec.loader is None:
        raise FileNotFoundError(f"--config {path}: not a Python config file")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def check_inputs(model_cfg, mesh_axes: dict[str, int], *, global_batch: int,
                 micro_batches: int) -> None:
    """Raise ValueError (naming the flag) when the mesh cannot shard the model or batch."""
    from sharding.mesh import check_model_fits_mesh

    check_model_fits_mesh(mesh_axes, num_experts=model_cfg.n_routed_experts,
                          num_heads=model_cfg.num_attention_heads,
                          num_kv_heads=model_cfg.num_key_value_heads)
    shards = mesh_axes.get("data", 1) * mesh_axes.get("fsdp", 1) * mesh_axes.get("expert", 1)
    if global_batch % shards or (global_batch // shards) % micro_batches:
        raise ValueError(f"--global-batch {global_batch} does not divide over the {shards} "
                         f"batch shards of {mesh_axes} and {micro_batches} micro-batches")


def compile_plan(model_cfg, mesh_axes: dict[str, int], *, seq_len: int, global_batch: int,
                 micro_batches: int = 1, show_hlo: str | None = None,
                 run_steps: int = 0, devices: list | None = None) -> Plan:
    """AOT-compile one train step (the training loop's own: `glm_jax.train.make_trainer`
    with AdamW, clipping and the bias update, `micro_batches` parts) and measure it. With
    `run_steps` > 0 the state is really created (random init) and the step is run once to
    warm up and then `run_steps` times; the median is `Plan.step_seconds`."""
    import jax
    import jax.numpy as jnp
    import ml_collections

    from configs.training import add_training_sections
    from glm_jax.train.metrics import flops_per_token
    from glm_jax.train.trainer import make_trainer
    from sharding.expert_parallel import receive_buffer_rows
    from sharding.mesh import make_mesh, mesh_platform

    check_inputs(model_cfg, mesh_axes, global_batch=global_batch, micro_batches=micro_batches)
    mesh = make_mesh(mesh_axes, devices)
    shards = mesh_axes.get("data", 1) * mesh_axes.get("fsdp", 1) * mesh_axes.get("expert", 1)
    cfg = ml_collections.ConfigDict({"model": model_cfg.to_dict()})
    add_training_sections(cfg, steps=1000, batch_size=global_batch, seq_len=seq_len,
                          learning_rate=1e-4, warmup_steps=0, checkpoint_every=0, log_every=1)
    cfg.train.micro_batches = micro_batches
    trainer = make_trainer(cfg, mesh)
    tok = jax.ShapeDtypeStruct((global_batch, seq_len), jnp.int32,
                               sharding=trainer.batch_sharding)
    batch = {"tokens": tok, "positions": tok, "segment_ids": tok}
    # Wall time depends on what else runs on the host; process CPU time (all threads) less
    # so. Tracing + lowering is Python (flax, JAX), the rest is the XLA compiler.
    t0, cpu0 = time.perf_counter(), time.process_time()
    lowered = trainer.lower(batch)
    lower_seconds = time.perf_counter() - t0
    compiled = lowered.compile()
    seconds = time.perf_counter() - t0
    cpu_seconds = time.process_time() - cpu0
    mem = compiled.memory_analysis()
    hlo = compiled.as_text()
    if show_hlo:
        with open(show_hlo + ".tmp", "w") as f:
            f.write(hlo)
        os.replace(show_hlo + ".tmp", show_hlo)

    def per_device(tree) -> float:
        return float(sum(x.dtype.itemsize * _prod(x.sharding.shard_shape(x.shape))
                         for x in jax.tree.leaves(tree)))

    abstract = trainer.abstract_state
    p = per_device(abstract.params)
    o = per_device(abstract.opt_state)
    b = per_device(abstract.biases) + 8
    args, out, alias = (mem.argument_size_in_bytes, mem.output_size_in_bytes,
                        mem.alias_size_in_bytes)
    step_seconds = None
    if run_steps:
        real = trainer.init()
        tokens = jax.random.randint(jax.random.key(0), tok.shape, 0, model_cfg.vocab_size)
        data = {"tokens": tokens, "segment_ids": jnp.ones_like(tokens),
                "positions": jnp.broadcast_to(jnp.arange(seq_len, dtype=jnp.int32), tok.shape)}
        data = jax.device_put(data, trainer.batch_sharding)
        times = []
        for i in range(run_steps + 1):
            t0 = time.perf_counter()
            real, metrics = compiled(real, data)
            jax.block_until_ready((real, metrics))
            if i:
                times.append(time.perf_counter() - t0)
            print(f"  step {i}: {time.perf_counter() - t0:.2f} s, loss "
                  f"{float(metrics['loss']):.4f}, dropped {int(metrics['dropped'])}", flush=True)
        step_seconds = sorted(times)[len(times) // 2]
    fill = 1.0
    ep = mesh_axes.get("expert", 1)
    if ep > 1 and mesh_platform(mesh) != "cpu":  # the ragged transport's receive buffer
        n_local = global_batch // micro_batches // shards * seq_len
        k = model_cfg.num_experts_per_tok
        fill = n_local * k / receive_buffer_rows(n_local, k, model_cfg.n_routed_experts, ep,
                                                 model_cfg.capacity_factor)
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost  # older jax: one per program
    optimal = cost.get("optimal_seconds")
    tpu = mesh_platform(mesh) == "tpu"
    return Plan(params=p, opt_state=o, other_state=b, temp=float(mem.temp_size_in_bytes),
                code=float(mem.generated_code_size_in_bytes),
                total=float(args + mem.temp_size_in_bytes + out - alias),
                collectives=collective_bytes(hlo, mesh.size), compile_seconds=seconds,
                step_seconds=step_seconds, flops=float(cost.get("flops", 0.0)),
                analytic_flops=flops_per_token(model_cfg, seq_len) * global_batch * seq_len
                / mesh.size,
                cost_model_seconds=float(optimal) if optimal and optimal > 0 else None,
                kernel_flops=kernel_flops(hlo),
                kernel_flops_once=kernel_flops(hlo, per_trip=False),
                grouped_matmul_fill=min(1.0, fill), lower_seconds=lower_seconds,
                compile_cpu_seconds=cpu_seconds,
                matmul_flops=matmul_flops(hlo) if tpu else 0.0,
                attention_kernel_flops=splash_flops(hlo) if tpu else 0.0,
                hbm_bytes=hbm_bytes(hlo) if tpu else 0.0,
                compiler_bytes=float(cost.get("bytes accessed", 0.0)))


def _prod(values) -> int:
    out = 1
    for v in values:
        out *= v
    return out


def extrapolate(a: Plan, la: int, b: Plan, lb: int, target: int) -> Plan:
    """The line through (la, a) and (lb, b), evaluated at `target` layers."""
    def line(x: float, y: float) -> float:
        return x + (y - x) * (target - la) / (lb - la)

    kinds = set(a.collectives) | set(b.collectives)
    return Plan(*(line(getattr(a, f), getattr(b, f)) for f in
                  ("params", "opt_state", "other_state", "temp", "code", "total")),
                collectives={k: line(a.collectives.get(k, 0.0), b.collectives.get(k, 0.0))
                             for k in kinds},
                compile_seconds=a.compile_seconds + b.compile_seconds,
                flops=line(a.flops, b.flops), analytic_flops=line(a.analytic_flops,
                                                                  b.analytic_flops),
                cost_model_seconds=(line(a.cost_model_seconds, b.cost_model_seconds)
                                    if a.cost_model_seconds and b.cost_model_seconds
                                    else None),
                kernel_flops={k: line((a.kernel_flops or {}).get(k, 0.0),
                                      (b.kernel_flops or {}).get(k, 0.0))
                              for k in set(a.kernel_flops or {}) | set(b.kernel_flops or {})},
                grouped_matmul_fill=a.grouped_matmul_fill,
                lower_seconds=a.lower_seconds + b.lower_seconds,
                compile_cpu_seconds=a.compile_cpu_seconds + b.compile_cpu_seconds,
                matmul_flops=line(a.matmul_flops, b.matmul_flops),
                attention_kernel_flops=line(a.attention_kernel_flops,
                                            b.attention_kernel_flops),
                hbm_bytes=line(a.hbm_bytes, b.hbm_bytes),
                compiler_bytes=line(a.compiler_bytes, b.compiler_bytes))


def format_plan(plan: Plan, title: str, hbm_gib: float | None = None, chip=None) -> str:
    """chip: the TPU chip (sharding.topology.Chip) for the step-time estimate and MFU."""
    peak_flops = chip.peak_bf16_flops if chip else None
    rows = [("parameters", plan.params), ("optimizer state", plan.opt_state),
            ("router biases + counters", plan.other_state),
            ("temporaries (activations)", plan.temp),
            ("total (args + temp + non-aliased outputs)", plan.total)]
    lines = [title] + [f"  {name:<44s}{v / GiB:10.2f} GiB" for name, v in rows]
    if hbm_gib:
        lines.append(f"  {'fits ' + str(hbm_gib) + ' GiB':<44s}"
                     f"{'yes' if plan.total <= hbm_gib * GiB else 'NO':>10s}")
    lines.append("  collectives, bytes sent per device per step:")
    for kind in sorted(plan.collectives):
        lines.append(f"    {kind:<42s}{plan.collectives[kind] / GiB:10.2f} GiB")
    if plan.flops and plan.analytic_flops:
        lines.append(f"  compiled FLOPs per device {plan.flops:.4g}, analytic "
                     f"{plan.analytic_flops:.4g}: {plan.flops / plan.analytic_flops:.2f}x")
        if plan.kernel_flops:
            kernels = ", ".join(f"{k} {v:.3g}" for k, v in sorted(plan.kernel_flops.items()))
            lines.append(f"    Pallas kernels as declared, per step (loops x trips): {kernels}")
        if plan.grouped_matmul_fill < 1.0 and plan.kernel_flops:
            real = plan.grouped_matmul_fill * sum(plan.kernel_flops.get(k, 0.0)
                                                  for k in ("gmm", "tgmm"))
            lines.append(f"    grouped matmuls per step at their real rows: {real:.4g}")
        lines.append("    (the TPU cost analysis counts each loop body once; the kernel "
                     "lines count trips)")
        if plan.grouped_matmul_fill < 1.0 and plan.kernel_flops:
            lines.append(f"    grouped matmuls at their real rows ({plan.grouped_matmul_fill:.3f}"
                         f" of the buffer): {plan.flops_at_real_rows:.4g} = "
                         f"{plan.flops_at_real_rows / plan.analytic_flops:.2f}x analytic")
    if plan.cost_model_seconds:
        lines.append(f"  step time, compiler cost model (estimate): "
                     f"{plan.cost_model_seconds:.3f} s")
        if peak_flops and plan.analytic_flops:
            mfu = plan.analytic_flops / plan.cost_model_seconds / peak_flops
            lines.append(f"  implied MFU at {peak_flops / 1e12:.0f} TFLOP/s (estimate): "
                         f"{100 * mfu:.1f}%")
    if chip is not None and plan.executed_flops:
        est = step_estimate(plan, chip)
        lines.append(f"  executed FLOPs per device (every trip; XLA matmuls "
                     f"{plan.matmul_flops:.4g} + splash {plan.attention_kernel_flops:.4g} + "
                     f"grouped matmuls at real rows): {plan.executed_flops:.4g} = "
                     f"{plan.executed_flops / plan.analytic_flops:.2f}x analytic")
        lines.append(f"  HBM bytes of the top-level ops (every trip) {plan.hbm_bytes / GiB:.1f}"
                     f" GiB; the cost analysis (bodies once) {plan.compiler_bytes / GiB:.1f} GiB")
        lines.append(f"  step time, ROOFLINE ESTIMATE on {chip.generation} "
                     f"({chip.peak_bf16_flops / 1e12:.0f} TFLOP/s, HBM "
                     f"{chip.hbm_bytes_per_second / 1e9:.0f} GB/s, ring "
                     f"{chip.ring_bytes_per_second / 1e9:.0f} GB/s per collective):")
        lines.append(f"    compute {est.compute:.3f} s, HBM {est.hbm:.3f} s, collectives "
                     + ", ".join(f"{k} {v:.3f} s" for k, v in sorted(est.collectives.items())))
        lines.append(f"    all overlapped {est.overlapped:.3f} s (MFU "
                     f"{100 * est.mfu_overlapped:.1f}%), collectives not overlapped {est.serial:.3f} s (MFU "
                     f"{100 * est.mfu_serial:.1f}%)")
    lines.append(f"  (compile {plan.compile_seconds:.0f} s wall, of which trace + lower "
                 f"{plan.lower_seconds:.0f} s; {plan.compile_cpu_seconds:.0f} s CPU; load "
                 f"average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores)")
    if plan.step_seconds is not None:
        lines.append(f"  train step, median: {plan.step_seconds:.3f} s")
    return "\n".join(lines)


PROG = "python -m sharding.plan"


def main(argv: list[str] | None = None) -> None:
    # The CLI side of glm-jax (one-line errors, exit code 2), as the other entry points.
    from glm_jax.cli_errors import ArgumentParser, fail

    parser = ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="configs/*.py with get_config().model")
    parser.add_argument("--mesh", required=True, help="e.g. fsdp=16,expert=16")
    parser.add_argument("--seq-len", type=int, required=True)
    parser.add_argument("--global-batch", type=int, required=True)
    parser.add_argument("--layers", type=int, default=None,
                        help="compile with this many MoE layers instead of the config's")
    parser.add_argument("--extrapolate", type=int, default=None, metavar="L2",
                        help="also compile with L2 MoE layers and extrapolate linearly")
    parser.add_argument("--micro-batches", type=int, default=1,
                        help="gradient accumulation: the step runs the global batch in this "
                             "many parts (train.micro_batches)")
    parser.add_argument("--capacity-factor", type=float, default=None,
                        help="override the config (default: the config's, None = dropless)")
    parser.add_argument("--remat", default=None, help="override remat_policy")
    parser.add_argument("--moe-backend", default=None,
                        help="override moe_backend (XLA:CPU lowers ragged_dot densely, so "
                             "its CPU memory figures overstate a GPU/TPU grouped matmul)")
    parser.add_argument("--attention-backend", default=None,
                        help="override attention_backend (XLA without cuDNN materializes the "
                             "T x T scores of dot_product_attention)")
    parser.add_argument("--target", default="cpu",
                        help="cpu (simulated XLA:CPU devices, one per mesh position) or a "
                             "Cloud TPU slice, tpu-v5p-N / tpu-v6e-N / tpu-v5e-N (N counts "
                             "TensorCores for v5p): the real TPU compiler, needs libtpu")
    parser.add_argument("--num-slices", type=int, default=1,
                        help="TPU slices (multi-slice over DCN); with --target tpu-*")
    parser.add_argument("--hbm-gib", type=float, default=None,
                        help="memory per device to check the total against (default: the "
                             "TPU chip's HBM, 95 for the CPU target)")
    parser.add_argument("--dump-hlo", default=None, help="write the compiled HLO here")
    parser.add_argument("--rule", action="append", default=[], metavar="NAME=AXES",
                        help="override one entry of sharding.rules.RULES for this plan, "
                             "e.g. embed=fsdp+expert (repeatable; empty AXES = unsharded)")
    parser.add_argument("--run-steps", type=int, default=0,
                        help="really run the step this many timed times (small configs only)")
    args = parser.parse_args(argv)

    from sharding import rules
    from sharding.mesh import parse_mesh, resolve_axes
    from sharding.topology import libtpu_available, parse_target, tpu_devices

    for rule in args.rule:
        name, sep, mesh_axes = rule.partition("=")
        if not sep or name not in rules.RULES:
            fail(PROG, f"--rule {rule!r}: expected NAME=AXES with NAME one of "
                 f"{sorted(rules.RULES)}")
        rules.RULES[name] = tuple(filter(None, mesh_axes.split("+")))

    try:
        axes = parse_mesh(args.mesh)
    except ValueError as e:
        fail(PROG, f"--mesh: {e}")
    try:
        target = None if args.target == "cpu" else parse_target(args.target, args.num_slices)
    except ValueError as e:
        fail(PROG, str(e))
    if any(v == -1 for v in axes.values()):
        fail(PROG, "--mesh: give every axis a size (the device count is their product)")
    num_devices = _prod(v for v in axes.values() if v > 0)
    if target is not None:
        if not libtpu_available():
            fail(PROG, f"--target {args.target}: libtpu is not installed; "
                 "pip install -e '.[tpu]'")
        if num_devices != target.num_devices:
            fail(PROG, f"--mesh {args.mesh} has {num_devices} devices but {target.name} x "
                 f"{target.num_slices} slice(s) has {target.num_devices} chips")
    if not os.path.isfile(args.config):
        fail(PROG, f"--config {args.config}: no such file (the config files are in configs/)")
    hbm_gib = args.hbm_gib or (target.chip.hbm_gib if target else 95.0)
    chip = target.chip if target else None
    # Simulated devices must be requested before jax initialises its backend. XLA:CPU's
    # default (concurrency-optimized) scheduler starts data-independent work such as the
    # zero buffers of scatters as early as possible, so they stay live across the whole
    # layer scan; the memory-minimizing scheduler orders the program as an accelerator
    # compiler under an HBM limit would (GLM-4.5, 2 MoE layers: 230 -> 99 GiB temporaries).
    # A TPU target keeps the host backend on CPU too: its devices come from libtpu's
    # topology description, which needs no TPU.
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count="
                               f"{1 if target else num_devices}"
                               " --xla_cpu_enable_concurrency_optimized_scheduler=false")
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    sys.path.insert(0, os.getcwd())
    from glm_jax.config import GlmConfig

    cfg = _load_config(args.config)
    overrides = {}
    if args.capacity_factor is not None:
        overrides["capacity_factor"] = args.capacity_factor
    if args.remat is not None:
        overrides["remat_policy"] = args.remat
    if args.moe_backend is not None:
        overrides["moe_backend"] = args.moe_backend
    if args.attention_backend is not None:
        overrides["attention_backend"] = args.attention_backend
    try:
        model_cfg = GlmConfig.from_dict({**cfg.model.to_dict(), **overrides})
        axes = resolve_axes(axes, num_devices)
        check_inputs(model_cfg, axes, global_batch=args.global_batch,
                     micro_batches=args.micro_batches)
    except ValueError as e:  # every input check; nothing is compiled yet
        fail(PROG, e)
    real = model_cfg.num_moe_layers
    print(f"{args.config}: {model_cfg.num_dense_layers} dense + {real} MoE layers + "
          f"{model_cfg.num_mtp_layers} MTP; mesh {axes}; batch {args.global_batch} x "
          f"{args.seq_len} in {args.micro_batches} micro-batches; dtype {model_cfg.dtype}, "
          f"params {model_cfg.param_dtype}, "
          f"remat {model_cfg.remat_policy}, attention {model_cfg.attention_backend}, "
          f"moe_backend {model_cfg.moe_backend}, "
          f"capacity_factor {model_cfg.capacity_factor}"
          + (f"; rules changed: {args.rule}" if args.rule else ""),
          flush=True)

    if target is not None and args.run_steps:
        print("error: --run-steps needs real devices; a TPU target only compiles",
              file=sys.stderr)
        raise SystemExit(2)
    devices = tpu_devices(target) if target is not None else None
    where = (f"{target.name} x {target.num_slices} slice(s), {target.shape} chips"
             if target else "simulated CPU devices")

    def run(moe_layers: int) -> Plan:
        c = model_cfg.replace(num_hidden_layers=model_cfg.num_dense_layers + moe_layers)
        plan = compile_plan(c, axes, seq_len=args.seq_len, global_batch=args.global_batch,
                            micro_batches=args.micro_batches, show_hlo=args.dump_hlo,
                            run_steps=args.run_steps, devices=devices)
        print(format_plan(plan, f"measured on {where}, {moe_layers} MoE layers, per device:",
                          chip=chip), flush=True)
        return plan

    la = args.layers if args.layers is not None else real
    a = run(la)
    if args.extrapolate is not None:
        b = run(args.extrapolate)
        print(format_plan(extrapolate(a, la, b, args.extrapolate, real),
                          f"extrapolated linearly to {real} MoE layers, per device:",
                          hbm_gib, chip))
    elif la == real:
        print(f"  fits {hbm_gib} GiB: {'yes' if a.total <= hbm_gib * GiB else 'NO'}")


if __name__ == "__main__":
    main()
