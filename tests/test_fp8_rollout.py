"""FP8 rollouts (glm_jax.model.fp8_weights, glm_jax.rl.rollout_weights).

- The device-side quantization gives the hub export's codes and scales bit for bit
  (glm_jax.fp8's numpy reference; its error bound is tested in test_fp8.py), per channel,
  in 128 x 128 blocks and in small blocks with partial edges.
- The FP8 rollout model's logits equal those of the trainer's model with every quantized
  weight replaced by dequantize(quantize(W)) (float32 compute: float tolerance; bfloat16
  compute: the same bf16 weights), and every other tensor is the trainer's, untouched.
- A rollout with the FP8 model samples log-probabilities equal to scoring its tokens with
  that dequantized model.
- A bad config.rl.rollout_dtype / rollout_fp8_layout is one ConfigError line naming it;
  on the command line, one line and exit code 2 before anything is written.

One trainer (the small test config on one device) is shared by the file."""

from __future__ import annotations

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from glm_jax import fp8
from glm_jax.cli_errors import ConfigError
from glm_jax.model import fp8_weights
from glm_jax.model.fp8_weights import Fp8Weight
from glm_jax.rl import loop as rl_loop
from glm_jax.rl.rollout import rollout
from glm_jax.rl.rollout_weights import RolloutWeights
from glm_jax.train.trainer import make_trainer
from sharding.mesh import make_mesh
from train_config import small_config

SMALL_BLOCKS = fp8.Fp8Layout("weight_scale_inv", (12, 10))  # partial edge blocks everywhere
PROMPTS = [[5, 17, 3, 40, 8], [61, 2, 9]]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def trainer_and_state():
    # Wider than the other tests' small config so that 128 x 128 blocks are not whole
    # matrices: hidden 160 gives two blocks (one partial) along every hidden axis.
    config = small_config(**{"model.hidden_size": 160, "model.intermediate_size": 136})
    trainer = make_trainer(config, make_mesh({"data": 1}, jax.devices()[:1]))
    state = trainer.init()
    # A zero output feature in one expert: its scale is 1, its codes 0.
    state.params["moe_layers"]["layers"]["mlp"]["w_up"][...] = (
        state.params["moe_layers"]["layers"]["mlp"]["w_up"][...].at[0, 1, :, 3].set(0.0))
    return trainer, state


def _flat(params) -> dict:
    return {path: v.get_value() for path, v in nnx.to_flat_state(params)}


def _reference_dequantized(params, config, layout: fp8.Fp8Layout) -> dict:
    """Every quantized kernel [..., in, out] -> numpy's dequantize(quantize(W)) of each hub
    matrix W = kernel.T, in float32."""
    out = {}
    for path in fp8_weights.quantized_paths(config):
        kernel = np.asarray(_flat(params)[path], np.float32)
        mats = kernel.reshape(-1, *kernel.shape[-2:])
        deq = [layout.dequantize(*layout.quantize(m.T)).T for m in mats]
        out[path] = np.stack(deq).reshape(kernel.shape)
    return out


def _with(params, replacements: dict, dtype: str):
    flat = []
    for path, v in nnx.to_flat_state(params):
        value = replacements.get(path, v.get_value())
        flat.append((path, v.replace(value=jnp.asarray(value).astype(dtype))))
    return nnx.from_flat_state(flat)


@pytest.mark.parametrize("layout", [fp8.CHANNEL, fp8.BLOCK, SMALL_BLOCKS],
                         ids=["channel", "block128", "block12x10"])
def test_codes_and_scales_are_the_hub_exports(trainer_and_state, layout):
    trainer, state = trainer_and_state
    quantized = jax.jit(lambda p: fp8_weights.quantize_state(p, trainer.config, layout,
                                                             "float32"))(state.params)
    values = _flat(quantized)
    paths = fp8_weights.quantized_paths(trainer.config)
    for path in paths:
        kernel = np.asarray(_flat(state.params)[path], np.float32)
        w = values[path]
        assert isinstance(w, Fp8Weight) and w.codes.dtype == jnp.float8_e4m3fn
        codes = np.asarray(w.codes).reshape(-1, *kernel.shape[-2:])
        scales = np.asarray(w.scale).reshape(-1, *w.scale.shape[-2:])
        for m, c, s in zip(kernel.reshape(-1, *kernel.shape[-2:]), codes, scales):
            ref_codes, ref_scale = layout.quantize(m.T)
            np.testing.assert_array_equal(c.T.view(np.uint8), ref_codes.view(np.uint8),
                                          err_msg=str(path))
            np.testing.assert_array_equal(s.T, ref_scale, err_msg=str(path))
    zero = values[("moe_layers", "layers", "mlp", "w_up")]
    if layout is fp8.CHANNEL:
        assert float(zero.scale[0, 1, 0, 3]) == 1.0
    assert not np.asarray(zero.codes[0, 1, :, 3], np.float32).any()


EXPECTED_QUANTIZED = {  # the layers' Linear weights (the small config has one MTP layer)
    prefix + sub
    for prefix, moe in ((("dense_layers", "layers"), False), (("moe_layers", "layers"), True),
                        (("mtp_layers", 0, "block"), True))
    for sub in [("attn", f"{p}_proj", "kernel") for p in "qkvo"] + (
        [("mlp", f"w_{p}") for p in ("gate", "up", "down")]
        + [("mlp", "shared_experts", f"{p}_proj", "kernel") for p in ("gate", "up", "down")]
        if moe else [("mlp", f"{p}_proj", "kernel") for p in ("gate", "up", "down")])}


@pytest.mark.parametrize("layout", ["channel", "block"])
def test_fp8_model_is_the_dequantized_model_and_leaves_the_rest(trainer_and_state, layout):
    trainer, state = trainer_and_state
    assert fp8_weights.quantized_paths(trainer.config) == EXPECTED_QUANTIZED
    fp8_model = RolloutWeights(trainer, "fp8", fp8_layout=layout,
                               compute_dtype="float32").model(state)
    rollout_values = _flat(nnx.state(fp8_model, nnx.Param))
    trained = _flat(state.params)
    for path, value in rollout_values.items():
        if path in EXPECTED_QUANTIZED:
            assert isinstance(value, Fp8Weight), path
        else:  # router, embedding, head, norms, biases, eh_proj: the trainer's, untouched
            np.testing.assert_array_equal(np.asarray(value), np.asarray(trained[path]),
                                          err_msg=str(path))
    reference = _with(state.params, _reference_dequantized(
        state.params, trainer.config, fp8.LAYOUTS[layout]), "float32")
    dequantized = nnx.merge(trainer.graphdef, reference, state.biases)
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 256, (2, 12)), jnp.int32)
    got, want = nnx.jit(lambda m: m(ids).logits)(fp8_model), nnx.jit(
        lambda m: m(ids).logits)(dequantized)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5, rtol=0)
    # And it is not the trainer's model: FP8 moved the logits.
    exact = nnx.jit(lambda m: m(ids).logits)(trainer.model(state))
    assert float(jnp.abs(got - exact).max()) > 1e-3


def test_bf16_fp8_model_computes_with_the_dequantized_bf16_weights(trainer_and_state):
    trainer, state = trainer_and_state
    weights = RolloutWeights(trainer, "fp8", fp8_layout="channel")
    fp8_model = weights.model(state)
    assert fp8_model.config.dtype == "bfloat16"
    reference = _with(state.params, _reference_dequantized(state.params, trainer.config,
                                                           fp8.CHANNEL), "bfloat16")
    dequantized = nnx.merge(weights.graphdef, reference, state.biases)
    ids = jnp.asarray(np.random.default_rng(1).integers(0, 256, (2, 12)), jnp.int32)
    got = nnx.jit(lambda m: m(ids).logits)(fp8_model).astype(jnp.float32)
    want = nnx.jit(lambda m: m(ids).logits)(dequantized).astype(jnp.float32)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_fp8_rollout_logprobs_are_the_dequantized_models_scores(trainer_and_state):
    trainer, state = trainer_and_state
    fp8_model = RolloutWeights(trainer, "fp8", fp8_layout="block",
                               compute_dtype="float32").model(state)
    r = rollout(fp8_model, PROMPTS, samples_per_prompt=2, max_new_tokens=8,
                temperature=[0.0, 0.9], eos_ids=(), seed=0, pad_id=258)
    reference = _with(state.params, _reference_dequantized(state.params, trainer.config,
                                                           fp8.BLOCK), "float32")
    dequantized = nnx.merge(trainer.graphdef, reference, state.biases)

    @nnx.jit
    def score(model, tokens, temperature, routed):
        logits = model(tokens, routed_experts=routed).logits[:, :-1].astype(jnp.float32)
        t = jnp.where(temperature > 0, temperature, 1.0)[:, None, None]
        logp = jax.nn.log_softmax(logits / t, axis=-1)
        return jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]

    want = np.asarray(score(dequantized, jnp.asarray(r.tokens), jnp.asarray(r.temperature),
                            jnp.asarray(r.routed_experts)))
    mask = r.completion_mask[:, 1:]
    assert mask.sum() == 4 * 8
    np.testing.assert_allclose(r.logprobs[:, 1:][mask], want[mask], atol=2e-5, rtol=0)


@pytest.mark.parametrize("field, value", [("rollout_dtype", "fp16"),
                                          ("rollout_fp8_layout", "tensor")])
def test_bad_rollout_precision_is_a_config_error_naming_the_field(field, value):
    from configs import rl_tiny

    cfg = rl_tiny.get_config()
    cfg.rl[field] = value
    with pytest.raises(ConfigError) as err:
        rl_loop.check(cfg)
    message = str(err.value)
    assert message.startswith(f"config.rl.{field}={value!r}: choose from ")
    assert "\n" not in message


def test_rollout_dtype_model_is_the_trainers_own_weights(trainer_and_state):
    trainer, state = trainer_and_state
    model = RolloutWeights(trainer, "float32").model(state)  # the trainer's dtype: no copy
    assert model.embed.get_value() is state.params["embed"].get_value()
    bf16 = RolloutWeights(trainer, "bfloat16").model(state)
    assert bf16.embed.get_value().dtype == jnp.bfloat16 and bf16.config.dtype == "bfloat16"


def test_bad_rollout_dtype_flag_is_one_line_exit_2(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "glm_jax.rl", "--workdir", str(tmp_path),
                           "--config.rl.rollout_dtype=fp16"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert lines == ["python -m glm_jax.rl: error: config.rl.rollout_dtype='fp16': choose from "
                     "model, float32, bfloat16, fp8"], lines
    assert not os.listdir(tmp_path)


def test_fp8_copy_keeps_the_trainers_shardings_on_a_mesh(trainer_and_state):
    """On fsdp=2 x expert=2 (4 of the simulated devices), the codes and scales are sharded
    as the trainer's kernel, and the logits are the one-device FP8 model's."""
    trainer = trainer_and_state[0]
    state = trainer.init()  # not the fixture's state: it has a zeroed expert feature
    mesh = make_mesh({"data": 1, "fsdp": 2, "expert": 2, "tensor": 1}, jax.devices()[:4])
    config = small_config(**{"model.hidden_size": 160, "model.intermediate_size": 136})
    sharded_trainer = make_trainer(config, mesh)
    sharded_state = sharded_trainer.init()  # the same seed: the same weights, sharded
    ids = jnp.asarray(np.random.default_rng(2).integers(0, 256, (4, 12)), jnp.int32)
    logits = []
    for t, s in ((trainer, state), (sharded_trainer, sharded_state)):
        model = RolloutWeights(t, "fp8", fp8_layout="block", compute_dtype="float32").model(s)
        with jax.set_mesh(t.mesh):
            logits.append(np.asarray(nnx.jit(lambda m: m(ids).logits)(model)))
    w = model.moe_layers.layers.mlp.w_gate.get_value()
    kernel = sharded_state.params["moe_layers"]["layers"]["mlp"]["w_gate"].get_value()
    assert w.codes.sharding.is_equivalent_to(kernel.sharding, kernel.ndim)
    assert not kernel.sharding.is_fully_replicated
    np.testing.assert_allclose(logits[1], logits[0], atol=2e-5, rtol=0)


def test_fp8_copy_on_a_rollout_mesh_equals_the_colocated_one(trainer_and_state):
    """The publisher of the disaggregated mode (roles.ReshardedWeights) with the FP8
    preparation as its prepare_rollout_model: the published codes live on the rollout
    mesh's devices and its logits are the colocated FP8 model's."""
    from glm_jax.rl.roles import ReshardedWeights

    trainer = trainer_and_state[0]
    state = trainer.init()
    weights = RolloutWeights(trainer, "fp8", fp8_layout="channel", compute_dtype="float32")
    rollout_mesh = make_mesh({"data": 2}, jax.devices()[4:6])
    publisher = ReshardedWeights(trainer, rollout_mesh, weights.prepare)
    publisher.publish(state, 3)
    model, version = publisher.latest()
    assert version == 3
    w = model.moe_layers.layers.mlp.w_gate.get_value()
    assert isinstance(w, Fp8Weight) and w.codes.dtype == jnp.float8_e4m3fn
    assert set(w.codes.sharding.device_set) == set(jax.devices()[4:6])
    ids = jnp.asarray(np.random.default_rng(3).integers(0, 256, (2, 12)), jnp.int32)
    logits = []
    for m, mesh in ((weights.model(state), trainer.mesh), (model, rollout_mesh)):
        with jax.set_mesh(mesh):
            logits.append(np.asarray(nnx.jit(lambda m: m(ids).logits)(m)))
    np.testing.assert_allclose(logits[1], logits[0], atol=2e-5, rtol=0)
