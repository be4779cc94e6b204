"""Generation (issue 8): KV-cache decoding equals transformers' greedy `generate` and a full
recomputation; MTP speculation changes nothing in the greedy output; ragged batches, padded
batches with an attention mask (left and right padding); EOS.

Every test shares one tiny model and batch shape [2, 7], so the jitted prefill / decode /
speculative programs compile once for the whole file."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import glm_jax
from glm_jax import from_hf_state_dict
from glm_jax.generate import _decode_step, sample
from glm_jax.kv_cache import init_cache
from hf_reference import glm_config, hf_model, hf_mtp_model, hub_state_dict, mtp_hub_state_dict

NEW = 12
PROMPTS = np.random.RandomState(0).randint(0, 97, (2, 7))
RAGGED = [PROMPTS[0], PROMPTS[1, :4]]
# Padded layouts of [PROMPTS[0], SHORT] with the pad id 0, which SHORT also holds as a real
# token: only the attention mask tells them apart.
PAD = 0
SHORT = np.r_[PROMPTS[1, :2], PAD, PROMPTS[1, 3:4]]
LEFT = np.stack([PROMPTS[0], np.r_[[PAD] * 3, SHORT]])
LEFT_MASK = np.stack([np.ones(7, np.int64), np.r_[[0] * 3, [1] * 4]])
RIGHT = np.stack([PROMPTS[0], np.r_[SHORT, [PAD] * 3]])
RIGHT_MASK = LEFT_MASK[:, ::-1].copy()


@pytest.fixture(scope="module")
def hf():
    return hf_model(0)


@pytest.fixture(scope="module")
def model(hf):
    config = glm_config(hf)
    mtp = hf_mtp_model(hf, seed=3)
    return from_hf_state_dict({**hub_state_dict(hf),
                               **mtp_hub_state_dict(mtp, config.num_hidden_layers)}, config)


@pytest.fixture(scope="module")
def repeat_drafter(model):
    """The same main model with its MTP layer rewired to pass the hidden state straight to
    the head: it drafts "the current token again". Random weights would never be right;
    this one is right exactly when the model repeats itself, so both the accept and the
    reject paths run."""
    graphdef, state = nnx.split(model)
    m = nnx.merge(graphdef, jax.tree.map(lambda x: x, state))
    layer, h = m.mtp_layers[0], m.config.hidden_size
    layer.hidden_norm.scale[...] = jnp.ones((h,))
    layer.final_norm.scale[...] = jnp.ones((h,))
    layer.eh_proj.kernel[...] = jnp.concatenate([jnp.zeros((h, h)), jnp.eye(h)])
    layer.block.attn.o_proj.kernel[...] = jnp.zeros_like(layer.block.attn.o_proj.kernel[...])
    layer.block.mlp.w_down[...] = jnp.zeros_like(layer.block.mlp.w_down[...])
    down = layer.block.mlp.shared_experts.down_proj.kernel
    down[...] = jnp.zeros_like(down[...])
    return m


def _hf_greedy(hf, ids: np.ndarray, mask: np.ndarray | None = None, new: int = NEW
               ) -> np.ndarray:
    """transformers' greedy tokens. The mask is always passed (all ones by default): without
    it, transformers would take every real token equal to pad_token_id for padding."""
    ids = np.atleast_2d(ids)
    mask = np.ones_like(ids) if mask is None else mask
    with torch.no_grad():
        out = hf.generate(torch.tensor(ids), attention_mask=torch.tensor(mask),
                          max_new_tokens=new, do_sample=False, eos_token_id=None,
                          pad_token_id=PAD)
    return out[:, ids.shape[1]:].numpy()


def test_greedy_equals_transformers(hf, model):
    out = glm_jax.generate(model, PROMPTS, max_new_tokens=NEW)
    np.testing.assert_array_equal(out.tokens, _hf_greedy(hf, PROMPTS))
    assert (out.lengths == NEW).all() and out.acceptance_rate is None
    # One compiled decode step serves every token of every call of this shape.
    compiled = _decode_step._cache_size()
    glm_jax.generate(model, PROMPTS[::-1], max_new_tokens=NEW)
    assert _decode_step._cache_size() == compiled


def test_ragged_batch_equals_each_prompt_alone(hf, model):
    out = glm_jax.generate(model, RAGGED, max_new_tokens=NEW)
    for b, prompt in enumerate(RAGGED):
        np.testing.assert_array_equal(out.tokens[b], _hf_greedy(hf, prompt)[0])


@pytest.mark.parametrize("ids,mask", [(LEFT, LEFT_MASK), (RIGHT, RIGHT_MASK)],
                         ids=["left", "right"])
def test_padded_batch_with_mask_equals_transformers(hf, model, ids, mask):
    """Left padding: transformers' tokens for the same ids and mask. Right padding: the
    same tokens, i.e. each prompt alone (transformers itself continues a right-padded row
    from its last pad, and warns that the result is wrong)."""
    out = glm_jax.generate(model, ids, attention_mask=mask, max_new_tokens=NEW, pad_id=PAD)
    want = _hf_greedy(hf, LEFT, LEFT_MASK)
    np.testing.assert_array_equal(out.tokens, want)
    np.testing.assert_array_equal(want[1], _hf_greedy(hf, SHORT)[0])
    # The real 0 token in SHORT is a token: dropping it changes the continuation.
    assert not np.array_equal(want[1], _hf_greedy(hf, SHORT[SHORT != PAD])[0])


def test_pad_id_in_an_unmasked_array_warns(model, recwarn):
    with pytest.warns(UserWarning, match="pad id 0 but no attention_mask"):
        glm_jax.generate(model, RIGHT, max_new_tokens=1, pad_id=PAD)
    recwarn.clear()
    glm_jax.generate(model, RIGHT, attention_mask=RIGHT_MASK, max_new_tokens=1, pad_id=PAD)
    glm_jax.generate(model, RAGGED, max_new_tokens=1, pad_id=PAD)
    assert not [w for w in recwarn if "attention_mask" in str(w.message)]


@nnx.jit
def _full(model, ids):
    out = model(ids)
    return out.logits, out.mtp_logits[0]


@nnx.jit
def _cached(model, ids, next_ids, cache, index):
    positions = index[:, None] + jnp.arange(ids.shape[1], dtype=index.dtype)[None, :]
    out = model(ids, positions=positions, cache=cache)  # the one forward, with a cache
    mtp_logits, cache = model.mtp_draft(next_ids, out.hidden_states, positions=positions,
                                        cache=out.cache)
    return out.logits, mtp_logits, cache


def test_cached_decoding_equals_full_forward(model):
    """Teacher-forced: a prefill of the first 7 tokens, then one token per call; main and
    MTP logits at every position equal the uncached forward over the whole sequence."""
    seq = np.random.RandomState(1).randint(0, 97, (2, 7 + 5))
    ref_logits, ref_mtp = _full(model, jnp.asarray(seq))
    cache = init_cache(model, 2, seq.shape[1], with_mtp=True)
    nxt = np.roll(seq, -1, axis=1)  # MTP position i reads token i + 1
    logits, mtp, cache = _cached(model, jnp.asarray(seq[:, :7]), jnp.asarray(nxt[:, :7]),
                                 cache, jnp.zeros(2, jnp.int32))
    got, got_mtp = [logits], [mtp]
    for i in range(7, seq.shape[1] - 1):  # the last MTP position has no next token
        logits, mtp, cache = _cached(model, jnp.asarray(seq[:, i:i + 1]),
                                     jnp.asarray(nxt[:, i:i + 1]), cache,
                                     jnp.full(2, i, jnp.int32))
        got.append(logits)
        got_mtp.append(mtp)
    got, got_mtp = np.concatenate(got, 1), np.concatenate(got_mtp, 1)
    np.testing.assert_allclose(got, np.asarray(ref_logits)[:, :-1], atol=1e-5)
    np.testing.assert_allclose(got_mtp, np.asarray(ref_mtp)[:, :-1], atol=1e-5)


def test_speculative_greedy_equals_plain_greedy(hf, repeat_drafter):
    plain = glm_jax.generate(repeat_drafter, RAGGED, max_new_tokens=NEW)
    spec = glm_jax.generate(repeat_drafter, RAGGED, max_new_tokens=NEW, speculative="mtp")
    np.testing.assert_array_equal(spec.tokens, plain.tokens)
    np.testing.assert_array_equal(spec.lengths, plain.lengths)
    # The main model is unchanged by the MTP rewiring: still transformers' greedy output.
    np.testing.assert_array_equal(plain.tokens[0], _hf_greedy(hf, RAGGED[0])[0])
    # The drafter proposes g[j] for g[j + 1]: replay the accept / reject walk exactly.
    drafted = accepted = steps = 0
    for g in plain.tokens:
        j, row_steps = 0, 0
        while j < NEW - 1:
            row_steps += 1
            drafted += 1
            hit = g[j + 1] == g[j]
            accepted += int(hit)
            j += 2 if hit else 1
        steps = max(steps, row_steps)
    assert (spec.drafted, spec.accepted, spec.steps) == (drafted, accepted, steps)
    assert 0 < spec.acceptance_rate < 1


def test_eos_stops_each_row(model, repeat_drafter):
    free = glm_jax.generate(model, PROMPTS, max_new_tokens=NEW)
    eos = int(free.tokens[0, 3])
    for m, speculative in ((model, "none"), (repeat_drafter, "mtp")):
        out = glm_jax.generate(m, PROMPTS, max_new_tokens=NEW, eos_ids=(eos, 96),
                               speculative=speculative)
        for b in range(2):
            hits = np.flatnonzero(np.isin(free.tokens[b], (eos, 96)))
            n = hits[0] + 1 if hits.size else NEW
            assert out.lengths[b] == n
            np.testing.assert_array_equal(out.row(b), free.tokens[b, :n])
            pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0
            assert (out.tokens[b, n:] == pad).all()
        assert (out.lengths < NEW).any()  # the EOS did cut a row short


def test_sample_filters():
    logits = jnp.asarray(np.random.RandomState(2).randn(64, 10), jnp.float32)
    key = jax.random.key(0)
    top = np.asarray(jnp.argmax(logits, -1))
    np.testing.assert_array_equal(sample(logits, key), top)
    np.testing.assert_array_equal(sample(logits, key, 1.0, top_k=1), top)
    np.testing.assert_array_equal(sample(logits, key, 1.0, top_p=1e-6), top)
    two = np.asarray(jax.lax.top_k(logits, 2)[1])
    draws = np.asarray(sample(logits, key, 5.0, top_k=2))
    assert ((draws == two[:, 0]) | (draws == two[:, 1])).all()
    assert (draws != two[:, 0]).any()  # a hot temperature does pick the runner-up


def test_bad_arguments(model):
    with pytest.raises(ValueError, match="speculative"):
        glm_jax.generate(model, PROMPTS, max_new_tokens=2, speculative="medusa")
    with pytest.raises(ValueError, match="empty prompt"):
        glm_jax.generate(model, [PROMPTS[0], []], max_new_tokens=2)
    with pytest.raises(ValueError, match="empty prompt"):
        glm_jax.generate(model, PROMPTS, attention_mask=LEFT_MASK * [[1], [0]], max_new_tokens=2)
    with pytest.raises(ValueError, match=r"attention_mask has shape \[2, 6\]"):
        glm_jax.generate(model, PROMPTS, attention_mask=LEFT_MASK[:, 1:], max_new_tokens=2)
    with pytest.raises(ValueError, match="attention_mask must hold only 1"):
        glm_jax.generate(model, PROMPTS, attention_mask=2 * LEFT_MASK, max_new_tokens=2)
    with pytest.raises(ValueError, match="vocab|token ids"):
        glm_jax.generate(model, [[1, 2, 500]], max_new_tokens=2)
    no_mtp = nnx.eval_shape(lambda: glm_jax.GlmForCausalLM(
        model.config.replace(num_nextn_predict_layers=0), rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match="MTP layer"):
        glm_jax.generate(no_mtp, PROMPTS, max_new_tokens=2, speculative="mtp")
