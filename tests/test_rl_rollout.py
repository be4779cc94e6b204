"""The rollout engine (glm_jax.rl.rollout) and MoE routing replay.

- A rollout's per-token log-probabilities are those of a full forward over its tokens at the
  row's temperature (float32, 1e-5), with and without MTP speculation; its recorded expert
  choices are the full forward's; greedy rows are glm_jax.generate's.
- Routing replay, on a MoE whose router scores are nearly tied: a trainer whose numerics
  differ slightly (a tiny perturbation of the router weights stands in for another
  precision / kernel) routes some tokens elsewhere and scores the rollout's tokens
  differently; replaying the rollout's expert ids gives back its log-probabilities.
- Truncated importance sampling in PolicyGradientLoss takes the rollout's log-probabilities.

All tests share one model shape, batch shape [4, 13] and generation length, so the jitted
prefill / decode programs and the scoring forward compile once for the file."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import glm_jax
from glm_jax import GlmConfig, GlmForCausalLM
from glm_jax.rl.policy_loss import PolicyGradientLoss
from glm_jax.rl.rollout import rollout

CONFIG = GlmConfig(
    vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
    first_k_dense_replace=1, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
    moe_intermediate_size=32, n_routed_experts=16, num_experts_per_tok=4, n_shared_experts=1,
    n_group=1, topk_group=1, norm_topk_prob=True, routed_scaling_factor=2.5, use_qk_norm=True,
    attention_bias=True, num_nextn_predict_layers=1, max_position_embeddings=64,
    initializer_range=0.08,  # peaky logits: greedy runs repeat tokens, so MTP drafts hit
    dtype="float32", param_dtype="float32", moe_backend="buckets", attention_backend="einsum",
    remat_policy="none")
PROMPTS = [[5, 17, 3, 40, 8], [61, 2, 9]]
G, NEW, PAD = 2, 8, 0
WIDTH = 5 + NEW  # longest prompt + max_new_tokens


def _copy(model: GlmForCausalLM) -> GlmForCausalLM:
    graphdef, state = nnx.split(model)
    return nnx.merge(graphdef, jax.tree.map(jnp.array, state))


@pytest.fixture(scope="module")
def model():
    return GlmForCausalLM(CONFIG, rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def repeater(model):
    """The model made to prefer repeating its current token (a larger embedding that the
    head reads back), with its MTP layer rewired to draft "the current token again": the
    draft is right exactly when the model repeats itself, so speculation both accepts and
    rejects, with greedy and with sampled rows."""
    m = _copy(model)
    m.embed[...] = 2 * m.embed[...]
    m.lm_head.kernel[...] = m.embed[...].T
    layer, h = m.mtp_layers[0], CONFIG.hidden_size
    layer.hidden_norm.scale[...] = jnp.ones((h,))
    layer.final_norm.scale[...] = jnp.ones((h,))
    layer.eh_proj.kernel[...] = jnp.concatenate([jnp.zeros((h, h)), jnp.eye(h)])
    for p in (layer.block.attn.o_proj.kernel, layer.block.mlp.w_down,
              layer.block.mlp.shared_experts.down_proj.kernel):
        p[...] = jnp.zeros_like(p[...])
    return m


@pytest.fixture(scope="module")
def sensitive():
    """(rollout model, trainer model): router scores nearly tied (router weights 1e-3 of
    the usual, std 8e-5), and the trainer's router weights off by noise of std 3e-6."""
    rollout_model = GlmForCausalLM(CONFIG, rngs=nnx.Rngs(1))
    router = rollout_model.moe_layers.layers.mlp.router_kernel
    router[...] = router[...] * 1e-3
    trainer_model = _copy(rollout_model)
    noise = jax.random.normal(jax.random.key(7), router[...].shape) * 3e-6
    trainer_router = trainer_model.moe_layers.layers.mlp.router_kernel
    trainer_router[...] = trainer_router[...] + noise
    return rollout_model, trainer_model


@nnx.jit
def _score(model, tokens, temperature, routed_experts):
    """log p(token t | tokens < t) at each row's temperature (1 for greedy rows) [N, T],
    aligned with tokens (0 at t = 0), and the expert ids the forward used."""
    out = model(tokens, routed_experts=routed_experts)
    t = jnp.where(temperature > 0, temperature, 1.0)[:, None, None]
    logp = jax.nn.log_softmax(out.logits[:, :-1].astype(jnp.float32) / t, axis=-1)
    picked = jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
    return jnp.pad(picked, ((0, 0), (1, 0))), out.routed_experts


def score(model, r, replay: bool):
    logp, ids = _score(model, jnp.asarray(r.tokens), jnp.asarray(r.temperature),
                       jnp.asarray(r.routed_experts) if replay else None)
    return np.asarray(logp), np.asarray(ids)


def real_tokens(r) -> np.ndarray:
    """[N, T] bool: prompt and completion tokens (not padding)."""
    t = np.arange(r.tokens.shape[1])[None]
    return t < (r.prompt_lengths + r.completion_lengths)[:, None]


def roll(model, speculative="none", temperature=(0.0, 0.9), seed=0, version=3):
    return rollout(model, PROMPTS, samples_per_prompt=G, max_new_tokens=NEW,
                   temperature=list(temperature), eos_ids=(11,), seed=seed, pad_id=PAD,
                   speculative=speculative, policy_version=version)


@pytest.mark.parametrize("speculative", ["none", "mtp"])
def test_rollout_logprobs_equal_full_forward(repeater, speculative):
    r = roll(repeater, speculative)
    n = len(PROMPTS) * G
    assert r.tokens.shape == (n, WIDTH) and r.tokens.dtype == np.int32
    np.testing.assert_array_equal(r.prompt_index, [0, 0, 1, 1])
    np.testing.assert_array_equal(r.temperature, np.float32([0.0, 0.0, 0.9, 0.9]))
    np.testing.assert_array_equal(r.prompt_lengths, [5, 5, 3, 3])
    completion = r.completion_mask
    for row in range(n):
        np.testing.assert_array_equal(r.tokens[row, :r.prompt_lengths[row]],
                                      PROMPTS[r.prompt_index[row]])
    assert (r.tokens[~real_tokens(r)] == PAD).all()
    assert (r.logprobs[~completion] == 0).all() and (r.logprobs[completion] <= 0).all()
    assert (r.policy_version[completion] == 3).all()
    assert (r.policy_version[~completion] == -1).all()
    assert r.generated_tokens == completion.sum() and r.seconds > 0
    assert r.routed_experts.shape == (n, WIDTH, CONFIG.num_moe_layers, 4)

    logp, ids = score(repeater, r, replay=False)
    np.testing.assert_allclose(r.logprobs[completion], logp[completion], atol=1e-5, rtol=0)
    # Every real token's recorded experts (prompt: prefill; generated: the step that fed
    # it, the last token by the extra step) are the ones the full forward chooses.
    np.testing.assert_array_equal(r.routed_experts[real_tokens(r)], ids[real_tokens(r)])
    if speculative == "mtp":  # both verified positions' tokens were kept somewhere
        assert 0 < r.acceptance_rate < 1


def test_greedy_rows_equal_generate_with_and_without_speculation(repeater):
    """Greedy rows (prompt 0's) of a plain and an MTP rollout are glm_jax.generate's greedy
    output, with the same log-probabilities and expert choices."""
    plain, spec = roll(repeater, "none"), roll(repeater, "mtp")
    out = glm_jax.generate(repeater, PROMPTS, max_new_tokens=NEW, eos_ids=(11,), pad_id=PAD)
    greedy = plain.temperature == 0
    for row in np.flatnonzero(greedy):
        assert plain.completion(row) == spec.completion(row) == out.row(0)
    np.testing.assert_allclose(spec.logprobs[greedy], plain.logprobs[greedy], atol=1e-5,
                               rtol=0)
    np.testing.assert_array_equal(spec.routed_experts[greedy], plain.routed_experts[greedy])


def test_routing_replay_restores_the_rollout_logprobs(sensitive):
    rollout_model, trainer_model = sensitive
    r = roll(rollout_model, temperature=(1.0, 1.0), seed=1)
    completion, real = r.completion_mask, real_tokens(r)
    own, own_ids = score(rollout_model, r, replay=False)
    np.testing.assert_array_equal(r.routed_experts[real], own_ids[real])  # recorded = used
    np.testing.assert_allclose(r.logprobs[completion], own[completion], atol=1e-5, rtol=0)

    # Without replay: the trainer routes some token-layer choices elsewhere, and its
    # log-probabilities of the rollout's tokens are off (the mismatch replay removes).
    free, free_ids = score(trainer_model, r, replay=False)
    flipped = (np.sort(free_ids, -1) != np.sort(r.routed_experts, -1)).any(-1)[real]
    assert flipped.mean() > 0.05
    assert np.abs(free - r.logprobs)[completion].max() > 1e-2

    replayed, replayed_ids = score(trainer_model, r, replay=True)
    np.testing.assert_array_equal(replayed_ids, r.routed_experts)
    np.testing.assert_allclose(replayed[completion], r.logprobs[completion], atol=1e-5, rtol=0)


def test_replaying_a_models_own_routing_changes_nothing(model):
    """Replay computes the mixing weights exactly as the model's own routing does."""
    tokens = jnp.asarray(np.random.RandomState(0).randint(0, 96, (4, WIDTH)), jnp.int32)
    temps = jnp.ones(4)
    logp, ids = _score(model, tokens, temps, None)
    replayed, replayed_ids = _score(model, tokens, temps, ids)
    np.testing.assert_array_equal(replayed_ids, ids)
    np.testing.assert_array_equal(np.asarray(replayed), np.asarray(logp))


def test_truncated_importance_sampling_uses_the_rollout_logprobs(sensitive):
    """PolicyGradientLoss(tis_cap=C) on a rollout's batch: each token's weight is
    min(exp(train - rollout), C), train = the trainer's own log-probabilities (no replay,
    so they differ from the rollout's)."""
    rollout_model, trainer_model = sensitive
    r = roll(rollout_model, temperature=(1.0, 1.0), seed=1)
    train, _ = score(trainer_model, r, replay=False)
    cap = 1.0005
    batch = {"tokens": jnp.asarray(r.tokens), "loss_mask": jnp.asarray(r.completion_mask, jnp.int32),
             "advantages": jnp.asarray(np.linspace(-1, 1, len(r.tokens)), jnp.float32),
             "old_logprobs": jnp.asarray(train), "rollout_logprobs": jnp.asarray(r.logprobs),
             "temperature": jnp.asarray(r.temperature)}
    loss = PolicyGradientLoss(tis_cap=cap)
    batch = loss.prepare(batch)
    metrics = nnx.jit(lambda m, b: loss(m(b["tokens"]), b)[1])(trainer_model, batch)
    w = np.asarray(batch["loss_weights"])
    tis = np.minimum(np.exp(train - r.logprobs), cap)
    assert 0 < (tis == cap)[w > 0].mean() < 1  # the cap binds on some tokens, not all
    np.testing.assert_allclose(float(metrics["tis_weight"]), (w * tis).sum(), rtol=1e-6)
    np.testing.assert_allclose(float(metrics["tis_clip_frac"]),
                               (w * (np.exp(train - r.logprobs) > cap)).sum(), rtol=1e-6)


def test_the_trainer_replays_the_batchs_routing():
    """make_trainer + PolicyGradientLoss on a rollout of the trainer's own weights, in two
    micro-batches: with the rollout's routed_experts the step's probability ratio is 1
    (same routing, same log-probabilities); with other expert ids it is not, so the
    trainer's forward does use batch["routed_experts"], split with the rows."""
    from glm_jax.train.trainer import make_trainer
    from sharding.mesh import make_mesh
    from train_config import small_config

    # Without the MTP layer (not replayed, not scored): half the compile time.
    config = small_config(**{"model.num_nextn_predict_layers": 0})
    trainer = make_trainer(config, make_mesh({"data": 1}, jax.devices()[:1]),
                           PolicyGradientLoss(tis_cap=2.0), micro_batches=2)
    r = rollout(trainer.model(trainer.init()), PROMPTS, samples_per_prompt=G,
                max_new_tokens=NEW, temperature=1.0, eos_ids=(), seed=0, pad_id=PAD)
    batch = {"tokens": r.tokens, "loss_mask": r.completion_mask.astype(np.int32),
             "advantages": np.float32([1, -1, 1, -1]), "old_logprobs": r.logprobs,
             "rollout_logprobs": r.logprobs, "routed_experts": r.routed_experts,
             "temperature": r.temperature}
    _, same = trainer.step(trainer.init(), batch)
    e = trainer.config.n_routed_experts
    shifted = dict(batch, routed_experts=(r.routed_experts + 1) % e)  # still distinct ids
    _, other = trainer.step(trainer.init(), shifted)
    assert abs(float(same["ratio"]) - 1) < 1e-5 and float(same["approx_kl"]) < 1e-8
    assert abs(float(same["tis_weight"]) - 1) < 1e-5
    assert float(other["approx_kl"]) > 1e-6


def test_bad_arguments_name_the_argument(model):
    kw = dict(samples_per_prompt=G, max_new_tokens=NEW, temperature=1.0, eos_ids=(), seed=0,
              pad_id=PAD)
    with pytest.raises(ValueError, match="prompts is empty"):
        rollout(model, [], **kw)
    with pytest.raises(ValueError, match=r"prompt\(s\) \[1\] are empty"):
        rollout(model, [[1, 2], []], **kw)
    with pytest.raises(ValueError, match="samples_per_prompt=0"):
        rollout(model, PROMPTS, **dict(kw, samples_per_prompt=0))
    for bad in ([1.0], [1.0, -0.5], float("nan")):
        with pytest.raises(ValueError, match="temperature="):
            rollout(model, PROMPTS, **dict(kw, temperature=bad))
    with pytest.raises(ValueError, match="routed_experts has shape"):
        model(jnp.zeros((1, 3), jnp.int32), routed_experts=jnp.zeros((1, 3, 1, 2), jnp.int32))
