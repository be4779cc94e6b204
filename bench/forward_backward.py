"""Forward + backward tokens/s of a config for each MoE backend, and compile time against
depth. Issue 2's measurements; run as `python -m bench.forward_backward`.

The loss is a plain next-token cross-entropy (the training loss lives in glm_jax.train);
what is timed is one jitted value_and_grad over the Params."""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from bench.common import append_section, jax_train_step, load_config, shape_parser, time_calls
from glm_jax import GlmConfig, GlmForCausalLM
from glm_jax.train.metrics import flops_per_token, measure_matmul_peak


def grad_step(config: GlmConfig, batch: int, seq: int):
    """A compiled fwd+bwd and its inputs; returns (run, compile_seconds)."""
    model = GlmForCausalLM(config, rngs=nnx.Rngs(0))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    ids = jnp.asarray(np.random.RandomState(0).randint(0, config.vocab_size, (batch, seq)))

    def loss(model, ids):
        out = model(ids)
        logits = out.logits[:, :-1].astype(jnp.float32)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, 1:]).mean()
        return ce, out.dropped

    def step(params, rest, ids):
        # Gradients w.r.t. the Params only; the router bias is a constant of the step.
        return nnx.value_and_grad(loss, argnums=nnx.DiffState(0, nnx.Param), has_aux=True)(
            nnx.merge(graphdef, params, rest), ids)

    t = time.perf_counter()
    compiled = jax.jit(step).lower(params, rest, ids).compile()
    compile_s = time.perf_counter() - t

    pairs = batch * seq * config.num_experts_per_tok * (config.num_moe_layers + config.num_mtp_layers)

    def run() -> float:
        """One step; returns the fraction of token-expert pairs dropped by a capacity."""
        (_, dropped), grads = jax.block_until_ready(compiled(params, rest, ids))
        return int(dropped) / pairs

    return run, compile_s


def train_step_compile(config: GlmConfig, batch: int, seq: int) -> tuple[float, int]:
    """Seconds to compile the real train step (glm_jax.train.make_trainer with AdamW), and
    the number of while loops XLA kept (a one-trip layer scan is compiled as straight code)."""
    trainer, _, data = jax_train_step(config, batch, seq)
    t = time.perf_counter()
    compiled = trainer.lower(data).compile()
    return time.perf_counter() - t, compiled.as_text().count(" while(")


def main() -> None:
    p = shape_parser(__doc__)
    p.add_argument("--backends", default="buckets,buckets@1.25,dense,ragged_dot")
    p.add_argument("--slow-batch", type=int, default=1,
                   help="batch for ragged_dot and dense (ragged_dot is ~70x slower on CPU)")
    p.add_argument("--depths", default="2,8", help="tiny-config depths for compile time")
    args = p.parse_args()

    peak = measure_matmul_peak()
    rows = []
    for spec in args.backends.split(","):
        backend, _, cap = spec.partition("@")
        config = load_config(args.config, moe_backend=backend,
                             capacity_factor=float(cap) if cap else None)
        batch = args.batch if backend == "buckets" else args.slow_batch
        run, compile_s = grad_step(config, batch, args.seq)
        dropped = run()
        sec = float(np.median(time_calls(run, args.repeats)))
        tps = batch * args.seq / sec
        mfu = tps * flops_per_token(config, args.seq) / peak
        rows.append(f"| {spec} | {batch}x{args.seq} | {sec:.2f} | {tps:.0f} | {mfu:.0%} | "
                    f"{dropped:.1%} | {compile_s:.1f} |")
        print(rows[-1], flush=True)
    table = ("| backend | batch | s/step | tokens/s | CPU-MFU | pairs dropped | compile s |\n"
             "|---|---|---|---|---|---|---|\n"
             + "\n".join(rows))

    depth_rows = []
    for depth in map(int, args.depths.split(",")):
        config = load_config("tiny", num_hidden_layers=depth)
        _, compile_s = grad_step(config, 2, 128)
        step_s, loops = train_step_compile(config, 2, 128)
        depth_rows.append(f"| {depth} | {compile_s:.1f} | {step_s:.1f} | {loops} |")
        print(depth_rows[-1], flush=True)
    depth_table = ("| tiny layers | fwd+bwd compile s | train step compile s | while loops in "
                   "the compiled step |\n|---|---|---|---|\n" + "\n".join(depth_rows))
    append_section(f"Forward + backward of `{args.config}` per MoE backend (issue 2)",
                   table + "\n\n" + depth_table,
                   f"float32; matmul peak measured in the same run: {peak / 1e9:.0f} GFLOP/s. "
                   "`buckets@C` = capacity factor C; plain `buckets` is dropless. A freshly initialised "
                   "model routes nearly every token to the same experts, so a capacity run drops "
                   "many pairs and its time is not comparable to dropless. CPU-MFU counts "
                   "6 x active matmul parameters + attention per token (glm_jax/train/metrics.py).")


if __name__ == "__main__":
    main()
