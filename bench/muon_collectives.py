"""Count the collectives XLA emits for one Muon optimizer update of the tiny model, with
parameters sharded on 8 simulated CPU devices (mesh fsdp x expert), with and without the
once-per-step NS layout (`shardings=param_shardings(...)`).

    python bench/muon_collectives.py [--fsdp 2 --expert 4]
"""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402
import collections  # noqa: E402
import importlib.util  # noqa: E402
import pathlib  # noqa: E402
import re  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from glm_jax import GlmConfig, GlmForCausalLM  # noqa: E402
from glm_jax.optim import muon, param_shardings  # noqa: E402
from sharding.rules import shard_model  # noqa: E402

COLLECTIVES = ("all-gather", "all-reduce", "all-to-all", "collective-permute", "reduce-scatter")


def count_collectives(hlo: str) -> collections.Counter:
    """Collective ops in compiled HLO text, keyed by kind (async -start halves counted once)."""
    counts: collections.Counter = collections.Counter()
    for kind in COLLECTIVES:
        counts[kind] = len(re.findall(rf"= [^=]*? {kind}(?:-start)?\(", hlo))
    return counts


def collective_lines(hlo: str) -> list[str]:
    pat = re.compile(rf"= ([^=]*?) ({'|'.join(COLLECTIVES)})(?:-start)?\(")
    return [f"{m.group(2)} {m.group(1).strip()}" for m in map(pat.search, hlo.splitlines()) if m]


def load_config(name: str) -> GlmConfig:
    path = pathlib.Path(__file__).resolve().parent.parent / "configs" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return GlmConfig.from_dict(module.get_config().model.to_dict())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fsdp", type=int, default=2)
    parser.add_argument("--expert", type=int, default=4)
    parser.add_argument("--verbose", action="store_true", help="print every collective")
    args = parser.parse_args()
    mesh = jax.make_mesh((args.fsdp, args.expert), ("fsdp", "expert"),
                         axis_types=(jax.sharding.AxisType.Auto,) * 2)
    model = shard_model(GlmForCausalLM(load_config("tiny"), rngs=nnx.Rngs(0)), mesh)
    params = nnx.as_pure(nnx.state(model, nnx.Param))
    for label, shardings in (("GSPMD default (no shardings)", None),
                             ("muon(shardings=param_shardings(params))", param_shardings(params))):
        tx = muon(1e-3, weight_decay=0.1, shardings=shardings)
        state = tx.init(params)
        grads = jax.tree.map(jnp.ones_like, params)
        hlo = jax.jit(tx.update).lower(grads, state, params).compile().as_text()
        counts = count_collectives(hlo)
        print(f"{label}: " + ", ".join(f"{k} {v}" for k, v in counts.items() if v) or "none")
        if args.verbose:
            print("\n".join("  " + s for s in collective_lines(hlo)))


if __name__ == "__main__":
    main()
