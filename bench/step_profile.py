"""Where one `bench` train step spends its time: each component's forward + backward timed
alone at the step's shapes, times the number of layers it appears in, against the whole
step measured in the same run. Run as `python -m bench.step_profile`.

A profile by parts rather than XLA's trace: on XLA:CPU the trace nests work-stolen tasks of
one op inside the events of another, so per-op durations do not add up to the wall time.
The rest line (whole step - sum of parts) is what the parts miss: the layer scan's
slicing and stacking of weights and residuals, residual adds, the router-bias update.
"""

from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from bench.common import append_section, load_config, shape_parser, time_calls
from bench.train_step import jax_step
from glm_jax import GlmForCausalLM
from glm_jax.model.attention import Attention, attention_mask
from glm_jax.model.mlp import Mlp
from glm_jax.model.moe import MoE
from glm_jax.model.norms_rope import rope_cos_sin
from glm_jax.train.loss import cross_entropy, shifted_targets
from glm_jax.train.metrics import flops_per_token


def _fwd_bwd(module: nnx.Module, call, *inputs):
    """A compiled value_and_grad of sum(call(module, *inputs)^2) w.r.t. the Params and the
    first input (the residual stream's cotangent flows on, as inside the model)."""
    graphdef, params, rest = nnx.split(module, nnx.Param, ...)

    def loss(params, x, *more):
        out = call(nnx.merge(graphdef, params, rest), x, *more)
        return jnp.sum(jnp.square(out.astype(jnp.float32)))

    compiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).lower(params, *inputs).compile()
    return lambda: jax.block_until_ready(compiled(params, *inputs))


def main() -> None:
    p = shape_parser(__doc__)
    p.add_argument("--no-write", action="store_true", help="print only, leave docs alone")
    args = p.parse_args()
    cfg = load_config(args.config)
    b, t, h = args.batch, args.seq, cfg.hidden_size
    rngs = nnx.Rngs(0)
    x = jnp.asarray(np.random.RandomState(0).randn(b, t, h), jnp.float32)
    ids = jnp.asarray(np.random.RandomState(1).randint(0, cfg.vocab_size, (b, t)))
    positions = jnp.broadcast_to(jnp.arange(t), (b, t))
    cos, sin = rope_cos_sin(positions, cfg.rotary_dim, cfg.rope_theta, jnp.float32)
    mask = attention_mask(jnp.ones((b, t), jnp.int32))
    model = GlmForCausalLM(cfg, rngs=rngs)

    def head_loss(m, x, ids):
        targets, valid = shifted_targets(ids, jnp.ones_like(ids), 1)
        return cross_entropy(m.head(m.final_norm(x)), targets, valid)[0]

    params = nnx.state(model, nnx.Param)
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(3e-4, b1=0.9, b2=0.95))
    opt_state = tx.init(params)
    grads = jax.tree.map(lambda a: 1e-3 * a, params)
    update = jax.jit(lambda g, s, p: optax.apply_updates(p, tx.update(g, s, p)[0])).lower(
        grads, opt_state, params).compile()

    with nnx.use_eager_sharding(False):  # modules built alone, as GlmForCausalLM builds them
        attention, moe = Attention(cfg, rngs=rngs), MoE(cfg, rngs=rngs)
        mlp = Mlp(cfg, cfg.intermediate_size, rngs=rngs)
    parts = [  # (name, times per step, run)
        ("attention (projections, QK-norm, RoPE, causal core)", cfg.num_hidden_layers,
         _fwd_bwd(attention, lambda m, x: m(x, cos, sin, mask), x)),
        ("MoE block (router, routed experts dropless, shared expert)", cfg.num_moe_layers,
         _fwd_bwd(moe, lambda m, x: m(x)[0], x)),
        ("dense MLP", cfg.num_dense_layers,
         _fwd_bwd(mlp, lambda m, x: m(x), x)),
        ("final norm + lm_head + cross-entropy", 1, _fwd_bwd(model, head_loss, x, ids)),
        ("AdamW + clipping update", 1, lambda: jax.block_until_ready(
            update(grads, opt_state, params))),
    ]
    whole = jax_step(cfg, b, t)
    for _, _, run in parts:
        run()
    whole()
    rows, total = [], 0.0
    step = float(np.median(time_calls(whole, args.repeats)))
    for name, count, run in parts:
        sec = float(np.median(time_calls(run, args.repeats)))
        total += sec * count
        rows.append(f"| {name} | {count} | {sec * 1e3:.0f} | {sec * count:.2f} | "
                    f"{sec * count / step:.0%} |")
    rows.append(f"| rest (scan slicing/stacking, embedding, residuals, bias update) | | | "
                f"{step - total:.2f} | {(step - total) / step:.0%} |")
    rows.append(f"| **whole train step** | | | **{step:.2f}** | 100% |")
    print("\n".join(rows))
    if args.no_write:
        return
    append_section(
        f"Train step of `{args.config}` by parts (issue 7)",
        "| part (forward + backward) | per step | ms each | s per step | of step |\n"
        "|---|---|---|---|---|\n" + "\n".join(rows),
        f"batch {b}x{t}, float32, remat none; median of {args.repeats} calls each. Parts are "
        "timed alone on random inputs at the step's shapes (the MoE block's routing of random "
        "inputs is near balance; the model at initialisation routes less evenly). Model FLOPs "
        f"{flops_per_token(cfg, t) / 1e6:.0f} MFLOP/token.")


if __name__ == "__main__":
    main()
