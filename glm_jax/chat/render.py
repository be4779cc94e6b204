"""Conversations (OpenAI-style messages) -> GLM-4.5's prompt text, and which characters of it
the model writes.

The text is exactly what the hub model's chat template produces (`apply_chat_template` with
`tools=`, `enable_thinking=`, `add_generation_prompt=`), so a model fine-tuned on it keeps
working behind vLLM / SGLang / llama.cpp, which render prompts with that template:

    [gMASK]<sop>                                   once, at the start
    <|system|>\\n# Tools ... <tools>\\n{tool json}\\n ... </tools> ...   if a tool list is given
    <|system|>\\n{content}
    <|user|>\\n{content}[/nothink]                   /nothink: non-thinking mode, appended
                                                   when enable_thinking=False
    <|assistant|>\\n<think>{reasoning}</think>\\n{content}
                 \\n<tool_call>{name}\\n<arg_key>{k}</arg_key>\\n<arg_value>{v}</arg_value>
                 \\n</tool_call>
    <|observation|>\\n<tool_response>\\n{result}\\n</tool_response>   one role token for a run of
                                                   consecutive tool results
    <|assistant|>                                  the generation prompt (+ \\n<think></think>
                                                   when enable_thinking=False)

Rules the format imposes (and this module follows):
  * reasoning is kept only on assistant turns after the last user message (the turns the
    model is still working on); earlier turns, and turns without reasoning, show an empty
    `<think></think>`;
  * reasoning and content are stripped of surrounding whitespace; empty content is omitted;
  * tool-call argument values that are strings are written raw, others as JSON
    (`json.dumps(ensure_ascii=False)`), so the parser decodes non-strings back;
  * an assistant turn has no end token of its own: the model ends it by writing the next
    role token, `<|user|>` after an answer and `<|observation|>` after tool calls (both are
    stop tokens of the hub generation config). For training, that token belongs to the
    assistant turn, and a conversation that ends on an assistant turn gets it appended.

One deliberate difference from the template: a missing (`None`) content renders as empty
text; the template would print the word "None" for an OpenAI-style tool-call message whose
content is null.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from typing import Any

# The special tokens of GLM-4.5's format, by their text in the hub tokenizer.
GMASK, SOP = "[gMASK]", "<sop>"
SYSTEM, USER, ASSISTANT, OBSERVATION = "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>"
ENDOFTEXT = "<|endoftext|>"
THINK, END_THINK = "<think>", "</think>"
TOOL_CALL, END_TOOL_CALL = "<tool_call>", "</tool_call>"
ARG_KEY, END_ARG_KEY = "<arg_key>", "</arg_key>"
ARG_VALUE, END_ARG_VALUE = "<arg_value>", "</arg_value>"
TOOL_RESPONSE, END_TOOL_RESPONSE = "<tool_response>", "</tool_response>"
NOTHINK = "/nothink"
SPECIAL_TOKENS: tuple[str, ...] = (
    ENDOFTEXT, GMASK, SOP, SYSTEM, USER, ASSISTANT, OBSERVATION, THINK, END_THINK, TOOL_CALL,
    END_TOOL_CALL, ARG_KEY, END_ARG_KEY, ARG_VALUE, END_ARG_VALUE, TOOL_RESPONSE,
    END_TOOL_RESPONSE, NOTHINK)
# Generation stops at any of these (the hub generation config's eos_token_id list).
STOP_TOKENS: tuple[str, ...] = (ENDOFTEXT, USER, OBSERVATION)

# The fixed text that introduces a tool list in the system part: the model was trained on
# these exact words, so they are data of the format, not prose of ours.
_TOOLS_HEAD = ("# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
               "You are provided with function signatures within <tools></tools> XML tags:\n"
               "<tools>\n")
_TOOLS_TAIL = ("</tools>\n\nFor each function call, output the function name and arguments "
               "within the following XML format:\n<tool_call>{function-name}\n"
               "<arg_key>{arg-key-1}</arg_key>\n<arg_value>{arg-value-1}</arg_value>\n"
               "<arg_key>{arg-key-2}</arg_key>\n<arg_value>{arg-value-2}</arg_value>\n"
               "...\n</tool_call>")

ROLES = ("system", "user", "assistant", "tool")


class ChatFormatError(ValueError):
    """A conversation that cannot be rendered (or trained on); the message names the
    message index and field."""


@dataclasses.dataclass(frozen=True)
class Rendered:
    """A rendered conversation. `spans` are the [start, end) character ranges the model
    writes (assistant turns and their end-of-turn tokens), sorted and disjoint."""
    text: str
    spans: tuple[tuple[int, int], ...]

    def trained_text(self) -> list[str]:
        return [self.text[a:b] for a, b in self.spans]


def visible_text(content: Any, where: str) -> str:
    """A message's text: a string, a list of OpenAI content parts (`{"type": "text",
    "text": ...}` or plain strings), or None (empty)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, Sequence) and not isinstance(content, Mapping):
        parts = []
        for part in content:
            if isinstance(part, str):
                parts.append(part)
            elif isinstance(part, Mapping) and part.get("type") == "text":
                parts.append(str(part.get("text", "")))
            else:
                raise ChatFormatError(f"{where}: content part {part!r} is not text (only text "
                                      "parts are supported)")
        return "".join(parts)
    raise ChatFormatError(f"{where}: content must be a string, a list of text parts or null, "
                          f"got {type(content).__name__}")


def split_reasoning(message: Mapping[str, Any], where: str) -> tuple[str, str]:
    """(reasoning, content) of an assistant message: `reasoning_content` if it is a string,
    else a `<think>...</think>` block at the head of the content (as the hub template reads
    messages that carry their reasoning inline)."""
    content = visible_text(message.get("content"), where)
    reasoning = message.get("reasoning_content")
    if isinstance(reasoning, str):
        return reasoning, content
    if reasoning is not None:
        raise ChatFormatError(f"{where}: reasoning_content must be a string or null")
    if END_THINK in content:
        head, _, tail = content.partition(END_THINK)
        # The last <think> before the first </think> opens the block; the content is what
        # follows the last </think>.
        reasoning = head.rstrip("\n").split(THINK)[-1].lstrip("\n")
        content = tail.split(END_THINK)[-1].lstrip("\n")
        return reasoning, content
    return "", content


def tool_call_parts(call: Any, where: str) -> tuple[str, dict[str, Any]]:
    """(name, arguments) of an OpenAI tool call `{"type": "function", "function": {"name",
    "arguments"}}` (or the bare function dict); arguments as a dict or a JSON object string."""
    if not isinstance(call, Mapping):
        raise ChatFormatError(f"{where}: a tool call must be an object")
    fn = call.get("function", call)
    if not isinstance(fn, Mapping) or not isinstance(fn.get("name"), str) or not fn["name"]:
        raise ChatFormatError(f"{where}: a tool call needs function.name (a non-empty string)")
    args = fn.get("arguments", {})
    if isinstance(args, str):
        try:
            args = json.loads(args) if args.strip() else {}
        except json.JSONDecodeError as e:
            raise ChatFormatError(f"{where}: function.arguments is not valid JSON ({e.msg})"
                                  ) from None
    if not isinstance(args, Mapping):
        raise ChatFormatError(f"{where}: function.arguments must be a JSON object")
    return fn["name"], dict(args)


def argument_text(value: Any) -> str:
    """An argument value as written between <arg_value> tags: strings raw, others JSON."""
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def render_assistant_body(message: Mapping[str, Any], *, keep_reasoning: bool,
                          where: str = "assistant message") -> str:
    """What the model writes after `<|assistant|>` for this message (without the
    end-of-turn token)."""
    reasoning, content = split_reasoning(message, where)
    reasoning = reasoning.strip() if keep_reasoning else ""
    out = [f"\n{THINK}{reasoning}{END_THINK}"]
    if content.strip():
        out.append("\n" + content.strip())
    for i, call in enumerate(message.get("tool_calls") or ()):
        name, args = tool_call_parts(call, f"{where}, tool_calls[{i}]")
        out.append(f"\n{TOOL_CALL}{name}\n")
        for key, value in args.items():
            out.append(f"{ARG_KEY}{key}{END_ARG_KEY}\n{ARG_VALUE}{argument_text(value)}"
                       f"{END_ARG_VALUE}\n")
        out.append(END_TOOL_CALL)
    return "".join(out)


def render_tools(tools: Sequence[Mapping[str, Any]]) -> str:
    """The system part that lists the tools (one JSON object per line)."""
    lines = "".join(json.dumps(tool, ensure_ascii=False) + "\n" for tool in tools)
    return f"{SYSTEM}\n{_TOOLS_HEAD}{lines}{_TOOLS_TAIL}"


def _end_of_turn(message: Mapping[str, Any]) -> str:
    return OBSERVATION if message.get("tool_calls") else USER


def render(messages: Sequence[Mapping[str, Any]], tools: Sequence[Mapping[str, Any]] | None = None,
           *, add_generation_prompt: bool = False, enable_thinking: bool = True,
           for_training: bool = False) -> Rendered:
    """Render `messages` (and an optional OpenAI tool list) in GLM-4.5's format.

    enable_thinking=False is the non-thinking mode: every user message gets `/nothink`
    (unless it already ends with it) and the generation prompt an empty `<think></think>`.
    for_training=True checks that every assistant turn is ended the way the model ends it
    (an answer by a user turn or the end, tool calls by tool results) and appends the
    end-of-turn token after a final assistant turn. Raises ChatFormatError naming the
    message on malformed input.
    """
    if not isinstance(messages, Sequence) or isinstance(messages, (str, bytes)):
        raise ChatFormatError("messages must be a list of message objects")
    if tools is not None and (not isinstance(tools, Sequence) or isinstance(tools, (str, bytes))
                              or not all(isinstance(t, Mapping) for t in tools)):
        raise ChatFormatError("tools must be a list of objects")
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or m.get("role") not in ROLES:
            role = m.get("role") if isinstance(m, Mapping) else None
            raise ChatFormatError(f"messages[{i}]: role {role!r} is not one of {ROLES}")
    last_user = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=-1)

    pieces: list[tuple[str, bool]] = [(GMASK + SOP, False)]  # (text, written by the model)
    if tools:
        pieces.append((render_tools(tools), False))
    pending_end: str | None = None  # end-of-turn token owed by the previous assistant turn

    def open_turn(token: str, i: int) -> None:
        nonlocal pending_end
        if pending_end is not None and for_training and token != pending_end:
            prev = "has tool_calls" if pending_end == OBSERVATION else "has no tool_calls"
            raise ChatFormatError(f"messages[{i - 1}]: the assistant turn {prev} but is "
                                  f"followed by a {messages[i]['role']} message")
        pieces.append((token, pending_end == token))
        pending_end = None

    for i, m in enumerate(messages):
        where = f"messages[{i}] ({m['role']})"
        role = m["role"]
        if role == "system":
            open_turn(SYSTEM, i)
            pieces.append(("\n" + visible_text(m.get("content"), where), False))
        elif role == "user":
            open_turn(USER, i)
            content = visible_text(m.get("content"), where)
            if not enable_thinking and not content.endswith(NOTHINK):
                content += NOTHINK
            pieces.append(("\n" + content, False))
        elif role == "assistant":
            open_turn(ASSISTANT, i)
            pieces.append((render_assistant_body(m, keep_reasoning=i > last_user, where=where),
                           True))
            pending_end = _end_of_turn(m)
        else:  # tool
            content = m.get("content")
            if not isinstance(content, str):
                raise ChatFormatError(f"{where}: a tool result's content must be a string")
            if i == 0 or messages[i - 1]["role"] != "tool":
                open_turn(OBSERVATION, i)
            pieces.append((f"\n{TOOL_RESPONSE}\n{content}\n{END_TOOL_RESPONSE}", False))
    if pending_end is not None and for_training:
        pieces.append((pending_end, True))
    if add_generation_prompt:
        pieces.append((ASSISTANT + ("" if enable_thinking else f"\n{THINK}{END_THINK}"), False))
    if for_training and not any(train for _, train in pieces):
        raise ChatFormatError("the conversation has no assistant message to train on")

    text, spans, pos = [], [], 0
    for piece, train in pieces:
        if train and piece:
            if spans and spans[-1][1] == pos:
                spans[-1] = (spans[-1][0], pos + len(piece))
            else:
                spans.append((pos, pos + len(piece)))
        text.append(piece)
        pos += len(piece)
    return Rendered("".join(text), tuple(spans))
