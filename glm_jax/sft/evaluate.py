"""Evaluation by generation: run each record's prompt through a policy in GLM-4.5's chat
format, execute the calculator when the model calls it, and score the final answer with the
verifier. Accuracy is reported per mode (thinking / non-thinking) and per task.

A policy maps a batch of prompts (token ids) to the generated continuations (token ids,
ending at a stop token or cut off). `model_policy` is the real one (glm_jax.generate, greedy
by default); any function of that shape works (a served model, a scripted reference).

Mode of a record: a thinking record is asked with the plain generation prompt; a
non-thinking one (its user turn ends with /nothink) also gets the empty `<think></think>`
prefilled, as serving engines do for enable_thinking=False.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from glm_jax.chat.parse import parse_assistant
from glm_jax.chat.render import ASSISTANT, STOP_TOKENS, render
from glm_jax.chat.tokens import ChatTokenizer
from glm_jax.sft.calculator import call_calculator
from glm_jax.sft.reward import reward
from glm_jax.sft.tasks import prompt_messages

Policy = Callable[[list[np.ndarray]], list[np.ndarray]]


def model_policy(model, tokenizer: ChatTokenizer, *, max_new_tokens: int,
                 temperature: float = 0.0, seed: int = 0, speculative: str = "none") -> Policy:
    """A policy that generates with `model` (glm_jax.generate), stopping at the format's
    stop tokens (<|endoftext|>, <|user|>, <|observation|>)."""
    from glm_jax.generate import generate

    stop_ids = [tokenizer.special_ids[t] for t in STOP_TOKENS]

    def policy(prompts: list[np.ndarray]) -> list[np.ndarray]:
        out = generate(model, [p.tolist() for p in prompts], max_new_tokens=max_new_tokens,
                       temperature=temperature, eos_ids=stop_ids, seed=seed,
                       speculative=speculative, pad_id=tokenizer.pad_id)
        return [out.tokens[b, :out.lengths[b]] for b in range(len(prompts))]

    return policy


def _tool_result(call: dict[str, Any]) -> str:
    fn = call["function"]
    if fn["name"] != "calculator":
        return f"error: unknown tool {fn['name']!r}"
    return call_calculator(fn["arguments"])


def run_episodes(records: Sequence[dict[str, Any]], policy: Policy, tokenizer: ChatTokenizer,
                 *, max_tool_rounds: int = 2, batch_size: int = 16) -> list[dict[str, Any]]:
    """Play every record's prompt to a final answer: a response with tool calls gets the
    tool results and another turn, up to `max_tool_rounds` times. Returns one result per
    record: {"id", "task", "thinking", "answer", "reward", "messages"} where "messages" is the
    whole played conversation (prompt, assistant turns, tool results)."""
    episodes = [{"record": r, "messages": prompt_messages(r), "rounds": 0, "final": None}
                for r in records]
    while True:
        active = [e for e in episodes if e["final"] is None]
        if not active:
            break
        for lo in range(0, len(active), batch_size):
            chunk = active[lo:lo + batch_size]
            texts = [render(e["messages"], e["record"].get("tools"), add_generation_prompt=True,
                            enable_thinking=e["record"]["thinking"]).text for e in chunk]
            outputs = policy([tokenizer.encode(t)[0] for t in texts])
            for e, text, ids in zip(chunk, texts, outputs):
                # The prefilled part of the generation prompt belongs to the response.
                prefill = text[text.rindex(ASSISTANT) + len(ASSISTANT):]
                message = parse_assistant(prefill + tokenizer.decode(ids),
                                          e["record"].get("tools"))
                unfinished = message.pop("finished", True) is False
                e["messages"].append(message)
                if message.get("tool_calls") and not unfinished and e["rounds"] < max_tool_rounds:
                    e["rounds"] += 1
                    e["messages"] += [{"role": "tool", "content": _tool_result(c)}
                                      for c in message["tool_calls"]]
                else:
                    e["final"] = {**message, "finished": not unfinished}
    return [{"id": e["record"].get("id"), "task": e["record"].get("task"),
             "thinking": e["record"]["thinking"], "answer": e["record"]["answer"],
             "reward": reward(e["final"], e["record"]["answer"]), "messages": e["messages"]}
            for e in episodes]


def accuracy(results: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Mean reward overall ("all"), per mode ("thinking", "non_thinking") and per task
    ("task/add", ...), over the results that have one."""
    groups: dict[str, list[float]] = collections.defaultdict(list)
    for r in results:
        for key in ("all", "thinking" if r["thinking"] else "non_thinking", f"task/{r['task']}"):
            groups[key].append(r["reward"])
    return {k: float(np.mean(v)) for k, v in sorted(groups.items())}
