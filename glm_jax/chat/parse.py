"""Generated text -> an assistant message (reasoning, content, tool calls): the inverse of
`render_assistant_body`, and what the serving engines' GLM-4.5 reasoning and tool parsers
return.

Input is what the model wrote after `<|assistant|>` (a trailing stop token is dropped):

    \\n<think>{reasoning}</think>\\n{content}
    \\n<tool_call>{name}\\n<arg_key>k</arg_key>\\n<arg_value>v</arg_value>\\n</tool_call>

Argument values: for a tool whose JSON schema types the argument as "string" the text is
kept verbatim; otherwise it is JSON-decoded when it parses as JSON, and kept as text when it
does not (the renderer writes strings raw and everything else as JSON). Without a tool list
a string argument that looks like JSON ("42", "true") therefore comes back decoded; pass
the tools to keep it a string.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

from glm_jax.chat.render import (ARG_KEY, ARG_VALUE, END_ARG_KEY, END_ARG_VALUE, END_THINK,
                                 END_TOOL_CALL, STOP_TOKENS, THINK, TOOL_CALL)

_TOOL_CALL_RE = re.compile(re.escape(TOOL_CALL) + r"(.*?)" + re.escape(END_TOOL_CALL), re.DOTALL)
_ARG_RE = re.compile(re.escape(ARG_KEY) + r"(.*?)" + re.escape(END_ARG_KEY) + r"\s*"
                     + re.escape(ARG_VALUE) + r"(.*?)" + re.escape(END_ARG_VALUE), re.DOTALL)


def _string_typed(tools: Sequence[Mapping[str, Any]] | None, name: str, key: str) -> bool:
    for tool in tools or ():
        fn = tool.get("function", tool)
        if fn.get("name") == name:
            prop = ((fn.get("parameters") or {}).get("properties") or {}).get(key) or {}
            return prop.get("type") == "string"
    return False


def _argument_value(text: str, string_typed: bool) -> Any:
    if string_typed:
        return text
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_tool_call(inner: str, tools: Sequence[Mapping[str, Any]] | None = None
                    ) -> dict[str, Any]:
    """The text between <tool_call> and </tool_call> -> an OpenAI tool call with
    `arguments` as a dict. The name ends at the first newline or <arg_key>."""
    cut = min((i for i in (inner.find("\n"), inner.find(ARG_KEY)) if i != -1),
              default=len(inner))
    name = inner[:cut].strip()
    args = {key.strip(): _argument_value(value, _string_typed(tools, name, key.strip()))
            for key, value in _ARG_RE.findall(inner[cut:])}
    return {"type": "function", "function": {"name": name, "arguments": args}}


def parse_assistant(text: str, tools: Sequence[Mapping[str, Any]] | None = None
                    ) -> dict[str, Any]:
    """Generated text -> {"role": "assistant", "content": str, ["reasoning_content": str],
    ["tool_calls": [...]], ["finished": False]}.

    Reasoning is the text inside the first <think>...</think> (absent when empty); content is
    the text after it up to the first <tool_call>, stripped. An unclosed <think> (generation
    cut off while reasoning) gives all of its text as reasoning, empty content, and
    "finished": False; so does an unclosed <tool_call>, which is dropped.
    """
    for stop in STOP_TOKENS:
        if text.endswith(stop):
            text = text[: -len(stop)]
            break
    message: dict[str, Any] = {"role": "assistant"}
    reasoning = None
    finished = True
    if END_THINK in text:
        head, _, text = text.partition(END_THINK)
        reasoning = head.split(THINK, 1)[-1]
    elif THINK in text:
        reasoning, text, finished = text.split(THINK, 1)[1], "", False
    calls = [parse_tool_call(inner, tools) for inner in _TOOL_CALL_RE.findall(text)]
    start = text.find(TOOL_CALL)
    if start != -1 and text.rfind(TOOL_CALL) > text.rfind(END_TOOL_CALL):
        finished = False  # the last tool call was cut off
    content = text if start == -1 else text[:start]
    message["content"] = content.strip()
    if reasoning and reasoning.strip():
        message["reasoning_content"] = reasoning.strip()
    if calls:
        message["tool_calls"] = calls
    if not finished:
        message["finished"] = False
    return message
