"""GLM-4.5's chat format: rendered text equals hand-written strings of the hub template's
output, the parser inverts the renderer, and special tokens map to ids (byte default and a
hub-style tokenizer.json)."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from configs import tiny
from glm_jax.chat.parse import parse_assistant
from glm_jax.chat.render import (SPECIAL_TOKENS, ChatFormatError, render,
                                 render_assistant_body)
from glm_jax.chat.tokens import ByteChatTokenizer, HubChatTokenizer, tokenize
from glm_jax.train.data import BYTE_PAD

CALC = {"type": "function", "function": {
    "name": "calculator", "description": "Evaluate an expression.",
    "parameters": {"type": "object", "properties": {"expression": {"type": "string"},
                                                    "precision": {"type": "integer"}},
                   "required": ["expression"]}}}
TOOLS_PREAMBLE = (
    "<|system|>\n# Tools\n\nYou may call one or more functions to assist with the user query."
    "\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>\n")
TOOLS_EPILOGUE = (
    "\n</tools>\n\nFor each function call, output the function name and arguments within the "
    "following XML format:\n<tool_call>{function-name}\n<arg_key>{arg-key-1}</arg_key>\n"
    "<arg_value>{arg-value-1}</arg_value>\n<arg_key>{arg-key-2}</arg_key>\n"
    "<arg_value>{arg-value-2}</arg_value>\n...\n</tool_call>")


# ------------------------------------------------------------------ renderer
def test_single_turn_thinking():
    messages = [{"role": "user", "content": "What is 2+3?"},
                {"role": "assistant", "reasoning_content": "2 plus 3 is 5.", "content": "5"}]
    assert render(messages).text == (
        "[gMASK]<sop><|user|>\nWhat is 2+3?<|assistant|>\n<think>2 plus 3 is 5.</think>\n5")
    assert render(messages[:1], add_generation_prompt=True).text == (
        "[gMASK]<sop><|user|>\nWhat is 2+3?<|assistant|>")


def test_single_turn_nothink():
    messages = [{"role": "user", "content": "What is 2+3?"},
                {"role": "assistant", "content": "5"}]
    assert render(messages, enable_thinking=False).text == (
        "[gMASK]<sop><|user|>\nWhat is 2+3?/nothink<|assistant|>\n<think></think>\n5")
    assert render(messages[:1], add_generation_prompt=True, enable_thinking=False).text == (
        "[gMASK]<sop><|user|>\nWhat is 2+3?/nothink<|assistant|>\n<think></think>")
    # /nothink already typed by the user is not doubled.
    typed = [{"role": "user", "content": "What is 2+3?/nothink"}]
    assert render(typed, enable_thinking=False).text == (
        "[gMASK]<sop><|user|>\nWhat is 2+3?/nothink")


def test_multi_turn_drops_earlier_reasoning():
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "reasoning_content": "A greeting.", "content": "Hello!"},
        {"role": "user", "content": "2*4?"},
        {"role": "assistant", "reasoning_content": " 2*4 is 8.\n", "content": "\n8 "},
    ]
    assert render(messages).text == (
        "[gMASK]<sop><|system|>\nBe brief.<|user|>\nHi<|assistant|>\n<think></think>\n"
        "Hello!<|user|>\n2*4?<|assistant|>\n<think>2*4 is 8.</think>\n8")
    # Reasoning given inline in the content is read the same way.
    inline = messages[:4] + [{"role": "assistant",
                              "content": "<think>\n2*4 is 8.\n</think>\n\n8"}]
    assert render(inline).text == render(messages).text


def test_tool_call_with_two_arguments_and_its_observation():
    messages = [
        {"role": "user", "content": "Round 2/3 to 3 places."},
        {"role": "assistant", "reasoning_content": "Use the calculator.", "content": None,
         "tool_calls": [{"type": "function", "function": {
             "name": "calculator",
             "arguments": json.dumps({"expression": "2 / 3", "precision": 3})}}]},
        {"role": "tool", "content": "0.667"},
        {"role": "assistant", "content": "2/3 is about 0.667."},
    ]
    assert render(messages).text == (
        "[gMASK]<sop><|user|>\nRound 2/3 to 3 places.<|assistant|>\n"
        "<think>Use the calculator.</think>\n<tool_call>calculator\n"
        "<arg_key>expression</arg_key>\n<arg_value>2 / 3</arg_value>\n"
        "<arg_key>precision</arg_key>\n<arg_value>3</arg_value>\n</tool_call>"
        "<|observation|>\n<tool_response>\n0.667\n</tool_response>"
        "<|assistant|>\n<think></think>\n2/3 is about 0.667.")


def test_system_prompt_with_tool_list():
    weather = {"type": "function", "function": {
        "name": "get_weather", "description": "Weather of a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                       "required": ["city"]}}}
    messages = [{"role": "system", "content": "You are helpful."},
                {"role": "user", "content": "Weather in Oslo?"}]
    assert render(messages, [weather], add_generation_prompt=True).text == (
        "[gMASK]<sop>" + TOOLS_PREAMBLE +
        '{"type": "function", "function": {"name": "get_weather", "description": "Weather of '
        'a city.", "parameters": {"type": "object", "properties": {"city": {"type": '
        '"string"}}, "required": ["city"]}}}' + TOOLS_EPILOGUE +
        "<|system|>\nYou are helpful.<|user|>\nWeather in Oslo?<|assistant|>")


def test_consecutive_tool_results_share_one_observation_token():
    messages = [{"role": "user", "content": "q"},
                {"role": "assistant", "content": "", "tool_calls": [
                    {"function": {"name": "a", "arguments": {}}},
                    {"function": {"name": "b", "arguments": {"x": [1, "ü"]}}}]},
                {"role": "tool", "content": "A"}, {"role": "tool", "content": "B"}]
    assert render(messages).text.endswith(
        "<|assistant|>\n<think></think>\n<tool_call>a\n</tool_call>\n<tool_call>b\n"
        "<arg_key>x</arg_key>\n<arg_value>[1, \"ü\"]</arg_value>\n</tool_call>"
        "<|observation|>\n<tool_response>\nA\n</tool_response>\n<tool_response>\nB\n"
        "</tool_response>")


def test_training_render_spans_and_errors():
    messages = [{"role": "user", "content": "q"},
                {"role": "assistant", "content": "", "tool_calls": [
                    {"function": {"name": "f", "arguments": {"k": 1}}}]},
                {"role": "tool", "content": "r"},
                {"role": "assistant", "reasoning_content": "ok", "content": "done"}]
    r = render(messages, for_training=True)
    assert r.trained_text() == [
        "\n<think></think>\n<tool_call>f\n<arg_key>k</arg_key>\n<arg_value>1</arg_value>\n"
        "</tool_call><|observation|>", "\n<think>ok</think>\ndone<|user|>"]
    assert r.text == render(messages).text + "<|user|>"
    with pytest.raises(ChatFormatError, match=r"messages\[1\].*has tool_calls.*user"):
        render(messages[:2] + [{"role": "user", "content": "x"}], for_training=True)
    with pytest.raises(ChatFormatError, match=r"messages\[1\].*no tool_calls.*tool"):
        render([messages[0], messages[3], messages[2]], for_training=True)
    with pytest.raises(ChatFormatError, match="no assistant message"):
        render(messages[:1], for_training=True)
    with pytest.raises(ChatFormatError, match=r"messages\[0\]: role 'bot'"):
        render([{"role": "bot", "content": "x"}])
    with pytest.raises(ChatFormatError, match="arguments is not valid JSON"):
        render([{"role": "assistant", "tool_calls": [
            {"function": {"name": "f", "arguments": "{oops"}}]}])


# ------------------------------------------------------------------ parser
ASSISTANT_TURNS = [
    {"role": "assistant", "content": "5"},
    {"role": "assistant", "content": "5", "reasoning_content": "2 plus 3\nis 5."},
    {"role": "assistant", "content": "", "reasoning_content": "Use the tool.",
     "tool_calls": [{"type": "function", "function": {
         "name": "calculator", "arguments": {"expression": "2 / 3", "precision": 3}}}]},
    {"role": "assistant", "content": "Calling two tools.", "tool_calls": [
        {"type": "function", "function": {"name": "calculator",
                                          "arguments": {"expression": "42"}}},
        {"type": "function", "function": {"name": "other", "arguments": {
            "items": [1, "two", {"three": 3.5}], "flag": True, "none": None,
            "text": "multi\nline <b>"}}}]},
]


@pytest.mark.parametrize("message", ASSISTANT_TURNS)
def test_parse_inverts_render(message):
    body = render_assistant_body(message, keep_reasoning=True)
    assert parse_assistant(body, [CALC]) == message
    assert parse_assistant(body + "<|observation|>", [CALC]) == message  # stop token dropped


def test_parse_unfinished_and_schema_free_values():
    assert parse_assistant("\n<think>still thinking") == {
        "role": "assistant", "content": "", "reasoning_content": "still thinking",
        "finished": False}
    cut = parse_assistant("\n<think></think>\n<tool_call>calculator\n<arg_key>expr")
    assert cut["finished"] is False and "tool_calls" not in cut
    # Without the tool list, a JSON-looking string comes back decoded; with it, verbatim.
    body = ("<tool_call>calculator\n<arg_key>expression</arg_key>\n<arg_value>42</arg_value>\n"
            "</tool_call>")
    assert parse_assistant(body)["tool_calls"][0]["function"]["arguments"] == {"expression": 42}
    assert parse_assistant(body, [CALC])["tool_calls"][0]["function"]["arguments"] == {
        "expression": "42"}


# ------------------------------------------------------------------ tokens
def test_byte_tokenizer_special_ids_fit_the_tiny_vocab():
    tok = ByteChatTokenizer()
    ids = sorted(tok.special_ids.values())
    assert len(set(ids)) == len(SPECIAL_TOKENS) and ids[0] == 256 and ids[1] > BYTE_PAD
    assert tok.vocab_size <= tiny.get_config().model.vocab_size
    text = "[gMASK]<sop><|user|>\nhé <think>x</think>/nothink"
    enc, starts = tok.encode(text)
    assert tok.decode(enc) == text
    assert enc[:3].tolist() == [tok.special_ids[t] for t in ("[gMASK]", "<sop>", "<|user|>")]
    assert enc[-1] == tok.special_ids["/nothink"]
    assert starts[5] == starts[6] == text.index("é")  # two bytes of one character


def _write_hub_tokenizer(path, specials):
    """A small byte-level BPE tokenizer.json with the given added special tokens, shaped like
    the hub's (the format's tokens are added tokens)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    # Trimmed offsets (whitespace left out of a token's span), as byte-level hub tokenizers
    # report them: the loss mask must not depend on them.
    tok.post_processor = processors.ByteLevel(trim_offsets=True)
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=list(specials),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["What is 2+3? The answer is 5.", "Use the calculator please."],
                            trainer)
    tok.save(str(path))
    return str(path)


def test_hub_tokenizer_maps_special_tokens_by_name(tmp_path):
    path = _write_hub_tokenizer(tmp_path / "tokenizer.json", SPECIAL_TOKENS)
    tok = HubChatTokenizer(path)
    assert tok.special_ids == {t: i for i, t in enumerate(SPECIAL_TOKENS)}
    rendered = render([{"role": "user", "content": "What is 2+3?"},
                       {"role": "assistant", "reasoning_content": "add", "content": "5"}],
                      for_training=True)
    ids, mask = tokenize(rendered, tok)
    assert tok.decode(ids) == rendered.text
    assert tok.decode(ids[mask == 1]) == "\n<think>add</think>\n5<|user|>"
    missing = _write_hub_tokenizer(tmp_path / "no_observation.json",
                                   [t for t in SPECIAL_TOKENS if t != "<|observation|>"])
    with pytest.raises(ValueError, match=re.escape("special token '<|observation|>' of")):
        HubChatTokenizer(missing)
    # /nothink may be ordinary text to a tokenizer; it still round-trips.
    plain = HubChatTokenizer(_write_hub_tokenizer(
        tmp_path / "no_nothink.json", [t for t in SPECIAL_TOKENS if t != "/nothink"]))
    assert "/nothink" not in plain.special_ids
    assert plain.decode(plain.encode("2+3?/nothink<|assistant|>")[0]) == "2+3?/nothink<|assistant|>"


def test_loss_mask_covers_exactly_the_assistant_tokens(tmp_path):
    """Token by token: the conversation encoded piece by piece (prompt pieces 0, assistant
    pieces 1) equals tokenize(render(...)) in ids and in mask, for both tokenizers."""
    messages = [{"role": "system", "content": "sys"},
                {"role": "user", "content": "Round 2/3."},
                {"role": "assistant", "reasoning_content": "tool", "content": "", "tool_calls": [
                    {"function": {"name": "calculator",
                                  "arguments": {"expression": "2 / 3", "precision": 3}}}]},
                {"role": "tool", "content": "0.667"},
                {"role": "assistant", "reasoning_content": "read it", "content": "0.667"}]
    pieces = [
        ("[gMASK]<sop>" + TOOLS_PREAMBLE + json.dumps(CALC) + TOOLS_EPILOGUE
         + "<|system|>\nsys<|user|>\nRound 2/3.<|assistant|>", 0),
        ("\n<think>tool</think>\n<tool_call>calculator\n<arg_key>expression</arg_key>\n"
         "<arg_value>2 / 3</arg_value>\n<arg_key>precision</arg_key>\n<arg_value>3"
         "</arg_value>\n</tool_call><|observation|>", 1),
        ("\n<tool_response>\n0.667\n</tool_response><|assistant|>", 0),
        ("\n<think>read it</think>\n0.667<|user|>", 1),
    ]
    rendered = render(messages, [CALC], for_training=True)
    assert rendered.text == "".join(p for p, _ in pieces)
    hub = HubChatTokenizer(_write_hub_tokenizer(tmp_path / "t.json", SPECIAL_TOKENS))
    for tok in (ByteChatTokenizer(), hub):
        expected_ids = np.concatenate([tok.encode(p)[0] for p, _ in pieces])
        expected_mask = np.concatenate([np.full(len(tok.encode(p)[0]), m) for p, m in pieces])
        ids, mask = tokenize(rendered, tok)
        np.testing.assert_array_equal(ids, expected_ids)
        np.testing.assert_array_equal(mask, expected_mask)


# ------------------------------------------------------------------ chat CLI
def test_chat_cli_bad_input_is_one_line_and_exit_2():
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "glm_jax.chat", "--ckpt", "/nonexistent/ckpt",
                           "--message", "hi"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "--ckpt /nonexistent/ckpt: no such folder" in lines[0]
