"""The sharded model equals the single-device model, on 8 simulated CPU devices
(tests/conftest.py sets the device count)."""

from __future__ import annotations

import os
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from configs import tiny  # noqa: E402
from glm_jax.config import GlmConfig  # noqa: E402
from glm_jax import GlmForCausalLM  # noqa: E402
from glm_jax.model.grouped_matmul import bucket_ffn  # noqa: E402
from sharding import rules  # noqa: E402
from sharding.expert_parallel import expert_parallel_ffn  # noqa: E402
from sharding.mesh import check_model_fits_mesh, make_mesh, parse_mesh  # noqa: E402

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (simulated) devices")

MESHES = ["data=8", "fsdp=8", "expert=8", "data=2,expert=2,tensor=2", "fsdp=2,expert=4"]
B, T = 8, 16


def tiny_config(**kw) -> GlmConfig:
    # 2 layers (1 dense, 1 scanned MoE) + 1 MTP layer (an unscanned MoE) keep compile time
    # low; heads 8, kv 2, experts 16 divide every mesh above.
    return GlmConfig.from_dict({**tiny.get_config().model.to_dict(), "num_hidden_layers": 2,
                                **kw})


def loss_fn(model, ids):
    out = model(ids)
    labels = jnp.roll(ids, -1, axis=1)
    loss = optax.softmax_cross_entropy_with_integer_labels(out.logits, labels).mean()
    for logits in out.mtp_logits:
        loss = loss + 0.3 * optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    return loss, out


def logits_and_grads(model, ids):
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def f(params, rest, ids):
        model = nnx.merge(graphdef, params, rest)
        (_, out), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model, ids)  # wrt Params
        return out.logits, out.mtp_logits, out.expert_counts, out.dropped, grads

    return jax.jit(f), (params, rest, ids)


def all_to_experts_0_to_3(rest):
    """Router state whose correction bias makes every token pick experts 0..3."""
    bias = jnp.zeros((16,)).at[:4].set(100.0)
    return jax.tree.map(lambda v: jnp.broadcast_to(bias, v.shape).astype(v.dtype), rest)


@pytest.fixture(scope="module")
def reference():
    config = tiny_config()
    model = GlmForCausalLM(config, rngs=nnx.Rngs(0))
    ids = jax.random.randint(jax.random.key(1), (B, T), 0, config.vocab_size)
    fn, (params, rest, _) = logits_and_grads(model, ids)
    biased = jax.device_get(fn(params, all_to_experts_0_to_3(rest), ids))
    return model, ids, jax.device_get(fn(params, rest, ids)), biased


def _max_diff(a, b) -> float:
    return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@pytest.mark.parametrize("spec", MESHES)
def test_sharded_equals_single_device(reference, spec):
    model, ids, (logits, mtp, counts, dropped, grads), biased = reference
    mesh = make_mesh(parse_mesh(spec))
    ep = dict(mesh.shape)["expert"]
    sharded = rules.shard_model(nnx.clone(model), mesh)
    fn, (params, rest, _) = logits_and_grads(sharded, ids)
    with jax.set_mesh(mesh):
        ids_s = jax.device_put(ids, jax.sharding.NamedSharding(
            mesh, rules.partition_spec(("batch", "seq"), mesh, ids.shape)))
        compiled = fn.lower(params, rest, ids_s).compile()
        out = compiled(params, rest, ids_s)
        if ep == 8:  # the same executable with a router that sends every token to 2 devices
            rest_b = jax.device_put(all_to_experts_0_to_3(rest),
                                    jax.tree.map(lambda x: x.sharding, rest))
            out_biased = compiled(params, rest_b, ids_s)
    s_logits, s_mtp, s_counts, s_dropped, s_grads = jax.device_get(out)
    assert _max_diff(s_logits, logits) <= 1e-4
    assert _max_diff(s_mtp, mtp) <= 1e-4
    assert _max_diff(s_grads, grads) <= 1e-4
    np.testing.assert_array_equal(s_counts, counts)  # summed over all token shards
    assert int(s_dropped) == 0 and int(dropped) == 0
    if ep == 1:
        return
    assert sharded.moe_layers.layers.mlp.w_gate.get_value().sharding.spec[1] == "expert"
    hlo = compiled.as_text()
    assert "all-to-all" in hlo
    if dict(mesh.shape)["fsdp"] == 1:  # with fsdp > 1 the embed dim is gathered, by design
        e, h, f = 16, 128, 64
        gathered = [line for line in hlo.splitlines() if re.search(r"all-gather(-start)?\(", line)
                    and re.search(rf"\[(\d+,)?{e},({h},{f}|{f},{h})\]", line.split("all-gather")[0])]
        assert not gathered, gathered[:3]
    if ep == 8:
        b_logits, _, b_counts, b_dropped, b_grads = jax.device_get(out_biased)
        assert b_counts[:, 4:].sum() == 0 and b_counts.sum() > 0
        assert int(b_dropped) == 0 and int(biased[3]) == 0
        np.testing.assert_array_equal(b_counts, biased[2])
        assert _max_diff(b_logits, biased[0]) <= 1e-4
        assert _max_diff(b_grads, biased[4]) <= 1e-4


@pytest.mark.parametrize("spec", ["fsdp=2,expert=4", "data=2,expert=2,tensor=2"])
def test_non_expert_weights_sharded_over_expert_too(reference, monkeypatch, spec):
    """The scale plan's rule override embed=fsdp+expert (ZeRO-3 of the non-expert weights
    over the `expert` axis as well): the same logits and gradients. On data=2,expert=2,
    tensor=2 every gradient upstream of lm_head was off by up to 0.09 until Linear gathered
    its kernel along `embed` before the dot (glm_jax/model/params.py)."""
    monkeypatch.setitem(rules.RULES, "embed", ("fsdp", "expert"))
    model, ids, (logits, mtp, counts, _, grads), _ = reference
    mesh = make_mesh(parse_mesh(spec))
    sharded = rules.shard_model(nnx.clone(model), mesh)
    q = sharded.moe_layers.layers.attn.q_proj.kernel.get_value()
    assert q.sharding.spec[1] in (("fsdp", "expert"), "expert")  # [layers, embed, heads]
    fn, (params, rest, _) = logits_and_grads(sharded, ids)
    with jax.set_mesh(mesh):
        ids_s = jax.device_put(ids, jax.sharding.NamedSharding(
            mesh, rules.partition_spec(("batch", "seq"), mesh, ids.shape)))
        s_logits, s_mtp, s_counts, _, s_grads = jax.device_get(fn(params, rest, ids_s))
    assert _max_diff(s_logits, logits) <= 1e-4
    assert _max_diff(s_mtp, mtp) <= 1e-4
    assert _max_diff(s_grads, grads) <= 1e-4
    np.testing.assert_array_equal(s_counts, counts)


@pytest.mark.parametrize("spec", ["fsdp=2,expert=2,tensor=2"])
def test_tied_embeddings_sharded_equal_single_device(spec):
    """tie_word_embeddings: the table [vocab, embed] is both the lookup and the head; sharded
    over tensor (vocab) and fsdp (embed), logits and gradients equal the single device's."""
    model = GlmForCausalLM(tiny_config(tie_word_embeddings=True), rngs=nnx.Rngs(0))
    assert model.lm_head is None
    ids = jax.random.randint(jax.random.key(1), (B, T), 0, model.config.vocab_size)
    fn, args = logits_and_grads(model, ids)
    logits, mtp, _, _, grads = jax.device_get(fn(*args))
    mesh = make_mesh(parse_mesh(spec))
    sharded = rules.shard_model(nnx.clone(model), mesh)
    assert tuple(sharded.embed.get_value().sharding.spec) == ("tensor", "fsdp")
    fn, (params, rest, _) = logits_and_grads(sharded, ids)
    with jax.set_mesh(mesh):
        ids_s = jax.device_put(ids, jax.sharding.NamedSharding(
            mesh, rules.partition_spec(("batch", "seq"), mesh, ids.shape)))
        s_logits, s_mtp, _, _, s_grads = jax.device_get(fn(params, rest, ids_s))
    assert _max_diff(s_logits, logits) <= 1e-4
    assert _max_diff(s_mtp, mtp) <= 1e-4
    assert _max_diff(s_grads, grads) <= 1e-4


def _ep_call(x, idx, weights, ws, mesh, capacity_factor=None):
    with jax.set_mesh(mesh):
        return jax.jit(lambda *a: expert_parallel_ffn(
            *a, local_ffn=bucket_ffn, capacity_factor=capacity_factor))(x, idx, weights, *ws)


def test_dropless_when_every_token_goes_to_one_device():
    """Worst case of the exchange: every token's pairs land on the device owning experts
    0 and 1 (expert=8, 16 experts, so 2 per device), and one variant with top-1 to expert 0."""
    mesh = make_mesh({"expert": 8})
    n, h, f, e = 64, 16, 8, 16
    keys = jax.random.split(jax.random.key(0), 4)
    x = jax.random.normal(keys[0], (n, h))
    ws = [jax.random.normal(keys[1], (e, h, f)) * 0.3, jax.random.normal(keys[2], (e, h, f)) * 0.3,
          jax.random.normal(keys[3], (e, f, h)) * 0.3]

    def reference(idx, weights):
        def expert(i, xi):
            g = jax.nn.silu(xi @ ws[0][i]) * (xi @ ws[1][i])
            return g @ ws[2][i]
        y = jax.vmap(lambda xi, ii, wi: sum(wi[j] * expert(ii[j], xi)
                                            for j in range(ii.shape[0])))(x, idx, weights)
        return y

    for idx in (jnp.tile(jnp.array([[0, 1]], jnp.int32), (n, 1)), jnp.zeros((n, 1), jnp.int32)):
        weights = jax.random.uniform(jax.random.key(5), idx.shape)
        y, dropped = _ep_call(x, idx, weights, ws, mesh)
        assert int(dropped) == 0
        np.testing.assert_allclose(np.asarray(y), np.asarray(reference(idx, weights)),
                                   atol=1e-5, rtol=1e-5)
    # with a capacity factor the same routing overflows, and the drops are counted
    idx = jnp.tile(jnp.array([[0, 1]], jnp.int32), (n, 1))
    _, dropped = _ep_call(x, idx, jnp.ones(idx.shape), ws, mesh, capacity_factor=1.0)
    # each device sends 2*8=16 rows to device 0, capacity ceil(1.0 * 8 * 2 / 8) = 2
    assert int(dropped) == 8 * (16 - 2)


def test_bad_mesh_fails_clearly():
    with pytest.raises(ValueError, match="multiply to 4 but there are 8 devices"):
        make_mesh({"data": 2, "expert": 2})
    with pytest.raises(ValueError, match="unknown"):
        make_mesh({"pipeline": 8})
    with pytest.raises(ValueError, match="only one axis may be -1"):
        make_mesh({"data": -1, "fsdp": -1})
    with pytest.raises(ValueError, match="does not divide the 8 devices"):
        make_mesh({"data": 3, "fsdp": -1})
    with pytest.raises(ValueError, match="expert=8 does not divide n_routed_experts=12"):
        check_model_fits_mesh({"expert": 8}, num_experts=12, num_heads=8, num_kv_heads=2)
    with pytest.raises(ValueError, match="tensor=4 does not divide num_attention_heads=6"):
        check_model_fits_mesh({"tensor": 4}, num_experts=16, num_heads=6, num_kv_heads=2)
    assert dict(make_mesh({"expert": 2, "data": -1}).shape) == {
        "data": 4, "fsdp": 1, "expert": 2, "tensor": 1}
    with pytest.raises(ValueError, match="not of the form"):
        parse_mesh("fsdp16")


def test_optimizer_state_sharded_like_params():
    mesh = make_mesh({"fsdp": 2, "expert": 4})
    model = GlmForCausalLM(tiny_config(), rngs=nnx.Rngs(0))
    params = nnx.state(model, nnx.Param)
    shardings = rules.state_shardings(params, mesh)
    tx = optax.adamw(1e-3)
    out = rules.opt_state_shardings(tx, params, shardings, mesh)
    state = jax.jit(tx.init, out_shardings=out)(params)
    mu = state[0].mu
    for path in (("moe_layers", "layers", "mlp", "w_gate"), ("embed",)):
        got, want = mu, shardings
        for p in path:
            got, want = got[p], want[p]
        assert got.get_value().sharding == want.get_value()
    assert state[0].count.sharding.is_fully_replicated


def test_moe_refuses_a_mesh_it_was_not_built_for():
    """Expert parallelism is chosen by the mesh the model was built / placed for, never by
    whatever mesh happens to be active: a mismatch fails at trace time with a clear error."""
    config = tiny_config(num_nextn_predict_layers=0)  # one dense + one MoE layer
    ids = jnp.zeros((B, T), jnp.int32)
    ep = make_mesh(parse_mesh("expert=8"))
    plain = GlmForCausalLM(config, rngs=nnx.Rngs(0))
    with jax.set_mesh(ep), pytest.raises(ValueError, match="built for no mesh"):
        nnx.jit(lambda m, x: m(x).logits)(plain, ids)
    placed = rules.shard_model(nnx.clone(plain), ep)
    assert placed.moe_layers.layers.mlp.mesh is ep
    with pytest.raises(ValueError, match="called under no mesh"):
        nnx.jit(lambda m, x: m(x).logits)(placed, ids)


def test_generate_enters_the_models_mesh(reference):
    """An expert-parallel model decodes without its caller entering the mesh (generate
    enters the one the model was placed on), MTP speculation included, and gives the
    single-device model's greedy tokens."""
    from glm_jax import generate
    model, ids, _, _ = reference
    prompts = np.asarray(ids[:, :6])
    sharded = rules.shard_model(nnx.clone(model), make_mesh(parse_mesh("fsdp=2,expert=4")))
    want = generate(model, prompts, max_new_tokens=4).tokens
    np.testing.assert_array_equal(generate(sharded, prompts, max_new_tokens=4).tokens, want)
    np.testing.assert_array_equal(
        generate(sharded, prompts, max_new_tokens=4, speculative="mtp").tokens, want)


def test_rollout_routing_record_and_replay_expert_parallel(reference):
    """A rollout of an expert-parallel model records the single-device model's expert
    choices and log-probabilities, and its forward replays them to the same logits."""
    from glm_jax.rl.rollout import rollout
    model, ids, _, _ = reference
    prompts = np.asarray(ids[:, :6]).tolist()  # generate's shapes above: compiled once
    mesh = make_mesh(parse_mesh("fsdp=2,expert=4"))
    sharded = rules.shard_model(nnx.clone(model), mesh)
    kw = dict(samples_per_prompt=1, max_new_tokens=4, temperature=0.0, eos_ids=(), seed=0,
              pad_id=0)
    want, got = rollout(model, prompts, **kw), rollout(sharded, prompts, **kw)
    np.testing.assert_array_equal(got.tokens, want.tokens)
    np.testing.assert_array_equal(got.routed_experts, want.routed_experts)
    np.testing.assert_allclose(got.logprobs, want.logprobs, atol=1e-5, rtol=0)

    def logits(m, tokens, routed):
        return m(tokens, routed_experts=routed).logits

    tokens, routed = jnp.asarray(want.tokens), jnp.asarray(want.routed_experts)
    single = nnx.jit(logits)(model, tokens, routed)
    with jax.set_mesh(mesh):
        parallel = nnx.jit(logits)(sharded, tokens, routed)
    np.testing.assert_allclose(np.asarray(parallel), np.asarray(single), atol=1e-5, rtol=0)
