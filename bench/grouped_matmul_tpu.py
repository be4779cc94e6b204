"""Compiled FLOPs of the grouped-matmul candidates for one TPU chip, forward and forward +
backward, from the TPU compiler's cost analysis (compiled ahead of time on this host; needs
libtpu, extra `tpu`). Nothing runs: this measures what the compiler would execute.

    python -m bench.grouped_matmul_tpu [--target tpu-v5p-8] [--rows 8192 --k 1024 --n 512
                                        --groups 64]

Candidates: `jax.lax.ragged_dot`, and the Pallas megablox gmm/tgmm pair that ships in JAX
under its custom_vjp (glm_jax.model.grouped_matmul uses it on TPU meshes). For a Pallas
kernel the compiler adopts the FLOPs the kernel declares (2 M K N over all M rows; here the
groups fill all M rows, so that is exact).
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", default="tpu-v5p-8")
    parser.add_argument("--rows", type=int, default=8192)
    parser.add_argument("--k", type=int, default=1024)
    parser.add_argument("--n", type=int, default=512)
    parser.add_argument("--groups", type=int, default=64)
    args = parser.parse_args(argv)
    if args.rows % args.groups:
        print(f"error: --groups {args.groups} must divide --rows {args.rows}", file=sys.stderr)
        raise SystemExit(2)

    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec

    from glm_jax.model.grouped_matmul import grouped_matmul
    from sharding.topology import libtpu_available, parse_target, tpu_devices

    if not libtpu_available():
        print("error: needs libtpu: pip install -e '.[tpu]'", file=sys.stderr)
        raise SystemExit(2)
    device = tpu_devices(parse_target(args.target))[0]
    mesh = jax.sharding.Mesh([device], ("x",))
    one = NamedSharding(mesh, PartitionSpec())
    m, k, n, g = args.rows, args.k, args.n, args.groups
    x = jax.ShapeDtypeStruct((m, k), jnp.bfloat16, sharding=one)
    w = jax.ShapeDtypeStruct((g, k, n), jnp.bfloat16, sharding=one)
    sizes = jax.ShapeDtypeStruct((g,), jnp.int32, sharding=one)
    analytic = 2.0 * m * k * n
    candidates = {"jax.lax.ragged_dot": "gpu",  # grouped_matmul's non-TPU choice
                  "megablox gmm/tgmm (custom_vjp)": "tpu"}
    print(f"{args.target}, one chip: x [{m}, {k}] bf16 @ w [{g}, {k}, {n}], {g} groups; "
          f"analytic forward {analytic / 1e9:.2f} GFLOP, forward+backward "
          f"{3 * analytic / 1e9:.2f}")
    print(f"  {'kernel':<34s}{'forward GFLOP':>15s}{'x':>7s}{'fwd+bwd GFLOP':>15s}{'x':>7s}")
    for name, platform in candidates.items():
        def fwd(x, w, sizes):
            return grouped_matmul(x, w, sizes, platform)

        def fwd_bwd(x, w, sizes):
            y, pullback = jax.vjp(lambda x, w: grouped_matmul(x, w, sizes, platform), x, w)
            return y, pullback(jnp.ones_like(y))  # y returned: the forward is not dead code

        flops = []
        for f in (fwd, fwd_bwd):
            cost = jax.jit(f).lower(x, w, sizes).compile().cost_analysis()
            cost = cost[0] if isinstance(cost, (list, tuple)) else cost
            flops.append(float(cost["flops"]))
        print(f"  {name:<34s}{flops[0] / 1e9:15.2f}{flops[0] / analytic:7.2f}"
              f"{flops[1] / 1e9:15.2f}{flops[1] / (3 * analytic):7.2f}", flush=True)


if __name__ == "__main__":
    sys.path.insert(0, os.getcwd())
    main()
