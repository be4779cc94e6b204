"""The routed experts alone, per backend: time of forward + backward, useful FLOP/s, and
FLOP efficiency = FLOPs XLA's cost analysis counts for the compiled step / the analytic
FLOPs of top-k routing. Run as `python -m bench.moe`.

Routing is balanced by construction (token n picks experts n*k .. n*k+k-1 mod E), so a
capacity factor of 1.0 drops nothing; `--routing skewed` draws each token's experts from a
geometric popularity instead (the most loaded expert gets about 4.5x its share, like the
`bench` model at initialisation). The shared expert and router are left out (they are
plain dense matmuls).

FLOP efficiency: XLA's cost analysis counts a while-loop body once, so for the dropless
`buckets` backend (a scan over row blocks) it is replaced by the rows the blocks actually
run, sum over experts of ceil(group / block) * block, over the token-expert pairs: every
row costs the same three matmuls forward and six backward."""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from bench.common import append_section, load_config, time_calls
from glm_jax.model.grouped_matmul import dropless_block_size
from glm_jax.model.moe import dense_experts, sorted_experts
from glm_jax.train.metrics import measure_matmul_peak


def routing(kind: str, tokens: int, e: int, k: int, rng: np.random.RandomState) -> np.ndarray:
    if kind == "balanced":
        return (np.arange(tokens)[:, None] * k + np.arange(k)) % e
    popularity = np.exp(-np.arange(e) / 12.0)
    popularity /= popularity.sum()
    return np.stack([rng.choice(e, k, replace=False, p=popularity) for _ in range(tokens)])


def expert_step(backend: str, capacity: float | None, tokens: int, h: int, f: int, e: int, k: int,
                kind: str = "balanced"):
    """Returns (run, FLOPs executed / analytic, pairs dropped)."""
    rng = np.random.RandomState(0)
    x = jnp.asarray(rng.randn(tokens, h), jnp.float32)
    idx_np = routing(kind, tokens, e, k, rng)
    idx = jnp.asarray(idx_np, jnp.int32)
    w = jnp.asarray(rng.rand(tokens, k), jnp.float32)
    ws = [jnp.asarray(0.02 * rng.randn(*s), jnp.float32) for s in ((e, h, f), (e, h, f), (e, f, h))]

    def loss(x, ws, idx, w):  # routing passed in, so XLA cannot constant-fold the sort
        if backend == "dense":
            y = dense_experts(x, idx, w, *ws)
            dropped = jnp.zeros((), jnp.int32)
        else:
            y, dropped = sorted_experts(x, idx, w, *ws, backend, capacity)
        return jnp.sum(y * y), dropped

    compiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)).lower(
        x, ws, idx, w).compile()
    analytic = 3 * 2 * 3 * tokens * k * h * f  # fwd + 2x bwd, three matmuls per expert
    if backend == "buckets" and capacity is None:
        block = dropless_block_size(tokens * k, e)
        groups = np.bincount(idx_np.reshape(-1), minlength=e)
        efficiency = float(np.sum(-(-groups // block)) * block / (tokens * k))
    else:
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, list) else cost
        efficiency = float(cost.get("flops", 0.0)) / analytic
    (_, dropped), _ = compiled(x, ws, idx, w)

    def run():
        jax.block_until_ready(compiled(x, ws, idx, w))

    return run, efficiency, int(dropped) / (tokens * k)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--config", default="bench")
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--slow-tokens", type=int, default=512, help="tokens for ragged_dot / dense")
    p.add_argument("--backends", default="buckets,buckets@1.0,buckets@1.25,dense,ragged_dot")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--routing", choices=("balanced", "skewed"), default="balanced")
    args = p.parse_args()
    cfg = load_config(args.config)
    h, f, e, k = cfg.hidden_size, cfg.moe_intermediate_size, cfg.n_routed_experts, cfg.num_experts_per_tok
    peak = measure_matmul_peak()
    rows = []
    for spec in args.backends.split(","):
        backend, _, cap = spec.partition("@")
        tokens = args.tokens if backend == "buckets" else args.slow_tokens
        run, efficiency, dropped = expert_step(backend, float(cap) if cap else None, tokens,
                                               h, f, e, k, args.routing)
        run()
        sec = float(np.median(time_calls(run, args.repeats)))
        analytic = 3 * 2 * 3 * tokens * k * h * f  # fwd + 2x bwd, three matmuls per expert
        rows.append(f"| {spec} | {tokens} | {sec * 1e3:.0f} | {analytic / sec / 1e9:.0f} | "
                    f"{analytic / sec / peak:.0%} | {efficiency:.2f}x | {dropped:.1%} |")
        print(rows[-1], flush=True)
    append_section(
        f"Routed experts alone, forward + backward, `{args.config}` shapes (issue 7)",
        "| backend | tokens | ms | useful GFLOP/s | of matmul peak | FLOPs executed / analytic "
        "| pairs dropped |\n|---|---|---|---|---|---|---|\n" + "\n".join(rows),
        f"H={h}, F={f}, E={e}, top-{k}, {args.routing} routing; float32 matmul peak in the same "
        f"run {peak / 1e9:.0f} GFLOP/s. `buckets@C` = capacity factor C, plain `buckets` is "
        "dropless (a scan over row blocks; its FLOPs are the rows its blocks run, see the "
        "module docstring; the others' are XLA's cost analysis).")


if __name__ == "__main__":
    main()
