"""Model behaviour beyond parity: packing, MoE backends, the hub round trip, dtypes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from glm_jax import GlmConfig, GlmForCausalLM, from_hf_state_dict, to_hf_state_dict
from glm_jax.model.params import RouterBias

TINY = GlmConfig(vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=24,
                 moe_intermediate_size=32, n_routed_experts=8, num_experts_per_tok=2,
                 first_k_dense_replace=1, use_qk_norm=True, attention_bias=True,
                 routed_scaling_factor=2.5, num_nextn_predict_layers=1)


def _model(config=TINY, seed=0):
    model = GlmForCausalLM(config, rngs=nnx.Rngs(seed))
    # A nonzero correction bias, so that selection and weights differ.
    state = nnx.state(model, RouterBias)
    nnx.update(model, jax.tree.map(
        lambda b: 0.05 * jax.random.normal(jax.random.key(seed + 1), b.shape), state))
    return model


@nnx.jit
def _forward(model, ids, positions=None, segment_ids=None):
    return model(ids, positions=positions, segment_ids=segment_ids)


def _ids(shape, seed=0, vocab=101):
    return jnp.asarray(np.random.RandomState(seed).randint(0, vocab, shape))


def test_packed_documents_equal_separate_runs():
    model = _model()
    a, b = _ids((1, 11), 1), _ids((1, 13), 2)
    packed = jnp.concatenate([a, b], axis=1)
    segment_ids = jnp.asarray([[1] * 11 + [2] * 13])
    positions = jnp.asarray([list(range(11)) + list(range(13))])
    out = _forward(model, packed, positions, segment_ids)
    alone_a, alone_b = _forward(model, a).logits, _forward(model, b).logits
    np.testing.assert_allclose(out.logits[:, :11], alone_a, atol=1e-5)
    np.testing.assert_allclose(out.logits[:, 11:], alone_b, atol=1e-5)


def _loss_and_grads(config, ids, seed=0):
    def loss_fn(model):
        out = model(ids)
        return jnp.mean(out.logits ** 2) + jnp.mean(out.mtp_logits[0] ** 2), out

    step = nnx.jit(nnx.value_and_grad(loss_fn, has_aux=True))
    (loss, out), grads = step(_model(config, seed))
    return loss, out, grads


@pytest.mark.parametrize("backend,capacity", [("buckets", None), ("ragged_dot", None),
                                              ("buckets", 8.0)])
def test_moe_backends_agree_forward_and_gradients(backend, capacity):
    ids = _ids((2, 16))
    ref_loss, ref_out, ref_grads = _loss_and_grads(TINY.replace(moe_backend="dense"), ids)
    loss, out, grads = _loss_and_grads(
        TINY.replace(moe_backend=backend, capacity_factor=capacity), ids)
    assert int(out.dropped) == 0
    np.testing.assert_allclose(out.logits, ref_out.logits, atol=1e-5)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
        np.testing.assert_allclose(g, r, atol=1e-6, rtol=1e-4)
    np.testing.assert_array_equal(out.expert_counts, ref_out.expert_counts)


def test_capacity_drops_are_counted_and_deterministic():
    config = TINY.replace(capacity_factor=0.5, num_nextn_predict_layers=0)
    model = _model(config)
    ids = _ids((2, 32))
    out1, out2 = _forward(model, ids), _forward(model, ids)
    # 64 tokens * 2 picks = 128 pairs over 8 experts; capacity 8 per expert keeps at most 64.
    assert int(out1.dropped) >= config.num_moe_layers * 64
    np.testing.assert_array_equal(out1.logits, out2.logits)


def test_correction_bias_gets_no_gradient():
    model = _model()
    grads = nnx.jit(nnx.grad(lambda m: jnp.sum(m(_ids((1, 8))).logits)))(model)
    paths = ["/".join(map(str, p)) for p, _ in jax.tree_util.tree_leaves_with_path(grads)]
    assert paths and not any("correction_bias" in p for p in paths)
    assert any("router_kernel" in p for p in paths)


def test_hub_round_trip_is_bit_exact_and_checks_names():
    model = _model()
    sd = to_hf_state_dict(model)
    assert "model.layers.3.eh_proj.weight" in sd  # MTP at index num_hidden_layers
    assert "model.layers.1.mlp.experts.7.down_proj.weight" in sd
    back = to_hf_state_dict(from_hf_state_dict(sd, TINY))
    assert set(back) == set(sd)
    for k in sd:
        assert back[k].dtype == sd[k].dtype and np.array_equal(back[k], sd[k]), k

    missing = dict(sd)
    del missing["model.layers.2.mlp.experts.3.up_proj.weight"]
    with pytest.raises(KeyError, match=r"model\.layers\.2\.mlp\.experts\.3\.up_proj\.weight"):
        from_hf_state_dict(missing, TINY)
    extra = dict(sd, **{"model.layers.9.mlp.gate.weight": sd["model.layers.1.mlp.gate.weight"]})
    with pytest.raises(KeyError, match=r"model\.layers\.9\.mlp\.gate\.weight"):
        from_hf_state_dict(extra, TINY)
    wrong = dict(sd, **{"model.layers.0.self_attn.q_proj.weight": np.zeros((3, 64), np.float32)})
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.q_proj\.weight.*\[3, 64\]"):
        from_hf_state_dict(wrong, TINY)


def test_bfloat16_round_trip_and_mtp_copies():
    sd = {k: v.astype(jnp.bfloat16) if "gate.weight" not in k and "correction" not in k else v
          for k, v in to_hf_state_dict(_model()).items()}
    sd["model.layers.3.embed_tokens.weight"] = sd["model.embed_tokens.weight"]
    sd["model.layers.3.shared_head.head.weight"] = sd["lm_head.weight"]
    back = to_hf_state_dict(from_hf_state_dict(sd, TINY))
    for k, v in back.items():
        assert v.dtype == sd[k].dtype and np.array_equal(v, sd[k]), k
    bad = dict(sd, **{"model.layers.3.shared_head.head.weight": sd["lm_head.weight"] * 2})
    with pytest.raises(ValueError, match="shared_head.head.weight"):
        from_hf_state_dict(bad, TINY)


@pytest.mark.parametrize("mix", ["float32", "bfloat16", "bfloat16_f32_bias", "float16"])
def test_hub_round_trip_keeps_every_dtype(mix):
    """A hub checkpoint comes back bit-exact in its own dtypes, the router included
    (GLM-4.5's hub files: bfloat16 with a float32 e_score_correction_bias)."""
    low = {"bfloat16_f32_bias": "bfloat16"}.get(mix, mix)
    sd = {k: v.astype(jnp.dtype(low)) for k, v in to_hf_state_dict(_model()).items()}
    if mix == "bfloat16_f32_bias":
        sd = {k: v.astype(np.float32) if k.endswith("e_score_correction_bias") else v
              for k, v in sd.items()}
    model = from_hf_state_dict(sd, TINY)
    back = to_hf_state_dict(model)
    assert set(back) == set(sd)
    for k in sd:
        assert back[k].dtype == sd[k].dtype and np.array_equal(back[k], sd[k]), k
    assert np.isfinite(np.asarray(_forward(model, _ids((1, 8))).logits, np.float32)).all()
    # Asking for a dtype casts the weights but keeps the router in float32.
    cast = to_hf_state_dict(from_hf_state_dict(sd, TINY, dtype="bfloat16"))
    assert cast["model.layers.1.mlp.gate.weight"].dtype == np.float32
    assert cast["model.layers.1.mlp.gate.e_score_correction_bias"].dtype == np.float32
    assert cast["model.layers.1.self_attn.q_proj.weight"].dtype == jnp.bfloat16


def test_bfloat16_forward_stays_close_to_float32():
    sd = to_hf_state_dict(_model())
    ids = _ids((2, 16))
    ref = _forward(from_hf_state_dict(sd, TINY), ids).logits
    low = _forward(from_hf_state_dict(sd, TINY.replace(dtype="bfloat16")), ids).logits
    assert low.dtype == jnp.bfloat16
    err = np.abs(np.asarray(low, np.float32) - np.asarray(ref))
    assert err.max() < 0.05 * np.abs(np.asarray(ref)).max()
    # The argmax agrees almost everywhere.
    agree = (np.asarray(low, np.float32).argmax(-1) == np.asarray(ref).argmax(-1)).mean()
    assert agree > 0.9


def test_dot_product_attention_backend_matches_einsum():
    sd = to_hf_state_dict(_model())
    ids = _ids((2, 16))
    a = _forward(from_hf_state_dict(sd, TINY), ids).logits
    b = _forward(from_hf_state_dict(sd, TINY.replace(attention_backend="dot_product_attention")),
                 ids).logits
    np.testing.assert_allclose(a, b, atol=1e-5)


@pytest.mark.parametrize("policy", ["full", "dots", "save_qkv_residual",
                                    "save_kv_residual"])
def test_remat_keeps_gradients(policy):
    ids = _ids((1, 8))
    _, _, ref = _loss_and_grads(TINY, ids)
    _, _, got = _loss_and_grads(TINY.replace(remat_policy=policy), ids)
    for g, r in zip(jax.tree.leaves(got), jax.tree.leaves(ref)):
        np.testing.assert_allclose(g, r, atol=1e-6, rtol=1e-5)


def test_saving_remat_policies_skip_the_attention_projections():
    """remat_policy="save_qkv_residual" keeps q, k, v and the post-attention residual, so the
    backward pass recomputes none of the q/k/v/o projections that "full" recomputes;
    "save_kv_residual" recomputes q only. The compiled gradient step has exactly those
    projections' forward FLOPs fewer matmul FLOPs than with "full"."""
    from sharding.hlo_stats import matmul_flops

    b, t = 1, 8
    ids = _ids((b, t))

    def flops(policy):
        graphdef, state = nnx.split(_model(TINY.replace(remat_policy=policy)))

        def loss(state):
            out = nnx.merge(graphdef, state)(ids)
            return jnp.mean(out.logits ** 2) + jnp.mean(out.mtp_logits[0] ** 2)

        return matmul_flops(jax.jit(jax.grad(loss)).lower(state).compile().as_text())

    c = TINY
    q = o = c.hidden_size * c.num_attention_heads * c.head_dim
    kv = 2 * c.hidden_size * c.num_key_value_heads * c.head_dim
    layers = c.num_hidden_layers + c.num_mtp_layers  # the MTP block is rematerialized too
    full = flops("full")
    assert full - flops("save_qkv_residual") == 2 * b * t * (q + kv + o) * layers
    assert full - flops("save_kv_residual") == 2 * b * t * (kv + o) * layers


def test_chunked_causal_attention_equals_full_attention():
    from glm_jax.model.attention import (CAUSAL_CHUNK, _chunked_causal_attention,
                                         _einsum_attention, attention_mask)
    rng = np.random.RandomState(0)
    t = 2 * CAUSAL_CHUNK + 44  # a ragged last chunk
    q = jnp.asarray(rng.randn(2, t, 4, 16), jnp.float32)
    k, v = (jnp.asarray(rng.randn(2, t, 2, 16), jnp.float32) for _ in range(2))
    mask = attention_mask(jnp.asarray(np.repeat([[1, 2, 3]], [100, 100, t - 200], axis=1).repeat(2, 0)))
    full = _einsum_attention(q, k, v, mask, 0.25)
    np.testing.assert_allclose(_chunked_causal_attention(q, k, v, mask, 0.25), full, atol=1e-5)
    # Rematerialized chunks (models with a remat policy): same values and gradients.
    np.testing.assert_allclose(_chunked_causal_attention(q, k, v, mask, 0.25, remat_chunks=True),
                               full, atol=1e-5)
    grads = [jax.grad(lambda *a: (f(*a) ** 2).sum(), argnums=(0, 1, 2))(q, k, v)
             for f in (lambda q, k, v: _einsum_attention(q, k, v, mask, 0.25),
                       lambda q, k, v: _chunked_causal_attention(q, k, v, mask, 0.25,
                                                                 remat_chunks=True))]
    for g, r in zip(grads[1], grads[0]):
        np.testing.assert_allclose(g, r, atol=1e-4, rtol=1e-5)


def test_block_swiglu_matches_autodiff_of_gathered_weights():
    """The scanned custom-VJP kernel against plain autodiff of the per-block einsum, with
    uneven owners and unused blocks at the end (they must give zeros and no gradient)."""
    from glm_jax.model.block_swiglu import block_swiglu

    rng = np.random.RandomState(0)
    e, nb, b, h, f, used = 5, 9, 4, 16, 8, 7
    x = jnp.asarray(rng.randn(nb, b, h), jnp.float32)
    owner = jnp.asarray([0, 0, 0, 2, 3, 3, 4, 4, 4], jnp.int32)
    ws = [jnp.asarray(rng.randn(*s), jnp.float32) for s in ((e, h, f), (e, h, f), (e, f, h))]
    live = (jnp.arange(nb) < used)[:, None, None]

    def reference(x, wg, wu, wd):
        hidden = jax.nn.silu(jnp.einsum("nrh,nhf->nrf", x, wg[owner])) * jnp.einsum(
            "nrh,nhf->nrf", x, wu[owner])
        return jnp.where(live, jnp.einsum("nrf,nfh->nrh", hidden, wd[owner]), 0)

    def kernel(x, wg, wu, wd):
        return block_swiglu(x, owner, jnp.int32(used), wg, wu, wd)

    probe = jnp.asarray(rng.randn(nb, b, h), jnp.float32)
    y_ref, y = reference(x, *ws), jax.jit(kernel)(x, *ws)
    np.testing.assert_allclose(y, y_ref, atol=1e-5, rtol=1e-5)
    assert not np.any(np.asarray(y[used:]))
    g_ref = jax.grad(lambda *a: jnp.sum(reference(*a) * probe), argnums=(0, 1, 2, 3))(x, *ws)
    g = jax.jit(jax.grad(lambda *a: jnp.sum(kernel(*a) * probe), argnums=(0, 1, 2, 3)))(x, *ws)
    for got, want in zip(g, g_ref):
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-5)
    assert not np.any(np.asarray(g[1][1]))  # expert 1 owns no block: no gradient
