"""glm_jax.optim: Muon against optax.contrib.muon, NS spectra, update RMS, tiny and zero
gradients, the label table on the real model, the sharded NS layout on 8 devices, and a
few jitted nnx.Optimizer steps on the real model."""

import contextlib
import importlib.util
import math
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P
from optax.contrib import MuonDimensionNumbers as MDN

from glm_jax import GlmConfig, GlmForCausalLM
from glm_jax.model.params import RouterBias
from glm_jax.optim import (MatrixDims, decay_mask, matrix_dims, muon, orthogonalize,
                           param_labels, param_shardings, rule_for, scale_by_muon)
from glm_jax.optim.muon import NS_COEFFS
from glm_jax.train.loss import lm_loss

NS5 = (NS_COEFFS,) * 5
ROOT = pathlib.Path(__file__).resolve().parent.parent


def _normal(seed, shape, scale=1.0):
    return scale * jax.random.normal(jax.random.key(seed), shape, jnp.float32)


def _tree(seed):
    """Named like the model so that the label table routes them."""
    return {
        "attn": {"q_proj": {"kernel": _normal(seed, (32, 48))}},           # 2-D, wide
        "mlp": {"down_proj": {"kernel": _normal(seed + 1, (40, 24))},      # 2-D, tall
                "w_gate": _normal(seed + 2, (4, 24, 16)),                  # [E, in, out]
                "w_down": _normal(seed + 3, (2, 3, 16, 40))},              # [L, E, in, out]
        "embed": _normal(seed + 4, (20, 24)),
        "lm_head": {"kernel": _normal(seed + 5, (24, 20))},
        "final_norm": {"scale": 1.0 + _normal(seed + 6, (24,), 0.1)},
    }


OPTAX_DIMS = {"attn": {"q_proj": {"kernel": MDN(0, 1)}},
              "mlp": {"down_proj": {"kernel": MDN(0, 1)}, "w_gate": MDN(1, 2),
                      "w_down": MDN(2, 3)},
              "embed": None, "lm_head": {"kernel": None}, "final_norm": {"scale": None}}


def _updates(tx, params, grads):
    """tx.init, then one tx.update per gradient tree, as ONE jitted program; the updates.
    (Op by op, the NS loops of these small trees dispatch thousands of tiny CPU ops:
    ~20-30 s for the 3-step comparison below instead of ~2 s jitted.)"""
    def run(params, grads):
        state, out = tx.init(params), []
        for g in grads:
            u, state = tx.update(g, state, params)
            out.append(u)
        return out

    return jax.jit(run)(params, grads)


def test_matches_optax_contrib_muon():
    """Muon leaves: ours == optax.contrib.muon(nesterov=True, consistent_rms=0.2, explicit
    dims, same wd) for 3 steps, lr 1. AdamW leaves: ours == optax.adamw(b1 .9, b2 .95, the
    table's wd mask) (optax's own Adam side is NAdamW with b2 .999 and no mask)."""
    wd = 0.1
    params = _tree(0)
    ours = muon(1.0, weight_decay=wd)
    ref_muon = optax.contrib.muon(1.0, weight_decay=wd, nesterov=True, consistent_rms=0.2,
                                  muon_weight_dimension_numbers=OPTAX_DIMS)
    ref_adam = optax.adamw(1.0, b1=0.9, b2=0.95, eps=1e-8, weight_decay=wd,
                           mask=decay_mask(params))
    grads = [jax.tree.map(lambda p, i=step: _normal(100 + i, p.shape), params)
             for step in range(3)]
    runs = [_updates(tx, params, grads) for tx in (ours, ref_muon, ref_adam)]
    labels = param_labels(params)
    for step, (u, um, ua) in enumerate(zip(*runs)):
        for path, lab in jax.tree_util.tree_leaves_with_path(labels):
            got = _get(u, path)
            if lab == "muon":
                w = _get(params, path)
                scale = 0.2 * math.sqrt(max(w.shape[-2:]))
                # float32 rounding of the NS iterate is ~1e-7 per unit of the orthogonal
                # factor; compared at that unit: |diff| <= 1e-6 * shape scale.
                np.testing.assert_allclose(got, _get(um, path), rtol=0, atol=1e-6 * scale,
                                           err_msg=f"step {step} {path}")
            else:
                np.testing.assert_allclose(got, _get(ua, path), rtol=1e-6, atol=1e-7,
                                           err_msg=f"step {step} {path}")


def _get(tree, path):
    for key in path:
        tree = tree[key.key]
    return np.asarray(tree)


def test_matches_optax_without_nesterov():
    params = {"w": _normal(1, (3, 16, 40))}
    ours = scale_by_muon(nesterov=False)
    ref = optax.chain(
        optax.contrib.scale_by_muon(nesterov=False, weight_dimension_numbers={"w": MDN(1, 2)}),
        optax.contrib._muon.scale_by_shape({"w": MDN(1, 2)}, consistent_rms=0.2))
    grads = [{"w": _normal(10 + step, (3, 16, 40))} for step in range(3)]
    for uo, ur in zip(_updates(ours, params, grads), _updates(ref, params, grads)):
        np.testing.assert_allclose(uo["w"], ur["w"], rtol=0, atol=1e-6 * 0.2 * math.sqrt(40))


@pytest.mark.parametrize("shape", [(96, 32), (32, 96), (8, 48, 24), (64, 64)])
def test_singular_values_and_rms(shape):
    if shape[-1] == shape[-2]:
        # A square Gaussian has sigma_min/||X||_F ~ n^-1.5 and beyond, below what 5 quintic
        # steps lift to 0.6 (it gives 0.12-0.7; optax identically). Test the square case
        # on a random matrix of condition number 20 instead.
        u, _ = jnp.linalg.qr(_normal(7, shape))
        v, _ = jnp.linalg.qr(_normal(8, shape))
        x = (u * jnp.linspace(0.05, 1.0, shape[-1])) @ v.T
    else:
        x = _normal(3, shape)
    for dtype in (jnp.float32, jnp.bfloat16):
        o = orthogonalize(x, MatrixDims(), NS5, 1e-8, dtype)
        s = np.linalg.svd(np.asarray(o), compute_uv=False)
        assert s.min() >= 0.6 and s.max() <= 1.2, (dtype, s.min(), s.max())
    tx = scale_by_muon()
    update, _ = tx.update({"w": x}, tx.init({"w": x}))
    rms = float(jnp.sqrt(jnp.mean(update["w"] ** 2)))
    assert 0.16 <= rms <= 0.21, rms  # 0.2 x the NS shrink (singular values 0.68-1.13)


_SMALL_TX = muon(1e-3, weight_decay=0.1)
_small_update = jax.jit(_SMALL_TX.update)  # one compile shared by the three scales


@pytest.mark.parametrize("scale", [0.0, 1e-30, 1e-40])
def test_zero_and_tiny_gradients(scale):
    params = _tree(0)
    state = _SMALL_TX.init(params)
    grads = jax.tree.map(lambda p: _normal(5, p.shape, scale), params)
    for _ in range(2):
        updates, state = _small_update(grads, state, params)
        for leaf in jax.tree.leaves((updates, state)):
            assert bool(jnp.all(jnp.isfinite(leaf)))
    if scale == 1e-30:  # still a full-size orthogonal direction, not eps-dominated
        o = orthogonalize(grads["mlp"]["w_gate"], MatrixDims(), NS5, 1e-8)
        s = np.linalg.svd(np.asarray(o), compute_uv=False)
        assert s.min() >= 0.6 and s.max() <= 1.2


def _tiny_config():
    spec = importlib.util.spec_from_file_location("tiny", ROOT / "configs" / "tiny.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return GlmConfig.from_dict(module.get_config().model.to_dict())


def test_label_table_on_real_model():
    abstract = nnx.eval_shape(lambda: GlmForCausalLM(_tiny_config(), rngs=nnx.Rngs(0)))
    state = nnx.state(abstract, nnx.Param)
    names = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(
            param_labels(state)):
        names[".".join(str(getattr(k, "key", getattr(k, "idx", ""))) for k in path)] = leaf
    assert names and set(names.values()) == {"muon", "adamw"}
    adam_only = [n for n in names if n == "embed" or n == "lm_head.kernel" or n.endswith(".scale")
                 or n.endswith(".bias") or n.endswith("router_kernel")]
    assert len(adam_only) == sum(v == "adamw" for v in names.values())
    assert all(names[n] == "adamw" for n in adam_only)
    experts = [n for n in names if re.search(r"mlp\.w_(gate|up|down)$", n)]
    assert len(experts) == 6 and all(names[n] == "muon" for n in experts)
    for n in ("mtp_layers.0.eh_proj.kernel", "moe_layers.layers.attn.o_proj.kernel",
              "dense_layers.layers.mlp.gate_proj.kernel",
              "moe_layers.layers.mlp.shared_experts.down_proj.kernel"):
        assert names[n] == "muon", n
    # per expert: the two matrix axes are the last two, L and E are batch axes
    dims = matrix_dims(state)
    assert dims["moe_layers"]["layers"]["mlp"]["w_gate"] == MatrixDims((-2,), (-1,))
    assert not decay_mask(state)["embed"] and decay_mask(state)["lm_head"]["kernel"]
    # correction_bias is a RouterBias: refused by type and by name
    with pytest.raises(ValueError, match="correction_bias"):
        param_labels(nnx.state(abstract))
    with pytest.raises(ValueError, match="RouterBias"):
        rule_for("moe_layers.layers.mlp.correction_bias")
    with pytest.raises(ValueError, match="matches no row"):
        rule_for("moe_layers.layers.mlp.new_thing")


COLLECTIVE = re.compile(r"= [^=]*? (all-gather|all-reduce|all-to-all|collective-permute|"
                        r"reduce-scatter)(?:-start)?\(")


def _collectives(tx, params):
    state = tx.init(params)
    hlo = jax.jit(tx.update).lower(params, state, params).compile().as_text()
    counts = {}
    for kind in COLLECTIVE.findall(hlo):
        counts[kind] = counts.get(kind, 0) + 1
    return counts, jax.jit(tx.update)(params, state, params)[0]


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (simulated) devices")
@pytest.mark.parametrize("axis_type", ["auto", "explicit"])
def test_sharded_layout_collectives(axis_type):
    """Experts [L, E, in, out] sharded (expert on E, fsdp on in) are orthogonalised locally
    after one all-to-all (no all-gather, no all-reduce); a 2-D matrix sharded over fsdp is
    all-gathered once, not once per NS step. Numerics equal the unsharded update."""
    kind = jax.sharding.AxisType.Auto if axis_type == "auto" else jax.sharding.AxisType.Explicit
    mesh = jax.make_mesh((2, 4), ("fsdp", "expert"), axis_types=(kind, kind))
    specs = {"mlp": {"w_gate": P(None, "expert", "fsdp", None)},
             "attn": {"q_proj": {"kernel": P("fsdp", None)}}}
    plain = {"mlp": {"w_gate": _normal(0, (2, 8, 32, 16))},
             "attn": {"q_proj": {"kernel": _normal(1, (32, 64))}}}
    params = jax.tree.map(lambda x, s: jax.device_put(x, NamedSharding(mesh, s)), plain, specs)
    reference = scale_by_muon().update(plain, scale_by_muon().init(plain))[0]
    given = param_shardings(params) if axis_type == "auto" else None
    with jax.set_mesh(mesh) if axis_type == "explicit" else contextlib.nullcontext():
        counts, updates = _collectives(scale_by_muon(shardings=given), params)
    assert counts.get("all-gather", 0) == 1, counts  # the 2-D matrix, once
    assert counts.get("all-reduce", 0) == 0, counts  # no per-iteration Gram/norm reductions
    assert counts.get("all-to-all", 0) >= 1, counts  # experts: fsdp moved onto E
    # same criterion as the optax test: 1e-6 on the orthogonal factor (f32 NS rounding floor)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(
        a, b, rtol=0, atol=1e-6 * 0.2 * math.sqrt(max(a.shape[-2:]))), updates, reference)


def test_muon_trains_real_model():
    """The real path: nnx.Optimizer(model, muon(...), wrt=nnx.Param) on a tiny
    GlmForCausalLM of 2 layers (1 dense + 1 MoE; the MTP layer is left out to keep the
    compile short, its eh_proj is routed by the table test), a jitted step on one fixed
    batch. The loss falls at every step, every Muon leaf moves (weight decay off, so only
    the Muon direction can move it), and the RouterBias is not touched."""
    config = _tiny_config().replace(num_hidden_layers=2, num_nextn_predict_layers=0)
    # Created by one jitted call: eager creation compiles every initializer op separately.
    model = nnx.jit(lambda: GlmForCausalLM(config, rngs=nnx.Rngs(0)))()
    optimizer = nnx.Optimizer(model, muon(1e-2, weight_decay=0.0), wrt=nnx.Param)
    tokens = jax.random.randint(jax.random.key(1), (2, 32), 0, 256)
    batch = {"tokens": tokens, "segment_ids": jnp.ones_like(tokens)}

    @nnx.jit
    def step(model, optimizer):
        def loss_fn(model):
            out = model(tokens)
            return lm_loss(out.logits, out.mtp_logits, batch, mtp_loss_weight=0.3)[0]

        loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, nnx.Param))(model)
        optimizer.update(model, grads)
        return loss

    # Host copies taken BEFORE the first update: nnx.Optimizer updates the model in place.
    before = jax.tree.map(np.array, nnx.state(model, nnx.Param))
    bias = nnx.state(model, RouterBias)
    assert jax.tree.leaves(bias), "the tiny MoE model has no RouterBias"
    bias_before = jax.tree.map(np.array, bias)
    # losses[k] is the loss after k updates (each call returns the loss before its update).
    losses = [float(step(model, optimizer)) for _ in range(4)]
    assert all(np.isfinite(losses)), losses
    assert losses[1] < losses[0] and losses[2] < losses[1] and losses[3] < losses[2], losses

    after = jax.tree.map(np.array, nnx.state(model, nnx.Param))
    labels = param_labels(nnx.state(model, nnx.Param))
    muon_leaves = 0
    for (path, label), old, new in zip(jax.tree_util.tree_leaves_with_path(labels),
                                       jax.tree.leaves(before), jax.tree.leaves(after)):
        if label == "muon":
            muon_leaves += 1
            assert not np.array_equal(old, new), f"Muon leaf {path} did not change"
    # dense: q, k, v, o, gate, up, down; MoE: q, k, v, o, w_gate/up/down, shared gate/up/down
    assert muon_leaves == 17, muon_leaves
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.array, nnx.state(
        model, RouterBias)), bias_before)
