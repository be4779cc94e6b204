"""The routed experts alone, per backend: time of forward + backward, useful FLOP/s, and
FLOP efficiency = FLOPs XLA's cost analysis counts for the compiled step / the analytic
FLOPs of top-k routing. Run as `python -m bench.moe`.

Routing is balanced by construction (token n picks experts n*k .. n*k+k-1 mod E), so a
capacity factor of 1.0 drops nothing; the shared expert and router are left out (they are
plain dense matmuls)."""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from bench.common import append_section, load_config, time_calls
from glm_jax.model.moe import dense_experts, sorted_experts
from glm_jax.train.metrics import measure_matmul_peak


def expert_step(backend: str, capacity: float | None, tokens: int, h: int, f: int, e: int, k: int):
    rng = np.random.RandomState(0)
    x = jnp.asarray(rng.randn(tokens, h), jnp.float32)
    idx = jnp.asarray((np.arange(tokens)[:, None] * k + np.arange(k)) % e, jnp.int32)
    w = jnp.asarray(rng.rand(tokens, k), jnp.float32)
    ws = [jnp.asarray(0.02 * rng.randn(*s), jnp.float32) for s in ((e, h, f), (e, h, f), (e, f, h))]

    def loss(x, ws, idx, w):  # routing passed in, so XLA cannot constant-fold the sort
        if backend == "dense":
            y = dense_experts(x, idx, w, *ws)
        else:
            y, _ = sorted_experts(x, idx, w, *ws, backend, capacity)
        return jnp.sum(y * y)

    compiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).lower(x, ws, idx, w).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return (lambda: jax.block_until_ready(compiled(x, ws, idx, w))), float(cost.get("flops", 0.0))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--config", default="bench")
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--slow-tokens", type=int, default=512, help="tokens for ragged_dot / dense")
    p.add_argument("--backends", default="buckets,buckets@1.0,buckets@1.25,dense,ragged_dot")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    cfg = load_config(args.config)
    h, f, e, k = cfg.hidden_size, cfg.moe_intermediate_size, cfg.n_routed_experts, cfg.num_experts_per_tok
    peak = measure_matmul_peak()
    rows = []
    for spec in args.backends.split(","):
        backend, _, cap = spec.partition("@")
        tokens = args.tokens if backend == "buckets" else args.slow_tokens
        run, xla_flops = expert_step(backend, float(cap) if cap else None, tokens, h, f, e, k)
        run()
        sec = float(np.median(time_calls(run, args.repeats)))
        analytic = 3 * 2 * 3 * tokens * k * h * f  # fwd + 2x bwd, three matmuls per expert
        rows.append(f"| {spec} | {tokens} | {sec * 1e3:.0f} | {analytic / sec / 1e9:.0f} | "
                    f"{analytic / sec / peak:.0%} | {xla_flops / analytic:.2f}x |")
        print(rows[-1], flush=True)
    append_section(
        f"Routed experts alone, forward + backward, `{args.config}` shapes (issue 7)",
        "| backend | tokens | ms | useful GFLOP/s | of matmul peak | XLA FLOPs / analytic |\n"
        "|---|---|---|---|---|---|\n" + "\n".join(rows),
        f"H={h}, F={f}, E={e}, top-{k}, balanced routing; float32 matmul peak in the same run "
        f"{peak / 1e9:.0f} GFLOP/s. `buckets@C` = capacity factor C, plain `buckets` is dropless.")


if __name__ == "__main__":
    main()
