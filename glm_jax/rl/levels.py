"""The RL prompts: difficulty levels of the embedded verifiable tasks (glm_jax.sft.tasks), and
their rendering into GLM-4.5 chat prompts.

Levels, easiest first (the curriculum starts at the first one named in config.rl.levels):
  add1  one-digit + one-digit (answers 0-18): the level the SFT demo model can reach
  add2  two-digit + two-digit
  add   the SFT set's addition (2-4 digits), sub, mul, word: the SFT set's own tasks
The calculator `tool` task is not a level: its episodes need a tool round between two
generations, and this rollout is one generation per prompt.

Prompts are a pure function of (seed, level, step, round): a resumed run draws exactly the
prompts the uninterrupted run would have drawn, with no generator state to checkpoint.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable, Sequence
from typing import Any

from glm_jax.chat.render import ASSISTANT, STOP_TOKENS, render
from glm_jax.chat.tokens import ChatTokenizer
from glm_jax.sft import tasks


def _sum_problem(rng: random.Random, digits: int) -> dict[str, Any]:
    """a + b with `digits`-digit operands (one digit: 0-9), traced as the SFT set traces
    addition, so the level continues what SFT taught."""
    lo = 0 if digits == 1 else 10 ** (digits - 1)
    a, b = rng.randint(lo, 10 ** digits - 1), rng.randint(lo, 10 ** digits - 1)
    return {"task": "add", "question": f"What is {a} + {b}?",
            "trace": tasks.addition_trace(a, b), "answer": a + b}


def _sft_task(name: str) -> Callable[[random.Random], dict[str, Any]]:
    return lambda rng: tasks.make_problem(rng, name)


LEVELS: dict[str, Callable[[random.Random], dict[str, Any]]] = {
    "add1": lambda rng: _sum_problem(rng, 1),
    "add2": lambda rng: _sum_problem(rng, 2),
    **{name: _sft_task(name) for name in ("add", "sub", "mul", "word")},
}


def parse_levels(spec: str) -> tuple[str, ...]:
    """config.rl.levels ("add1,add2,add") -> names. Raises ValueError naming an unknown one."""
    names = tuple(n.strip() for n in spec.split(",") if n.strip())
    unknown = [n for n in names if n not in LEVELS]
    if unknown or not names:
        raise ValueError(f"config.rl.levels={spec!r}: unknown level(s) {unknown}; choose from "
                         f"{','.join(LEVELS)} (easiest first)")
    return names


@dataclasses.dataclass(frozen=True)
class Prompt:
    """One prompt of a group: the task record (what the reward reads), its token ids, and
    the prefilled start of the assistant turn (part of the reply the reward parses)."""

    example: dict[str, Any]  # {"answer", "task", "thinking", "messages", "level", ...}
    ids: list[int]
    prefill: str  # e.g. "\n<think></think>" in the non-thinking mode


def draw_prompts(level: str, count: int, *, seed: int, step: int, round_: int,
                 thinking: bool, tokenizer: ChatTokenizer) -> list[Prompt]:
    """`count` problems of `level` as chat prompts; deterministic in its arguments."""
    # A string seed goes through SHA-512 in random.seed: stable across processes (unlike
    # hash()), so a resumed run draws the same problems.
    rng = random.Random(f"glm-jax-rl/{seed}/{level}/{step}/{round_}")
    out = []
    for i in range(count):
        record = tasks.to_record(LEVELS[level](rng), thinking, i)
        record["level"] = level
        text = render(tasks.prompt_messages(record), add_generation_prompt=True,
                      enable_thinking=thinking).text
        out.append(Prompt(record, tokenizer.encode(text)[0].tolist(),
                          text[text.rindex(ASSISTANT) + len(ASSISTANT):]))
    return out


def stop_ids(tokenizer: ChatTokenizer) -> list[int]:
    """The tokens that end an assistant turn (<|endoftext|>, <|user|>, <|observation|>)."""
    return [tokenizer.special_ids[t] for t in STOP_TOKENS]


def completion_text(prompt: Prompt, completion_ids: Sequence[int],
                    tokenizer: ChatTokenizer) -> str:
    """What the reward reads: the assistant turn as the model wrote it after
    `<|assistant|>` (the prefilled part included)."""
    return prompt.prefill + tokenizer.decode(list(completion_ids))
