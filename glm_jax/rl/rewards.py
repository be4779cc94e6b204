"""Verifiable rewards: `reward(example, completion) -> RewardResult` (a float with a reason).

`example` is a task record (a mapping: "answer" for exact-answer tasks, "tests" for code
tasks); `completion` is the text the model generated after `<|assistant|>`. A reward function
never raises for anything the model wrote: a bad completion scores 0 with a reason, and the
reasons are counted per batch (`count_reasons`) so a run shows *why* rewards are low
(unfinished reasoning? no code block? timeouts?).

Built-ins:
  * `ExactAnswer`: the final answer, read from the reply after `</think>`, equals
    example["answer"] (numbers compare by value).
  * `UnitTests`: the last fenced Python block of the reply, run against example["tests"] in
    the sandbox (glm_jax.rl.sandbox); reward 1 only if every test statement ran.
Any callable with the same signature plugs in (`RewardFn`).
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import re
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from glm_jax.chat.parse import parse_assistant
from glm_jax.rl import sandbox


@dataclasses.dataclass(frozen=True)
class RewardResult:
    """A reward and why. `float(result)` is the reward."""

    reward: float
    reason: str  # e.g. "correct", "wrong_answer", "unfinished", or a sandbox.SandboxReason
    detail: str = ""

    def __float__(self) -> float:
        return self.reward


class RewardFn(Protocol):
    def __call__(self, example: Mapping[str, Any], completion: str) -> RewardResult: ...


def reply_content(completion: str) -> tuple[str, bool]:
    """(the visible reply after `</think>`, whether the generation finished its reasoning
    and tool calls)."""
    message = parse_assistant(completion)
    return message.get("content") or "", message.get("finished", True) is not False


_BOXED = re.compile(r"\\boxed\{")
_ANSWER_IS = re.compile(r"answer\s+is\s*:?\s*(.+?)\s*$", re.IGNORECASE | re.MULTILINE)
_NUMBER = re.compile(r"[-+]?(\d{1,3}(,\d{3})+|\d+)(\.\d+)?([eE][-+]?\d+)?")


def _last_boxed(text: str) -> str | None:
    """The contents of the last \\boxed{...}, braces balanced; None if there is none."""
    starts = [m.end() for m in _BOXED.finditer(text)]
    if not starts:
        return None
    depth, i = 1, starts[-1]
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j]
    return None  # unbalanced: cut off


def extract_answer(content: str) -> str | None:
    """The final answer in a visible reply: the last \\boxed{...}; else what follows the last
    "answer is"; else the last non-empty line. None for an empty reply."""
    boxed = _last_boxed(content)
    if boxed is not None:
        return boxed
    said = _ANSWER_IS.findall(content)
    if said:
        return said[-1]
    lines = [line for line in content.splitlines() if line.strip()]
    return lines[-1] if lines else None


def normalize_answer(answer: str) -> str:
    """Case-folded, whitespace-collapsed, without surrounding $ or a trailing period; a number
    is written canonically (thousands separators dropped, 2.50 -> 2.5, 4.0 -> 4)."""
    text = " ".join(str(answer).split()).strip().strip("$").strip().rstrip(".").strip()
    if _NUMBER.fullmatch(text):
        value = float(text.replace(",", ""))
        return str(int(value)) if value.is_integer() and abs(value) < 2 ** 63 else repr(value)
    return text.casefold()


@dataclasses.dataclass(frozen=True)
class ExactAnswer:
    """1.0 if the final answer after `</think>` equals example["answer"] (normalized), else 0.

    Reasons: correct, wrong_answer, no_answer (empty reply), unfinished (reasoning or a tool
    call was cut off). The reasoning is never read: a model is not rewarded for a right
    answer it only considered."""

    def __call__(self, example: Mapping[str, Any], completion: str) -> RewardResult:
        content, finished = reply_content(completion)
        if not finished:
            return RewardResult(0.0, "unfinished")
        got = extract_answer(content)
        if got is None:
            return RewardResult(0.0, "no_answer")
        if normalize_answer(got) == normalize_answer(example["answer"]):
            return RewardResult(1.0, "correct")
        return RewardResult(0.0, "wrong_answer", f"got {got[:80]!r}")


_FENCE = re.compile(r"```[ \t]*([\w+-]*)[^\n]*\n(.*?)```", re.DOTALL)


def extract_code(content: str) -> str | None:
    """The last fenced code block tagged python/py (or untagged) in a reply; None if none."""
    blocks = [body for lang, body in _FENCE.findall(content)
              if lang.lower() in ("", "python", "py", "python3")]
    return blocks[-1] if blocks else None


@dataclasses.dataclass(frozen=True)
class UnitTests:
    """1.0 if the reply's last Python block passes example["tests"] (Python source, e.g.
    asserts) in the sandbox, else 0. Reasons: no_code, unfinished, or the sandbox's reason
    (passed, failed, timeout, memory, ...); the detail is the sandbox's."""

    limits: sandbox.Limits = sandbox.Limits()
    python: str | None = None  # interpreter for the program; see sandbox.run_python

    def __call__(self, example: Mapping[str, Any], completion: str) -> RewardResult:
        content, finished = reply_content(completion)
        if not finished:
            return RewardResult(0.0, "unfinished")
        code = extract_code(content)
        if code is None:
            return RewardResult(0.0, "no_code")
        result = sandbox.run_python(code, example["tests"], self.limits, python=self.python)
        return RewardResult(1.0 if result.passed else 0.0, str(result.reason), result.detail)


BUILTIN_REWARDS: dict[str, RewardFn] = {"exact_answer": ExactAnswer(), "unit_tests": UnitTests()}


def score(reward_fn: RewardFn, examples: Sequence[Mapping[str, Any]],
          completions: Sequence[str], max_workers: int = 4) -> list[RewardResult]:
    """reward_fn over (example, completion) pairs, in order. Threads overlap sandboxed runs
    (each is a subprocess, so the GIL is not the limit)."""
    if len(examples) != len(completions):
        raise ValueError(f"{len(examples)} examples but {len(completions)} completions")
    with concurrent.futures.ThreadPoolExecutor(max_workers) as pool:
        return list(pool.map(reward_fn, examples, completions))


def count_reasons(results: Sequence[RewardResult]) -> dict[str, int]:
    """{reason: how many}, most common first: the per-batch breakdown a run logs."""
    return dict(collections.Counter(r.reason for r in results).most_common())
