"""The RL prompts: difficulty levels of the embedded verifiable tasks (glm_jax.sft.tasks), and
their rendering into GLM-4.5 chat prompts.

Levels, easiest first (the curriculum starts at the first one named in config.rl.levels):
a level is a task of the SFT set (add, sub, mul, word) with an optional cap on its operands'
digits (glm_jax.sft.tasks.make_problem's max_digits): `add1` is one-digit addition, `add2`
two-digit (the SFT demo's task), `add` the SFT set's own range. The
calculator `tool` task is not a level: its episodes need a tool round between two
generations, and this rollout is one generation per prompt.

Prompts are a pure function of (seed, level, step, round): a resumed run draws exactly the
prompts the uninterrupted run would have drawn, with no generator state to checkpoint.
"""

from __future__ import annotations

import dataclasses
import random
import re
from collections.abc import Sequence
from typing import Any

from glm_jax.chat.render import ASSISTANT, STOP_TOKENS, render
from glm_jax.chat.tokens import ChatTokenizer
from glm_jax.sft import tasks


LEVEL_TASKS = ("add", "sub", "mul", "word")
_LEVEL = re.compile(r"(add|sub|mul|word)([1-9]\d*)?")


def make_level_problem(rng: random.Random, level: str) -> dict[str, Any]:
    """One problem of `level` ("add1": add with one-digit operands; "add": add's own range)."""
    m = _LEVEL.fullmatch(level)
    if m is None:
        raise ValueError(f"level {level!r}: a task of {LEVEL_TASKS} with an optional digit "
                         "cap, e.g. add1")
    return tasks.make_problem(rng, m.group(1), int(m.group(2)) if m.group(2) else None)


def parse_levels(spec: str) -> tuple[str, ...]:
    """config.rl.levels ("add1,add2,add") -> names. Raises ValueError naming an unknown one."""
    names = tuple(n.strip() for n in spec.split(",") if n.strip())
    unknown = [n for n in names if not _LEVEL.fullmatch(n)]
    if unknown or not names:
        raise ValueError(f"config.rl.levels={spec!r}: unknown level(s) {unknown}; a level is "
                         f"a task of {','.join(LEVEL_TASKS)} with an optional digit cap "
                         "(add1 = one-digit addition), easiest first")
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
        record = tasks.to_record(make_level_problem(rng, level), thinking, i)
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


def rollout_completions(prompts: Sequence[Prompt], rollout, samples_per_prompt: int,
                        tokenizer: ChatTokenizer) -> tuple[list[dict[str, Any]], list[str]]:
    """(examples, completion texts) of a rollout of `prompts` with `samples_per_prompt` rows
    per prompt, in row order: what the reward function is called on."""
    examples, completions = [], []
    for row in range(len(prompts) * samples_per_prompt):
        prompt = prompts[row // samples_per_prompt]
        begin = int(rollout.prompt_lengths[row])
        ids = rollout.tokens[row, begin:begin + int(rollout.completion_lengths[row])]
        examples.append(prompt.example)
        completions.append(completion_text(prompt, ids, tokenizer))
    return examples, completions
