"""Evaluation by generation: play each record's prompt with a policy in GLM-4.5's chat
format (glm_jax.chat.session: the calculator runs when the model calls it), then score the
final answer with the verifier. Accuracy is reported per mode (thinking / non-thinking) and
per task.
"""

from __future__ import annotations

import collections
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from glm_jax.chat.session import Conversation, Policy, model_policy, respond
from glm_jax.chat.tokens import ChatTokenizer
from glm_jax.sft.calculator import call_calculator
from glm_jax.sft.reward import reward
from glm_jax.sft.tasks import prompt_messages

__all__ = ["accuracy", "model_policy", "run_episodes", "run_tool"]


def run_tool(call: Mapping[str, Any]) -> str:
    """The embedded tasks' only tool: the calculator."""
    fn = call["function"]
    if fn["name"] != "calculator":
        return f"error: unknown tool {fn['name']!r}"
    return call_calculator(fn["arguments"])


def run_episodes(records: Sequence[dict[str, Any]], policy: Policy, tokenizer: ChatTokenizer,
                 *, max_tool_rounds: int = 2, batch_size: int = 16) -> list[dict[str, Any]]:
    """Play every record's prompt to a final answer. Returns one result per record:
    {"id", "task", "thinking", "answer", "reward", "messages"} where "messages" is the whole
    played conversation (prompt, assistant turns, tool results)."""
    conversations = [Conversation(prompt_messages(r), r.get("tools"), r["thinking"])
                     for r in records]
    respond(conversations, policy, tokenizer, run_tool, max_tool_rounds=max_tool_rounds,
            batch_size=batch_size)
    results = []
    for r, c in zip(records, conversations):
        final = {**c.messages[-1], "finished": c.finished}
        results.append({"id": r.get("id"), "task": r.get("task"), "thinking": r["thinking"],
                        "answer": r["answer"], "reward": reward(final, r["answer"]),
                        "messages": c.messages})
    return results


def accuracy(results: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Mean reward overall ("all"), per mode ("thinking", "non_thinking") and per task
    ("task/add", ...)."""
    groups: dict[str, list[float]] = collections.defaultdict(list)
    for r in results:
        for key in ("all", "thinking" if r["thinking"] else "non_thinking", f"task/{r['task']}"):
            groups[key].append(r["reward"])
    return {k: float(np.mean(v)) for k, v in sorted(groups.items())}
