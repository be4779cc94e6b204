"""Playing conversations forward: prompt -> generation -> parsed assistant message -> tool
results -> next generation, until the assistant answers without calling a tool.

A policy maps a batch of prompts (token ids) to their continuations (token ids, ending at a
stop token or cut off): `model_policy` wraps glm_jax.generate; any function of that shape
works (a served model, a scripted reference in tests). Used by the held-out evaluation
(glm_jax.sft.evaluate) and the chat CLI (python -m glm_jax.chat).

Mode: thinking conversations get the plain generation prompt; non-thinking ones
(enable_thinking=False) get `/nothink` on their user turns and an empty `<think></think>`
prefilled, as serving engines do.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from glm_jax.chat.parse import parse_assistant
from glm_jax.chat.render import ASSISTANT, STOP_TOKENS, render
from glm_jax.chat.tokens import ChatTokenizer

Policy = Callable[[list[np.ndarray]], list[np.ndarray]]
ToolRunner = Callable[[Mapping[str, Any]], str]  # an OpenAI tool call -> the result text


@dataclasses.dataclass
class Conversation:
    messages: list[dict[str, Any]]  # grows as it is played
    tools: list[dict[str, Any]] | None = None
    thinking: bool = True
    finished: bool = False  # the last assistant message ended at a stop token


def model_policy(model, tokenizer: ChatTokenizer, *, max_new_tokens: int,
                 temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
                 speculative: str = "none") -> Policy:
    """Generate with `model` (glm_jax.generate), stopping at the format's stop tokens
    (<|endoftext|>, <|user|>, <|observation|>). Raises ValueError if the model's vocabulary
    cannot hold the tokenizer's ids."""
    from glm_jax.generate import generate

    if model.config.vocab_size < tokenizer.vocab_size:
        raise ValueError(f"the model's vocab_size ({model.config.vocab_size}) is smaller than "
                         f"the chat tokenizer's ({tokenizer.vocab_size})")
    stop_ids = [tokenizer.special_ids[t] for t in STOP_TOKENS]
    calls = [0]

    def policy(prompts: list[np.ndarray]) -> list[np.ndarray]:
        calls[0] += 1  # a fresh sampling seed per call, reproducible from `seed`
        out = generate(model, [p.tolist() for p in prompts], max_new_tokens=max_new_tokens,
                       temperature=temperature, top_p=top_p, eos_ids=stop_ids,
                       seed=seed + calls[0], speculative=speculative, pad_id=tokenizer.pad_id)
        return [out.tokens[b, :out.lengths[b]] for b in range(len(prompts))]

    return policy


def respond(conversations: Sequence[Conversation], policy: Policy, tokenizer: ChatTokenizer,
            run_tool: ToolRunner, *, max_tool_rounds: int = 2, batch_size: int = 16,
            on_message: Callable[[Conversation, dict[str, Any]], None] | None = None) -> None:
    """Play every conversation to a final assistant answer, in place: each generated
    assistant message is appended; one with tool calls gets a tool message per call (from
    `run_tool`) and another turn, at most `max_tool_rounds` times. `on_message` sees every
    appended message."""
    stop_ids = {tokenizer.special_ids[t] for t in STOP_TOKENS}
    rounds = [0] * len(conversations)
    active = list(range(len(conversations)))
    while active:
        still = []
        for lo in range(0, len(active), batch_size):
            chunk = active[lo:lo + batch_size]
            texts = [render(conversations[i].messages, conversations[i].tools,
                            add_generation_prompt=True,
                            enable_thinking=conversations[i].thinking).text for i in chunk]
            outputs = policy([tokenizer.encode(t)[0] for t in texts])
            for i, text, ids in zip(chunk, texts, outputs):
                c = conversations[i]
                # The prefilled part of the generation prompt belongs to the response.
                prefill = text[text.rindex(ASSISTANT) + len(ASSISTANT):]
                message = parse_assistant(prefill + tokenizer.decode(ids), c.tools)
                # Finished: ended by a stop token, with its reasoning and tool calls closed.
                c.finished = (message.pop("finished", True)
                              and len(ids) > 0 and int(ids[-1]) in stop_ids)
                c.messages.append(message)
                if on_message:
                    on_message(c, message)
                if message.get("tool_calls") and c.finished and rounds[i] < max_tool_rounds:
                    rounds[i] += 1
                    for call in message["tool_calls"]:
                        result = {"role": "tool", "content": run_tool(call)}
                        c.messages.append(result)
                        if on_message:
                            on_message(c, result)
                    still.append(i)
        active = still
