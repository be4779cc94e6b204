"""The verifier of the embedded SFT tasks: is the final answer right? Usable as an RL reward.

The final answer is the last integer in the content of the final assistant message (its
visible answer, never its reasoning): "The answer is 1,692." -> 1692. Reasoning is ignored
so a model cannot be rewarded for a right number it only considered.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from glm_jax.chat.parse import parse_assistant

_INTEGER = re.compile(r"-?\d[\d,]*")


def final_answer(content: str) -> int | None:
    """The last integer in `content` (thousands separators allowed), or None."""
    matches = _INTEGER.findall(content)
    if not matches:
        return None
    return int(matches[-1].replace(",", ""))


def reward(response: str | Mapping[str, Any], answer: str | int) -> float:
    """1.0 if the response's final answer equals `answer`, else 0.0. `response` is the text
    the model generated after `<|assistant|>` (parsed here) or a parsed assistant message;
    an unfinished response, or one that ends on a tool call, scores 0."""
    message = parse_assistant(response) if isinstance(response, str) else response
    if message.get("finished") is False or message.get("tool_calls"):
        return 0.0
    got = final_answer(message.get("content") or "")
    return float(got is not None and got == int(answer))
