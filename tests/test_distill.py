"""Distillation loss: zero loss and zero gradient toward a teacher equal to the student;
toward a different teacher the KL falls as the student trains (small model, optax). Then
the same through the training core: DistillationLoss in make_trainer (2 micro-batches)
with teacher logits from Teachers loading real orbax checkpoints: zero loss, gradient and
SGD update toward itself; the KL falls toward another model; the step's gradient equals
jax.grad of distillation_loss written directly; another vocabulary is refused."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from glm_jax.config import GlmConfig
from glm_jax.model.transformer import GlmForCausalLM
from glm_jax.sft.distill import distillation_loss, token_kl
from train_config import small_config


def _model(seed: int, scale: float = 0.1, **changes) -> GlmForCausalLM:
    """Random weights drawn in numpy (initialising in JAX costs seconds of compile)."""
    cfg = GlmConfig.from_dict({**small_config().model.to_dict(), "moe_backend": "dense",
                               "num_nextn_predict_layers": 0,  # the loss reads the main head
                               **changes})
    graphdef, state = nnx.split(nnx.eval_shape(lambda: GlmForCausalLM(cfg, rngs=nnx.Rngs(0))))
    rng = np.random.default_rng(seed)
    return nnx.merge(graphdef, jax.tree.map(
        lambda x: jnp.asarray(scale * rng.standard_normal(x.shape), x.dtype), state))


def test_token_kl_matches_a_direct_computation():
    rng = np.random.default_rng(0)
    s, t = rng.normal(size=(2, 3, 5)), rng.normal(size=(2, 3, 5))
    ps = np.exp(s / 2) / np.exp(s / 2).sum(-1, keepdims=True)
    pt = np.exp(t / 2) / np.exp(t / 2).sum(-1, keepdims=True)
    expected = (pt * (np.log(pt) - np.log(ps))).sum(-1) * 4
    np.testing.assert_allclose(token_kl(jnp.asarray(s), jnp.asarray(t), temperature=2.0),
                               expected, rtol=1e-5)


def test_distillation_toward_itself_is_zero_and_toward_a_teacher_falls():
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, 256, (2, 24)), jnp.int32)
    weights = jnp.ones((2, 24)).at[:, :5].set(0.0)  # a prompt part that is not distilled
    student, teacher = _model(0), _model(1)
    logits_of = nnx.jit(lambda m: m(tokens).logits)
    opt = optax.adam(1e-2)

    @nnx.jit
    def step(model, opt_state, teacher_logits):
        def f(m):
            return distillation_loss(m(tokens).logits, [(teacher_logits, weights)])[0]
        value, grads = nnx.value_and_grad(f)(model)
        params = nnx.state(model, nnx.Param)
        updates, opt_state = opt.update(grads, opt_state, params)
        nnx.update(model, optax.apply_updates(params, updates))
        max_grad = jnp.max(jnp.stack([jnp.abs(g).max() for g in jax.tree.leaves(grads)]))
        return value, max_grad, opt_state

    opt_state = opt.init(nnx.state(student, nnx.Param))
    zero, max_grad, opt_state = step(student, opt_state, logits_of(student))
    assert abs(float(zero)) < 1e-6 and float(max_grad) < 1e-6

    target = logits_of(teacher)
    losses = []
    for _ in range(15):
        value, _, opt_state = step(student, opt_state, target)
        losses.append(float(value))
    assert losses[-1] < 0.5 * losses[0], losses


# ------------------------------------------------------- DistillationLoss through make_trainer
# The same small model in the trainer (dense experts: micro-batches then see exactly the
# full batch's computation), teachers loaded from real orbax checkpoints by Teachers.
def _trainer_config():
    return small_config(**{"model.moe_backend": "dense", "train.mtp_loss_weight": 0.0})


def _save_checkpoint(path, pure, model: dict) -> str:
    """A train.py-style step folder: 'params' (the model's pure dict), 'config' (the run
    config, here only its model section)."""
    import orbax.checkpoint as ocp

    handler = ocp.CompositeCheckpointHandler(params=ocp.PyTreeCheckpointHandler(),
                                             config=ocp.JsonCheckpointHandler())
    with ocp.Checkpointer(handler) as ckptr:
        ckptr.save(path, args=ocp.args.Composite(params=ocp.args.PyTreeSave(pure),
                                                 config=ocp.args.JsonSave({"model": model})))
    return str(path)


def _pure(state):
    return jax.device_get(nnx.to_pure_dict(nnx.merge_state(state.params, state.biases)))


def _batch(rows: int = 4, length: int = 32) -> dict:
    """Two documents per row (segment 0 padding at some row ends), a loss_mask that leaves
    out each document's first tokens (its "prompt")."""
    rng = np.random.default_rng(2)
    tokens = rng.integers(0, 256, (rows, length))
    seg, pos, mask = (np.zeros((rows, length), np.int32) for _ in range(3))
    for r in range(rows):
        cut, end = 9 + 3 * r, length - 2 * r
        seg[r, :cut], seg[r, cut:end] = 1, 2
        pos[r, :cut], pos[r, cut:end] = np.arange(cut), np.arange(end - cut)
        mask[r] = (pos[r] >= 4) & (seg[r] > 0)
    return {k: jnp.asarray(v, jnp.int32) for k, v in
            dict(tokens=tokens, segment_ids=seg, positions=pos, loss_mask=mask).items()}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(config, mesh, the student's trainer: distillation at temperature 2, SGD with lr 1
    (the update is minus the gradient), 2 micro-batches; its initial state; checkpoints:
    'self' = the student's initial weights, 'a' and 'b' = other random weights, 'vocab' =
    a model with another vocabulary)."""
    from glm_jax.sft.distill import DistillationLoss
    from glm_jax.train.trainer import make_trainer
    from sharding.mesh import make_mesh

    cfg = _trainer_config()
    mesh = make_mesh({"data": 1}, jax.devices()[:1])
    trainer = make_trainer(cfg, mesh, DistillationLoss(temperature=2.0, mtp_depths=1),
                           tx=optax.sgd(1.0), micro_batches=2)
    init = trainer.init()
    root = tmp_path_factory.mktemp("teachers")
    model = cfg.model.to_dict()
    no_mtp = {**model, "num_nextn_predict_layers": 0}

    def pure(model):
        return jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model)))

    ckpts = {"self": _save_checkpoint(root / "self", _pure(init), model),
             "a": _save_checkpoint(root / "a", pure(_model(1, scale=0.3)), no_mtp),
             "b": _save_checkpoint(root / "b", pure(_model(3, scale=0.3)), no_mtp),
             "vocab": _save_checkpoint(root / "vocab", pure(_model(1, vocab_size=300)),
                                       {**no_mtp, "vocab_size": 300})}
    return cfg, mesh, trainer, init, ckpts


def test_trainer_toward_a_teacher_equal_to_the_student_changes_nothing(setup):
    """Zero loss, zero gradient, and the SGD update leaves every weight where it was, with
    the batch in 2 micro-batches."""
    from glm_jax.sft.teachers import Teachers

    cfg, mesh, trainer, init, ckpts = setup
    teachers = Teachers([ckpts["self"]], mesh, vocab_size=cfg.model.vocab_size)
    batch = teachers(_batch())
    assert batch["teacher_logits"].shape == (4, 1, 32, cfg.model.vocab_size)
    # Deterministic (a resumed run sees the logits the uninterrupted one saw).
    np.testing.assert_array_equal(teachers(_batch())["teacher_logits"],
                                  batch["teacher_logits"])
    state, m = trainer.step(jax.tree.map(jnp.copy, init), batch)
    m = jax.device_get(m)
    assert abs(float(m["loss"])) < 1e-6 and abs(float(m["kl"])) < 1e-6
    assert float(m["grad_norm"]) < 1e-5, float(m["grad_norm"])
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-6),
                 jax.device_get(state.params), jax.device_get(init.params))
    # distilled pairs: the masked next-token targets (one teacher).
    assert float(m["distilled_tokens"]) == float(m["valid_tokens"]) > 0


def test_trainer_kl_toward_a_different_teacher_falls(setup):
    from glm_jax.sft.teachers import Teachers

    cfg, mesh, trainer, init, ckpts = setup
    batch = Teachers([ckpts["a"]], mesh, vocab_size=cfg.model.vocab_size)(_batch())
    state, kls = jax.tree.map(jnp.copy, init), []
    for _ in range(12):
        state, m = trainer.step(state, batch)
        kls.append(float(m["kl"]))
    assert all(b < a for a, b in zip(kls, kls[1:])) and kls[-1] < 0.5 * kls[0], kls


def test_trainer_gradient_equals_jax_grad_of_distillation_loss(setup):
    """Two teachers, routed per row (teacher_mask), temperature 2, mixed with the masked
    next-token CE (ce_weight 0.25), in 2 micro-batches: the step's gradient equals
    jax.grad of (0.75 * distillation_loss + 0.25 * CE) written directly on the full batch
    (atol: a millionth of each weight's largest gradient, for the entries that sum to ~0)."""
    from glm_jax.sft.distill import DistillationLoss
    from glm_jax.sft.teachers import Teachers
    from glm_jax.train.loss import cross_entropy, shifted_targets
    from glm_jax.train.trainer import make_trainer

    cfg, mesh, _, init, ckpts = setup
    teachers = Teachers([ckpts["a"], ckpts["b"]], mesh, vocab_size=cfg.model.vocab_size)
    teacher_mask = jnp.asarray([[1, 0], [1, 1], [0, 1], [1, 1]], jnp.float32)
    batch = dict(teachers(_batch()), teacher_mask=teacher_mask)
    # optax.trace with decay 0 keeps the step's gradient, exactly, as its state (read
    # from the updated weights, it would be rounded to the weights' float32 spacing).
    trainer = make_trainer(cfg, mesh, DistillationLoss(temperature=2.0, ce_weight=0.25,
                                                       mtp_depths=1),
                           tx=optax.trace(decay=0.0), micro_batches=2)
    start = jax.tree.map(jnp.copy, init)  # the step donates its input
    state, m = trainer.step(start.replace(opt_state=trainer.tx.init(start.params)), batch)
    got = nnx.to_pure_dict(jax.device_get(state.opt_state.trace))

    targets, valid = shifted_targets(batch["tokens"], batch["segment_ids"], 1,
                                     batch["loss_mask"])

    def direct(model):
        logits = model(batch["tokens"], positions=batch["positions"],
                       segment_ids=batch["segment_ids"]).logits
        pairs = [(batch["teacher_logits"][:, k], valid * teacher_mask[:, k:k + 1])
                 for k in range(2)]
        kl, metrics = distillation_loss(logits, pairs, temperature=2.0)
        ce, _, count = cross_entropy(logits, targets, valid)
        return 0.75 * kl + 0.25 * ce / count, metrics

    model = trainer.model(jax.tree.map(jnp.copy, init))
    (want_loss, want_m), want = nnx.jit(nnx.value_and_grad(
        direct, argnums=nnx.DiffState(0, nnx.Param), has_aux=True))(model)
    m = jax.device_get(m)
    assert float(want_m["kl/teacher_0"]) > 0.05 and float(want_m["kl/teacher_1"]) > 0.05
    np.testing.assert_allclose(m["loss"], want_loss, rtol=1e-5)
    for key in ("kl", "kl/teacher_0", "kl/teacher_1", "distilled_tokens"):
        np.testing.assert_allclose(m[key], want_m[key], rtol=1e-5, err_msg=key)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5,
                                                         atol=1e-6 * np.abs(b).max()),
                 got, jax.device_get(nnx.to_pure_dict(want)))


def test_a_teacher_with_another_vocabulary_is_refused(setup):
    from glm_jax.sft.teachers import Teachers

    cfg, mesh, _, _, ckpts = setup
    with pytest.raises(ValueError) as e:
        Teachers([ckpts["self"], ckpts["vocab"]], mesh, vocab_size=cfg.model.vocab_size)
    message = str(e.value)
    assert "\n" not in message
    assert (f"config.sft.teachers: teacher {ckpts['vocab']} has vocab_size=300 but the "
            f"student has vocab_size={cfg.model.vocab_size}") in message


def test_distillation_loss_rejects_bad_settings():
    from glm_jax.sft.distill import DistillationLoss

    with pytest.raises(ValueError, match="temperature=0"):
        DistillationLoss(temperature=0)
    with pytest.raises(ValueError, match=r"ce_weight=1.5: must be in \[0, 1\]"):
        DistillationLoss(ce_weight=1.5)

