"""tie_word_embeddings: the head is the embedding table, as in transformers' glm4_moe.

Tied and untied models against transformers: loading (with and without a `lm_head.weight`
copy), float32 logits (MTP included), the gradients of a train step, export (in memory and through the streaming converter), generation, and a sharded run."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import safetensors.numpy
import torch
import transformers
from flax import nnx

import glm_jax
from glm_jax import from_hf_state_dict, to_hf_state_dict
from glm_jax.convert import convert_to_hf, convert_to_jax, load_checkpoint
from glm_jax.model.params import RouterBias
from glm_jax.safetensors_io import HubFolder
from glm_jax.train.loss import NextTokenLoss
from glm_jax.train.trainer import TrainState, train_step_fn
from hf_reference import glm_config, hf_model, hf_mtp_model, hub_state_dict, mtp_hub_state_dict

VOCAB = 97
IDS = np.random.RandomState(0).randint(1, VOCAB, (2, 9))


@pytest.fixture(scope="module", params=[True, False], ids=["tied", "untied"])
def pair(request):
    """(transformers model, its MTP model, the glm-jax model loaded from their tensors)."""
    hf = hf_model(1, tie_word_embeddings=request.param, num_hidden_layers=2)
    assert (hf.lm_head.weight is hf.model.embed_tokens.weight) == request.param
    mtp = hf_mtp_model(hf, seed=2)
    config = glm_config(hf)
    assert config.tie_word_embeddings == request.param
    sd = {**hub_state_dict(hf), **mtp_hub_state_dict(mtp, config.num_hidden_layers)}
    return hf, mtp, from_hf_state_dict(sd, config), sd


@nnx.jit
def _forward(model, ids):
    out = model(ids)
    return out.logits, out.mtp_logits[0]


def test_logits_equal_transformers(pair):
    hf, mtp, model, _ = pair
    positions = torch.arange(IDS.shape[1])[None].expand(IDS.shape[0], -1)
    with torch.no_grad():
        main = hf(torch.tensor(IDS), output_hidden_states=True)
        h = mtp.forward_layer(0, main.hidden_states[-1], positions, None,
                              input_ids=torch.tensor(np.roll(IDS, -1, axis=1)))
        ref_mtp = mtp._project_to_logits(h).numpy()
    logits, mtp_logits = _forward(model, jnp.asarray(IDS))
    assert np.abs(np.asarray(logits) - main.logits.numpy()).max() <= 1e-4
    assert np.abs(np.asarray(mtp_logits) - ref_mtp).max() <= 1e-4
    tied = model.config.tie_word_embeddings
    assert (model.lm_head is None) == tied
    params = nnx.state(model, nnx.Param)
    assert ("lm_head" in params) != tied


def test_train_step_gradients_equal_transformers(pair):
    """One train step with SGD at rate 1, so params - new params is the gradient: the tied
    embedding's gradient sums the lookup's and the head's, as torch's does."""
    hf, _, model, _ = pair
    hf.zero_grad()
    logits = hf(torch.tensor(IDS)).logits[:, :-1]
    torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB),
                                      torch.tensor(IDS[:, 1:]).reshape(-1)).backward()

    graphdef, params, biases = nnx.split(model, nnx.Param, RouterBias)
    tx = optax.sgd(1.0)
    loss = NextTokenLoss(mtp_depths=model.config.num_mtp_layers)  # MTP weight 0
    step = jax.jit(train_step_fn(graphdef, tx, loss, micro_batches=1, bias_update_rate=1e-3))
    batch = {"tokens": jnp.asarray(IDS, jnp.int32),
             "segment_ids": jnp.ones(IDS.shape, jnp.int32),
             "positions": jnp.broadcast_to(jnp.arange(IDS.shape[1], dtype=jnp.int32), IDS.shape)}
    state = TrainState(params=params, biases=biases, opt_state=tx.init(params),
                       step=jnp.zeros((), jnp.int32), skipped=jnp.zeros((), jnp.int32))
    new, metrics = step(state, batch)
    assert bool(metrics["finite"])
    grad = lambda p: np.asarray(params[p][...]) - np.asarray(new.params[p][...])  # noqa: E731
    np.testing.assert_allclose(grad("embed"), hf.model.embed_tokens.weight.grad.numpy(),
                               atol=1e-5, rtol=0)
    # A token absent from the batch reaches the embedding's gradient only through a head.
    absent = sorted(set(range(VOCAB)) - set(IDS.ravel()))[0]
    tied = model.config.tie_word_embeddings
    assert (np.abs(grad("embed")[absent]).max() > 0) == tied
    assert ("lm_head" in new.params) != tied
    if not tied:
        head = np.asarray(params["lm_head"]["kernel"][...]) - np.asarray(
            new.params["lm_head"]["kernel"][...])
        np.testing.assert_allclose(head.T, hf.lm_head.weight.grad.numpy(), atol=1e-5, rtol=0)


def test_hub_round_trip_and_head_copy(pair):
    _, _, model, sd = pair
    tied = model.config.tie_word_embeddings
    back = to_hf_state_dict(model)
    mtp = f"model.layers.{model.config.num_hidden_layers}."
    mtp_copies = {mtp + "embed_tokens.weight", mtp + "shared_head.head.weight"}
    # As save_pretrained: a tied model writes no lm_head.weight.
    assert set(back) == set(sd) - mtp_copies - ({"lm_head.weight"} if tied else set())
    for k, v in back.items():
        assert v.dtype == sd[k].dtype and np.array_equal(v, sd[k]), k
    # lm_head.weight may be absent (transformers' files) or present as an equal copy.
    again = to_hf_state_dict(from_hf_state_dict(back, model.config))
    assert all(np.array_equal(again[k], back[k]) for k in back)
    if not tied:
        with pytest.raises(KeyError, match="lm_head.weight"):
            from_hf_state_dict({k: v for k, v in sd.items() if k != "lm_head.weight"},
                               model.config)
        return
    bad = dict(sd, **{"lm_head.weight": 2 * sd["model.embed_tokens.weight"]})
    with pytest.raises(ValueError, match="lm_head.weight.*tie_word_embeddings"):
        from_hf_state_dict(bad, model.config)
    # Its MTP head copy is a copy of the embedding.
    bad = dict(sd, **{mtp + "shared_head.head.weight": sd["lm_head.weight"] * 2})
    with pytest.raises(ValueError, match="shared_head.head.weight"):
        from_hf_state_dict(bad, model.config)


def test_generate_equals_transformers(pair):
    hf, _, model, _ = pair
    with torch.no_grad():
        want = hf.generate(torch.tensor(IDS), attention_mask=torch.ones(IDS.shape, dtype=torch.long),
                           max_new_tokens=6, do_sample=False, eos_token_id=None,
                           pad_token_id=0)[:, IDS.shape[1]:].numpy()
    np.testing.assert_array_equal(glm_jax.generate(model, IDS, max_new_tokens=6).tokens, want)
    if model.config.tie_word_embeddings:  # the MTP head is the embedding too
        spec = glm_jax.generate(model, IDS, max_new_tokens=6, speculative="mtp")
        np.testing.assert_array_equal(spec.tokens, want)


def _tied_hub(folder: Path, with_head_copy: bool) -> transformers.Glm4MoeForCausalLM:
    """transformers' save_pretrained of a tied model (no lm_head.weight), plus the MTP
    layer as GLM-4.5 stores it; optionally an lm_head.weight copy, as other writers add."""
    hf = hf_model(3, tie_word_embeddings=True, num_hidden_layers=2)
    hf.save_pretrained(folder, max_shard_size="100KB")
    index_file = folder / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    assert "lm_head.weight" not in index["weight_map"]
    extra = mtp_hub_state_dict(hf_mtp_model(hf, seed=4), hf.config.num_hidden_layers)
    if with_head_copy:
        extra["lm_head.weight"] = hf.model.embed_tokens.weight.detach().numpy().copy()
    safetensors.numpy.save_file(extra, folder / "model-extra.safetensors",
                                metadata={"format": "pt"})
    index["weight_map"].update({k: "model-extra.safetensors" for k in extra})
    index_file.write_text(json.dumps(index))
    return hf


@pytest.mark.parametrize("with_head_copy", [False, True])
def test_streaming_conversion_of_a_tied_checkpoint(tmp_path, with_head_copy):
    hub, ckpt, back = tmp_path / "hub", tmp_path / "ckpt", tmp_path / "back"
    hf = _tied_hub(hub, with_head_copy)
    convert_to_jax(hub, ckpt, progress=False)
    model = load_checkpoint(ckpt)
    assert model.config.tie_word_embeddings and model.lm_head is None
    with torch.no_grad():
        want = hf(torch.tensor(IDS)).logits.numpy()
    assert np.abs(np.asarray(_forward(model, jnp.asarray(IDS))[0]) - want).max() <= 1e-4

    convert_to_hf(ckpt, back, max_shard_size="150KB", progress=False)
    src, out = HubFolder(hub), HubFolder(back)
    assert set(out.tensors) == set(src.tensors) - {"lm_head.weight"}
    for name in out.tensors:
        assert np.asarray(out[name]).tobytes() == np.asarray(src[name]).tobytes(), name
    assert json.loads((back / "config.json").read_text())["tie_word_embeddings"] is True
    again = transformers.AutoModelForCausalLM.from_pretrained(back, dtype=torch.float32).eval()
    again.set_attn_implementation("eager")
    again.set_experts_implementation("eager")
    assert again.lm_head.weight is again.model.embed_tokens.weight
    with torch.no_grad():
        np.testing.assert_allclose(again(torch.tensor(IDS)).logits.numpy(), want, atol=1e-5)
