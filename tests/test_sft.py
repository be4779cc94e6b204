"""SFT data and loss: JSONL conversations -> tokens + loss weights (file:line errors),
whole-conversation packing, the masked loss (packed equals per-conversation, on a small
model), the embedded task set and its verifier."""

from __future__ import annotations

import json
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from glm_jax.chat.render import render
from glm_jax.chat.tokens import ByteChatTokenizer, tokenize
from glm_jax.config import GlmConfig
from glm_jax.model.transformer import GlmForCausalLM
from glm_jax.sft import calculator, data, reward, tasks
from glm_jax.train.data import BYTE_PAD, Corpus, DocumentRows, make_dataset
from glm_jax.train.loss import NextTokenLoss, shifted_targets
from train_config import small_config

TOK = ByteChatTokenizer()


@pytest.fixture(scope="module")
def task_set():
    return tasks.default_sft_set(seed=3, train_problems=40, eval_problems=10)


# ------------------------------------------------------------------ JSONL -> corpus
def _write(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_jsonl_to_tokens_and_loss_mask(tmp_path, task_set):
    train, _ = task_set
    path = _write(tmp_path / "c.jsonl", [json.dumps(r) for r in train[:6]] + [""])
    corpus = data.load_conversations([path], TOK)
    assert corpus.doc_starts.size == 6 and corpus.loss_mask.shape == corpus.tokens.shape
    for d, record in enumerate(train[:6]):
        ids, mask = tokenize(render(record["messages"], record.get("tools"),
                                    for_training=True), TOK)
        lo = corpus.doc_starts[d]
        np.testing.assert_array_equal(corpus.tokens[lo:lo + ids.size], ids)
        np.testing.assert_array_equal(corpus.loss_mask[lo:lo + ids.size], mask)


def test_exported_embedded_set_loads_to_the_same_corpus(tmp_path):
    data.export_embedded(str(tmp_path), seed=5, train_problems=10, eval_problems=2)
    corpus, held_out = data.embedded_corpus(TOK, seed=5, train_problems=10, eval_problems=2)
    loaded = data.load_conversations([str(tmp_path / "train.jsonl")], TOK)
    np.testing.assert_array_equal(loaded.tokens, corpus.tokens)
    np.testing.assert_array_equal(loaded.loss_mask, corpus.loss_mask)
    assert [json.loads(x) for x in (tmp_path / "held_out.jsonl").read_text().splitlines()
            ] == held_out


@pytest.mark.parametrize("bad, error", [
    ('{"messages": [{"role": "user", "content": "q"}', r"c\.jsonl:2: not valid JSON"),
    ('{"conversation": []}', r"c\.jsonl:2: .*\"messages\" list"),
    ('{"messages": [{"role": "bot", "content": "q"}]}', r"c\.jsonl:2: messages\[0\]: role 'bot'"),
    ('{"messages": [{"role": "user", "content": "q"}]}', r"c\.jsonl:2: .*no assistant message"),
    ('{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}, '
     '{"role": "tool", "content": "r"}]}', r"c\.jsonl:2: messages\[1\].*no tool_calls"),
])
def test_malformed_records_name_file_and_line(tmp_path, bad, error):
    good = json.dumps({"messages": [{"role": "user", "content": "q"},
                                    {"role": "assistant", "content": "a"}]})
    path = _write(tmp_path / "c.jsonl", [good, bad])
    with pytest.raises(ValueError, match=error):
        data.load_conversations([path], TOK)


# ------------------------------------------------------------------ packing
def _corpus(docs, weights):
    starts = np.cumsum([0] + [len(d) for d in docs[:-1]])
    return Corpus(np.concatenate(docs).astype(np.int32), starts, 300, "test",
                  loss_mask=np.concatenate(weights).astype(np.float32))


def test_document_rows_keep_conversations_whole():
    docs = [[1, 2, 3], [4, 5, 6, 7, 8], [9, 10], [11, 12, 13, 14, 15, 16, 17]]
    weights = [[0, 1, 1], [0, 0, 1, 1, 1], [0, 1], [0, 1, 0, 1, 0, 1, 0]]
    rows = DocumentRows(_corpus(docs, weights), seq_len=6, pad_id=BYTE_PAD)
    assert len(rows) == 4 and rows.truncated == 1
    r0, r1, r3 = rows[0], rows[1], rows[3]
    np.testing.assert_array_equal(r0["tokens"], [1, 2, 3, BYTE_PAD, BYTE_PAD, BYTE_PAD])
    np.testing.assert_array_equal(r0["segment_ids"], [1, 1, 1, 0, 0, 0])
    np.testing.assert_array_equal(r1["tokens"], [4, 5, 6, 7, 8, BYTE_PAD])  # 9, 10 do not fit
    np.testing.assert_array_equal(rows[2]["tokens"][:2], [9, 10])
    np.testing.assert_array_equal(r3["tokens"], [11, 12, 13, 14, 15, 16])  # cut to the row
    np.testing.assert_array_equal(r1["loss_mask"], [0, 0, 1, 1, 1, 0])
    np.testing.assert_array_equal(r1["positions"], [0, 1, 2, 3, 4, 0])
    batch = next(iter(make_dataset(_corpus(docs, weights), seq_len=8, global_batch=2, seed=0,
                                   whole_documents=True)))
    assert set(batch) == {"tokens", "segment_ids", "positions", "loss_mask"}
    assert batch["tokens"].shape == (2, 8) and batch["loss_mask"].dtype == np.float32


# ------------------------------------------------------------------ loss
def _masked_batch(rng, rows=4, t=6, vocab=7):
    return {"tokens": jnp.asarray(rng.integers(0, vocab, (rows, t)), jnp.int32),
            "segment_ids": jnp.asarray(np.repeat([[1, 1, 1, 2, 2, 0]], rows, 0), jnp.int32),
            "loss_mask": jnp.asarray(rng.integers(0, 2, (rows, t)), jnp.float32)}


def test_masked_loss_matches_a_direct_computation():
    """NextTokenLoss with a loss_mask: the mean CE over marked targets of the same document."""
    rng = np.random.default_rng(0)
    batch = _masked_batch(rng)
    logits = rng.normal(size=(4, 6, 7)).astype(np.float32)
    fn = NextTokenLoss()
    got, metrics = fn(types.SimpleNamespace(logits=jnp.asarray(logits), mtp_logits=()),
                      fn.prepare(batch))
    tokens, seg, mask = (np.asarray(batch[k]) for k in ("tokens", "segment_ids", "loss_mask"))
    lse = np.log(np.exp(logits.astype(np.float64)).sum(-1))
    ce = lse[:, :-1] - np.take_along_axis(logits[:, :-1], tokens[:, 1:, None], -1)[..., 0]
    w = mask[:, 1:] * (seg[:, 1:] == seg[:, :-1]) * (seg[:, :-1] != 0)
    np.testing.assert_allclose(got, (ce * w).sum() / w.sum(), rtol=1e-6)
    assert float(metrics["valid_tokens"]) == w.sum()


def test_masked_loss_of_micro_batches_adds_up_to_the_batch_loss():
    """prepare() normalizes over the whole batch, so the row groups' losses (what the
    trainer computes per micro-batch) sum to the one-batch loss, main head and MTP."""
    rng = np.random.default_rng(1)
    batch = _masked_batch(rng)
    out = types.SimpleNamespace(logits=jnp.asarray(rng.normal(size=(4, 6, 7)), jnp.float32),
                                mtp_logits=(jnp.asarray(rng.normal(size=(4, 6, 7)),
                                                        jnp.float32),))
    fn = NextTokenLoss(mtp_loss_weight=0.3, mtp_depths=1)
    prepared = fn.prepare(batch)
    whole, _ = fn(out, prepared)
    parts = 0.0
    for rows in (slice(0, 1), slice(1, 4)):  # unequal numbers of trained tokens
        part_out = types.SimpleNamespace(logits=out.logits[rows],
                                         mtp_logits=(out.mtp_logits[0][rows],))
        parts += fn(part_out, {k: v[rows] for k, v in prepared.items()})[0]
    np.testing.assert_allclose(parts, whole, rtol=1e-6)


def test_packed_sft_loss_equals_per_conversation_losses(task_set):
    """NextTokenLoss with the batch's loss_mask (the SFT loss): packed rows give each conversation the same weighted CE (main head and MTP) as the
    conversation alone in its row, and the packed loss is their token-weighted mean."""
    train, _ = task_set
    records = [r for r in train if r["task"] != "tool"][:6]
    corpus = data.conversation_corpus(((str(i), r) for i, r in enumerate(records)), TOK, "t")
    # The dense MoE backend compiles fastest; packing does not depend on the backend.
    model_cfg = GlmConfig.from_dict({**small_config().model.to_dict(), "moe_backend": "dense"})
    # Random weights drawn in numpy: initialising the model in JAX costs seconds of compile.
    graphdef, state = nnx.split(nnx.eval_shape(lambda: GlmForCausalLM(model_cfg,
                                                                      rngs=nnx.Rngs(0))))
    rng = np.random.default_rng(0)
    model = nnx.merge(graphdef, jax.tree.map(
        lambda x: jnp.asarray(0.1 * rng.standard_normal(x.shape), x.dtype), state))

    @nnx.jit
    def forward(model, batch):
        out = model(batch["tokens"], positions=batch["positions"],
                    segment_ids=batch["segment_ids"])
        fn = NextTokenLoss(mtp_loss_weight=0.3, mtp_depths=1)
        total, _ = fn(out, fn.prepare(batch))
        per_head = []  # per-token weighted CE [B, T] and weights, main head then MTP
        for shift, logits in ((1, out.logits), (2, out.mtp_logits[0])):
            targets, valid = shifted_targets(batch["tokens"], batch["segment_ids"], shift,
                                             batch["loss_mask"])
            w = valid.astype(jnp.float32)
            lse = jax.nn.logsumexp(logits, axis=-1)
            ce = lse - jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
            per_head.append((ce * w, w))
        return total, per_head

    def batch_of(rows):
        return {k: jnp.asarray(np.stack([r[k] for r in rows])) for k in rows[0]}

    # One compiled shape for both runs: [len(records), 256]; the packed rows are topped up
    # with empty rows (all padding, no weight).
    packed = DocumentRows(corpus, 256, BYTE_PAD)
    assert len(packed) < len(records)  # rows hold several conversations
    rows = [packed[i] for i in range(len(packed))]
    empty = {k: np.zeros_like(v) for k, v in rows[0].items()}
    total, packed_heads = forward(model, batch_of(rows + [empty] * (len(records) - len(rows))))
    ends = np.append(corpus.doc_starts[1:], corpus.num_tokens)
    alone_rows = [DocumentRows(Corpus(corpus.tokens[lo:hi], np.zeros(1, np.int64), 0, "",
                                      corpus.loss_mask[lo:hi]), 256, BYTE_PAD)[0]
                  for lo, hi in zip(corpus.doc_starts, ends)]
    _, alone_heads = forward(model, batch_of(alone_rows))

    seg = np.stack([r["segment_ids"] for r in rows])
    where = [(r, s) for r in range(len(rows)) for s in range(1, seg[r].max() + 1)]
    assert len(where) == len(records)  # conversations in corpus order: row by row
    for (ce_p, w_p), (ce_a, w_a) in zip(packed_heads, alone_heads):
        ce_p, w_p, ce_a, w_a = map(np.asarray, (ce_p, w_p, ce_a, w_a))
        for d, (r, s) in enumerate(where):
            in_seg = seg[r] == s
            assert w_p[r][in_seg].sum() == w_a[d].sum() > 0
            np.testing.assert_allclose(ce_p[r][in_seg].sum(), ce_a[d].sum(), rtol=2e-5)
    main = float(np.sum(alone_heads[0][0]) / np.sum(alone_heads[0][1]))
    mtp = float(np.sum(alone_heads[1][0]) / np.sum(alone_heads[1][1]))
    np.testing.assert_allclose(float(total), main + 0.3 * mtp, rtol=1e-5)
    # Every trained token of the data is a target of the main head exactly once, except
    # none: a conversation's first token is never trained.
    assert float(np.sum(packed_heads[0][1])) == float(corpus.loss_mask.sum())


# ------------------------------------------------------------------ tasks and verifier
def test_max_digits_caps_the_operands():
    import random
    import re
    for cap in (1, 2, 3):
        for task in ("add", "sub", "mul", "tool"):
            for seed in range(20):
                problem = tasks.make_problem(random.Random(seed), task, max_digits=cap)
                numbers = re.findall(r"\d+", problem["question"])
                assert len(numbers) == 2 and all(len(n) <= cap for n in numbers), problem
    # One-digit additions: 100 questions at most, so asking for more is a clear error.
    train, held_out = tasks.default_sft_set(0, 60, 20, ("add",), max_digits=1)
    assert len(train) == 120 and len(held_out) == 40
    with pytest.raises(ValueError, match="max_digits=1"):
        tasks.default_sft_set(0, 200, 20, ("add",), max_digits=1)
    with pytest.raises(ValueError, match="max_digits=0"):
        tasks.make_problem(random.Random(0), "add", max_digits=0)


def test_task_set_is_deterministic_split_and_renders(task_set):
    train, held_out = task_set
    assert (train, held_out) == tasks.default_sft_set(seed=3, train_problems=40,
                                                      eval_problems=10)
    assert train != tasks.default_sft_set(seed=4, train_problems=40, eval_problems=10)[0]
    assert len(train) == 80 and len(held_out) == 20
    questions = {r["messages"][0]["content"].removesuffix("/nothink") for r in train}
    assert not any(r["messages"][0]["content"].removesuffix("/nothink") in questions
                   for r in held_out)
    assert {r["task"] for r in train} == set(tasks.TASKS)
    for r in train + held_out:
        assert r["thinking"] == ("reasoning_content" in r["messages"][1])
        assert r["messages"][0]["content"].endswith("/nothink") != r["thinking"]
        render(r["messages"], r.get("tools"), for_training=True)
        # The reference answer earns the reward; the prompt is the turns before it.
        last = r["messages"][-1]
        assert reward.reward(last, r["answer"]) == 1.0
        assert tasks.prompt_messages(r) == r["messages"][:1]
    tool = next(r for r in train if r["task"] == "tool")
    expression = tool["messages"][1]["tool_calls"][0]["function"]["arguments"]["expression"]
    assert tool["messages"][2]["content"] == str(calculator.evaluate(expression)) == tool["answer"]


def test_traces_compute_the_answer():
    assert tasks.addition_trace(8993, 82).endswith("So 8993 + 82 = 9075.")
    assert "carry 1" in tasks.addition_trace(8993, 82)
    assert tasks.subtraction_trace(347, 189) == (
        "Split 189 by place value and subtract each part. 347 - 100 = 247. 247 - 80 = 167. "
        "167 - 9 = 158. So 347 - 189 = 158.")
    assert tasks.multiplication_trace(47, 36) == (
        "Split 36 into 30 + 6. 47 * 30 = 1410. 47 * 6 = 282. 1410 + 282 = 1692. "
        "So 47 * 36 = 1692.")


def test_verifier_reads_the_final_answer_only():
    assert reward.reward("\n<think>maybe 12</think>\nThe answer is 1,692.<|user|>", 1692) == 1.0
    assert reward.reward("\n<think>it is 1692</think>\nThe answer is 1690.", 1692) == 0.0
    assert reward.reward("\n<think>1692", 1692) == 0.0  # unfinished
    assert reward.reward("\n<think></think>\n<tool_call>calculator\n<arg_key>expression"
                         "</arg_key>\n<arg_value>1692</arg_value>\n</tool_call>", 1692) == 0.0
    assert reward.reward("\n<think></think>\nno number", 3) == 0.0
    assert reward.final_answer("-12 then 7") == 7


def test_calculator_evaluates_only_arithmetic():
    assert calculator.evaluate("(12 + 7) * -3") == -57
    assert calculator.call_calculator({"expression": "4821 * 37"}) == "178377"
    for bad in ("__import__('os')", "2 ** 8", "1 / 2", "x + 1", "1.5 * 2", "("):
        assert calculator.call_calculator({"expression": bad}).startswith("error:")
    assert calculator.call_calculator({"expression": "9" * 40 + " * " + "9" * 40}).startswith(
        "error: result too large")
    assert calculator.call_calculator({}).startswith("error:")


# ------------------------------------------------------------------ evaluation by generation
def _reference_policy(records, tweak=lambda text: text):
    """Answers every prompt the evaluation can ask with the record's own assistant turn:
    exercises rendering, tokenizing, decoding, parsing and the tool loop end to end."""
    from glm_jax.chat.render import render_assistant_body

    replies = {}
    for r in records:
        for i, m in enumerate(r["messages"]):
            if m["role"] == "assistant":
                prompt = render(r["messages"][:i], r.get("tools"), add_generation_prompt=True,
                                enable_thinking=r["thinking"]).text
                body = render_assistant_body(m, keep_reasoning=True)
                prefill = "" if r["thinking"] else "\n<think></think>"
                end = "<|observation|>" if m.get("tool_calls") else "<|user|>"
                replies[prompt] = tweak(body.removeprefix(prefill) + end)

    def policy(prompts):
        return [TOK.encode(replies[TOK.decode(p)])[0] for p in prompts]

    return policy


def test_evaluation_plays_tool_episodes_and_scores_both_modes(task_set):
    from glm_jax.sft import evaluate

    _, held_out = task_set
    results = evaluate.run_episodes(held_out, _reference_policy(held_out), TOK, batch_size=3)
    acc = evaluate.accuracy(results)
    assert acc["all"] == acc["thinking"] == acc["non_thinking"] == acc["task/tool"] == 1.0
    tool = next(r for r in results if r["task"] == "tool")
    record = next(r for r in held_out if r["id"] == tool["id"])
    assert tool["messages"] == record["messages"]  # the calculator's result was fed back
    wrong = evaluate.run_episodes(
        held_out, _reference_policy(held_out, lambda t: t.replace("answer is ", "answer is 9")),
        TOK)
    assert evaluate.accuracy(wrong)["all"] == 0.0
