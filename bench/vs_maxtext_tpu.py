"""glm-jax and MaxText side by side on the same TPU slice and tokens, both compiled ahead of
time by the TPU compiler on this host (nothing runs): per-chip memory, compiled FLOPs and a
roofline step-time estimate, in one table.

    python -m bench.vs_maxtext_tpu [--config configs/glm4_5_air.py] [--target tpu-v5p-128]
        [--mesh fsdp=8,expert=8] [--seq-len 4096] [--global-batch 1024] [--micro-batches 16]
        [--layers N] [--maxtext-python /work/venv-maxtext312/bin/python]

MaxText runs in its own environment (bench/requirements-maxtext.txt: Python >= 3.12, maxtext
0.2.4, the release pinned to this project's jax 0.10.2 / libtpu 0.0.42.1), as a subprocess:
its own `train_compile` with the HLO dumped, then the dump is read with the same
`sharding.hlo_stats` counters and priced with the same `plan.step_estimate` as glm-jax's plan.

MaxText has no GLM-4.5 decoder. The closest is `qwen3_moe` (GQA attention with 96 query /
8 KV heads of 128, routed experts top-k with normalized weights, megablox grouped matmuls,
ragged all-to-all expert parallelism, splash attention), configured to the GLM config's
hidden size, heads, KV heads, head dim, experts, top-k, expert width, vocabulary and depth.
It lacks GLM's shared expert, its dense first layer(s) (every MaxText layer is MoE), sigmoid
routing with the score-correction bias, partial RoPE, QKV bias and the MTP layer; so the
table also gives each side's analytic FLOPs (6 x active parameters x tokens + attention, of
the model actually compiled) and the MFU each estimate implies.
"""

from __future__ import annotations

import argparse
import glob
import os
import re
import resource
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

GiB = 1024 ** 3
DEFAULT_MAXTEXT_PYTHON = "/work/venv-maxtext312/bin/python"


def maxtext_args(model_cfg, *, layers: int, target: str, num_slices: int, mesh: dict,
                 seq_len: int, global_batch: int, micro_batches: int, out_dir: str
                 ) -> list[str]:
    """MaxText `train_compile` overrides for its qwen3_moe decoder at the GLM config's sizes,
    with the training setup of glm-jax's plan (bf16 compute, f32 weights, AdamW, full remat,
    splash attention, megablox, dropless ragged all-to-all, gradient accumulation)."""
    chips = 1
    for v in mesh.values():
        chips *= v
    t = target.removeprefix("tpu-")
    return [
        f"run_name=glm_side_by_side", f"base_output_directory={out_dir}",
        f"compile_topology={t}", f"compile_topology_num_slices={num_slices}",
        "decoder_block=qwen3_moe",
        f"base_emb_dim={model_cfg.hidden_size}",
        f"base_num_query_heads={model_cfg.num_attention_heads}",
        f"base_num_kv_heads={model_cfg.num_key_value_heads}",
        f"head_dim={model_cfg.head_dim}",
        # every qwen3_moe layer is MoE; MaxText then requires mlp_dim == moe_mlp_dim
        f"base_mlp_dim={model_cfg.moe_intermediate_size}",
        f"base_moe_mlp_dim={model_cfg.moe_intermediate_size}",
        f"num_experts={model_cfg.n_routed_experts}",
        f"num_experts_per_tok={model_cfg.num_experts_per_tok}",
        f"norm_topk_prob={str(model_cfg.norm_topk_prob).lower()}",
        f"vocab_size={model_cfg.vocab_size}",
        f"base_num_decoder_layers={layers}",
        f"use_qk_norm={str(model_cfg.use_qk_norm).lower()}",
        "rope_type=default", f"rope_max_timescale={int(model_cfg.rope_theta)}",
        "mlp_activations=[silu,linear]",
        f"normalization_layer_epsilon={model_cfg.rms_norm_eps}",
        "logits_via_embedding=false", "enable_dropout=false",
        f"max_target_length={seq_len}",
        f"per_device_batch_size={global_batch // chips // micro_batches}",
        f"gradient_accumulation_steps={micro_batches}",
        f"ici_fsdp_parallelism={mesh.get('fsdp', 1)}",
        f"ici_expert_parallelism={mesh.get('expert', 1)}",
        f"ici_data_parallelism={mesh.get('data', 1)}",
        f"ici_tensor_parallelism={mesh.get('tensor', 1)}",
        "allow_split_physical_axes=true",
        "remat_policy=full", "attention=flash", "sparse_matmul=true", "megablox=true",
        "capacity_factor=-1", "dtype=bfloat16", "weight_dtype=float32", "opt_type=adamw",
        "scan_layers=true", "dataset_type=synthetic", "enable_checkpointing=false",
    ]


def compile_maxtext(python: str, args: list[str], work: str):
    """Run MaxText's train_compile in `python`'s environment; returns (Plan, stdout tail).
    The Plan's state/temporaries come from the printed memory analysis, FLOPs, bytes and
    collectives from the dumped optimized HLO, read as glm-jax's plan reads its own."""
    code = ("import sys, runpy; sys.argv = ['train_compile'] + sys.argv[1:]; "
            "import maxtext, os; base = os.path.join(os.path.dirname(maxtext.__file__), "
            "'configs', 'base.yml'); sys.argv.insert(1, base); "
            "runpy.run_module('maxtext.trainers.pre_train.train_compile', run_name='__main__')")
    dump = os.path.join(work, "hlo")
    env = dict(os.environ, ALLOW_MULTIPLE_LIBTPU_LOAD="1",
               XLA_FLAGS=f"--xla_dump_to={dump} --xla_dump_hlo_module_re=.*train_step.*")
    env.pop("PYTHONPATH", None)  # MaxText's environment, not this worktree
    env.pop("JAX_PLATFORMS", None)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run([python, "-c", code, *args], env=env, cwd=work,
                          capture_output=True, text=True)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    log = proc.stdout + proc.stderr
    with open(os.path.join(work, "maxtext.log"), "w") as f:
        f.write(log)
    if proc.returncode:
        tail = "\n".join(log.strip().splitlines()[-15:])
        raise RuntimeError(f"MaxText train_compile failed (exit {proc.returncode}):\n{tail}")
    return read_maxtext(work, _chips(args), wall, cpu)


def read_maxtext(work: str, chips: int, wall: float = 0.0, cpu: float = 0.0):
    """(Plan, grouped-matmul buffer rows) of a finished MaxText compile in `work` (its log
    and dumped HLO); analytic FLOPs and the buffer fill are left to the caller."""
    from sharding.hlo_stats import (collective_bytes, hbm_bytes, kernel_flops, matmul_flops,
                                    splash_flops)
    from sharding.plan import Plan

    with open(os.path.join(work, "maxtext.log")) as f:
        log = f.read()
    dump = os.path.join(work, "hlo")
    mem = re.search(r"Memory analysis: CompiledMemoryStats\(([^)]*)\)", log)
    if not mem:
        raise RuntimeError(f"no memory analysis in {work}/maxtext.log")
    stats = {k: float(v) for k, v in re.findall(r"(\w+)=(\d+)", mem.group(1))}
    flops = re.search(r"'flops': ([\d.e+]+)", log)
    paths = glob.glob(os.path.join(dump, "*train_step*after_optimizations.txt"))
    if not paths:
        raise RuntimeError(f"MaxText wrote no optimized HLO under {dump}")
    with open(paths[0]) as f:
        hlo = f.read()
    gmm_rows = [int(m) for m in re.findall(r"%gmm[.\d]* = bf16\[(\d+),\d+\]", hlo)]
    n = int(stats["argument_size_in_bytes"])
    # `params` holds all arguments: MaxText's memory analysis does not split them
    plan = Plan(params=float(n), opt_state=0.0, other_state=0.0,
                temp=stats["temp_size_in_bytes"], code=stats["generated_code_size_in_bytes"],
                total=stats["argument_size_in_bytes"] + stats["temp_size_in_bytes"]
                + stats["output_size_in_bytes"] - stats["alias_size_in_bytes"],
                collectives=collective_bytes(hlo, chips), compile_seconds=wall,
                flops=float(flops.group(1)) if flops else 0.0,
                kernel_flops=kernel_flops(hlo), kernel_flops_once=kernel_flops(hlo, False),
                compile_cpu_seconds=cpu, matmul_flops=matmul_flops(hlo),
                attention_kernel_flops=splash_flops(hlo), hbm_bytes=hbm_bytes(hlo))
    return plan, max(gmm_rows) if gmm_rows else 0


def _chips(args: list[str]) -> int:
    n = 1
    for a in args:
        m = re.match(r"ici_\w+_parallelism=(\d+)$", a)
        if m:
            n *= int(m.group(1))
    return n


def table(ours, theirs, chip, ours_label: str, theirs_label: str) -> str:
    from sharding.plan import step_estimate

    eo, et = step_estimate(ours, chip), step_estimate(theirs, chip)
    rows = [
        ("model compiled", ours_label, theirs_label),
        ("analytic FLOPs / chip / step (6 N_active D + attention)",
         f"{ours.analytic_flops:.4g}", f"{theirs.analytic_flops:.4g}"),
        ("state: params + optimizer (arguments), GiB",
         f"{(ours.params + ours.opt_state + ours.other_state) / GiB:.2f}",
         f"{theirs.params / GiB:.2f}"),
        ("temporaries, GiB", f"{ours.temp / GiB:.2f}", f"{theirs.temp / GiB:.2f}"),
        (f"total per chip, GiB (HBM {chip.hbm_gib:g})", f"{ours.total / GiB:.2f}",
         f"{theirs.total / GiB:.2f}"),
        ("compiled FLOPs (cost analysis, loop bodies once)", f"{ours.flops:.4g}",
         f"{theirs.flops:.4g}"),
        ("executed FLOPs (every trip; grouped matmuls at real rows)",
         f"{ours.executed_flops:.4g}", f"{theirs.executed_flops:.4g}"),
        ("  / analytic", f"{ours.executed_flops / ours.analytic_flops:.2f}x",
         f"{theirs.executed_flops / theirs.analytic_flops:.2f}x"),
        ("grouped-matmul buffer fill (real rows / static rows)",
         f"{ours.grouped_matmul_fill:.3f}", f"{theirs.grouped_matmul_fill:.3f}"),
        ("HBM bytes of top-level ops, GiB", f"{ours.hbm_bytes / GiB:.0f}",
         f"{theirs.hbm_bytes / GiB:.0f}"),
    ]
    kinds = sorted(set(ours.collectives) | set(theirs.collectives))
    for k in kinds:
        rows.append((f"{k} sent / chip / step, GiB", f"{ours.collectives.get(k, 0) / GiB:.1f}",
                     f"{theirs.collectives.get(k, 0) / GiB:.1f}"))
    rows += [
        ("ESTIMATE compute / HBM, s", f"{eo.compute:.2f} / {eo.hbm:.2f}",
         f"{et.compute:.2f} / {et.hbm:.2f}"),
        ("ESTIMATE collectives (sum), s", f"{sum(eo.collectives.values()):.2f}",
         f"{sum(et.collectives.values()):.2f}"),
        ("ESTIMATE step, collectives overlapped, s (MFU)",
         f"{eo.overlapped:.2f} ({100 * eo.mfu_overlapped:.1f}%)",
         f"{et.overlapped:.2f} ({100 * et.mfu_overlapped:.1f}%)"),
        ("ESTIMATE step, collectives serial, s (MFU)",
         f"{eo.serial:.2f} ({100 * eo.mfu_serial:.1f}%)",
         f"{et.serial:.2f} ({100 * et.mfu_serial:.1f}%)"),
        ("compile wall / CPU, s", f"{ours.compile_seconds:.0f} / {ours.compile_cpu_seconds:.0f}",
         f"{theirs.compile_seconds:.0f} / {theirs.compile_cpu_seconds:.0f}"),
    ]
    w0 = max(len(r[0]) for r in rows)
    w1 = max(len(r[1]) for r in rows)
    lines = [f"| {'per chip, per step':<{w0}} | {'glm-jax':<{w1}} | MaxText |",
             f"|{'-' * (w0 + 2)}|{'-' * (w1 + 2)}|---|"]
    lines += [f"| {a:<{w0}} | {b:<{w1}} | {c} |" for a, b, c in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/glm4_5_air.py")
    parser.add_argument("--target", default="tpu-v5p-128")
    parser.add_argument("--num-slices", type=int, default=1)
    parser.add_argument("--mesh", default="fsdp=8,expert=8")
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--global-batch", type=int, default=1024)
    parser.add_argument("--micro-batches", type=int, default=16)
    parser.add_argument("--layers", type=int, default=None,
                        help="MoE layers for glm-jax (MaxText gets the same total decoder "
                             "depth, dense + MoE); default: the config's")
    parser.add_argument("--maxtext-python",
                        default=os.environ.get("MAXTEXT_PYTHON", DEFAULT_MAXTEXT_PYTHON),
                        help="a Python >= 3.12 with bench/requirements-maxtext.txt installed")
    parser.add_argument("--workdir", default=None, help="keep MaxText's log and HLO here")
    args = parser.parse_args(argv)
    if not os.path.isfile(args.maxtext_python):
        print(f"error: --maxtext-python {args.maxtext_python}: no such interpreter; create it "
              "with python3.12 -m venv and pip install -r bench/requirements-maxtext.txt "
              "--no-deps", file=sys.stderr)
        raise SystemExit(2)
    if not os.path.isfile(args.config):
        print(f"error: --config {args.config}: no such file", file=sys.stderr)
        raise SystemExit(2)

    from glm_jax.config import GlmConfig
    from glm_jax.train.metrics import flops_per_token
    from sharding import rules
    from sharding.mesh import parse_mesh
    from sharding.plan import _load_config, compile_plan
    from sharding.topology import libtpu_available, parse_target, tpu_devices

    if not libtpu_available():
        print("error: libtpu is not installed; pip install -e '.[tpu]'", file=sys.stderr)
        raise SystemExit(2)
    target = parse_target(args.target, args.num_slices)
    mesh = parse_mesh(args.mesh)
    rules.RULES["embed"] = ("fsdp", "expert")  # the plan's recommended layout
    base = _load_config(args.config).model.to_dict()
    model_cfg = GlmConfig.from_dict({**base, "attention_backend": "dot_product_attention"})
    if args.layers is not None:
        model_cfg = model_cfg.replace(num_hidden_layers=model_cfg.num_dense_layers + args.layers)
    depth = model_cfg.num_hidden_layers
    tokens = args.global_batch * args.seq_len
    chips = target.num_devices
    print(f"{args.config} on {target.name}: {model_cfg.num_dense_layers} dense + "
          f"{model_cfg.num_moe_layers} MoE + {model_cfg.num_mtp_layers} MTP layers; "
          f"MaxText qwen3_moe: {depth} MoE layers; {args.global_batch} x {args.seq_len} "
          f"tokens, {args.micro_batches} micro-batches, mesh {mesh}", flush=True)

    ours = compile_plan(model_cfg, mesh, seq_len=args.seq_len, global_batch=args.global_batch,
                        micro_batches=args.micro_batches, devices=tpu_devices(target))
    print(f"glm-jax compiled: {ours.compile_seconds:.0f} s wall, "
          f"{ours.compile_cpu_seconds:.0f} s CPU, load {os.getloadavg()[0]:.1f}", flush=True)

    work = args.workdir or tempfile.mkdtemp(prefix="vs_maxtext_")
    os.makedirs(work, exist_ok=True)
    mt_args = maxtext_args(model_cfg, layers=depth, target=args.target,
                           num_slices=args.num_slices, mesh=mesh, seq_len=args.seq_len,
                           global_batch=args.global_batch, micro_batches=args.micro_batches,
                           out_dir=os.path.join(work, "out"))
    try:
        theirs, buffer_rows = compile_maxtext(args.maxtext_python, mt_args, work)
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(1)
    print(f"MaxText compiled: {theirs.compile_seconds:.0f} s wall, "
          f"{theirs.compile_cpu_seconds:.0f} s CPU, load {os.getloadavg()[0]:.1f}; "
          f"log and HLO in {work}", flush=True)
    # The model MaxText compiled, as a GlmConfig, for its analytic FLOPs: no shared expert,
    # no dense layer, no MTP.
    mt_model = model_cfg.replace(n_shared_experts=0, first_k_dense_replace=0,
                                 num_nextn_predict_layers=0)
    theirs.analytic_flops = flops_per_token(mt_model, args.seq_len) * tokens / chips
    rows = args.global_batch // args.micro_batches // chips * args.seq_len \
        * model_cfg.num_experts_per_tok
    theirs.grouped_matmul_fill = min(1.0, rows / buffer_rows) if buffer_rows else 1.0
    print(table(ours, theirs, target.chip,
                f"GLM ({model_cfg.num_dense_layers}D+{model_cfg.num_moe_layers}MoE+"
                f"{model_cfg.num_mtp_layers}MTP)", f"qwen3_moe ({depth} MoE)"))


if __name__ == "__main__":
    main()
