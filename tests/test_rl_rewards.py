"""Rewards: the final answer after </think>, the code block, reasons and their counts."""

import pytest

from glm_jax.rl import rewards
from glm_jax.rl.rewards import ExactAnswer, RewardResult

REPLIES = {
    # completion -> (reward, reason) for answer "1692"
    "<think>17*100 = 1700, minus 8 = 1692</think>\nThe answer is 1,692.<|endoftext|>":
        (1.0, "correct"),
    "<think></think>\nThe answer is 1692.": (1.0, "correct"),  # /nothink reply
    "<think>maybe 1692?</think>\nThe answer is 1700.": (0.0, "wrong_answer"),
    "<think>it is 1692</think>\n": (0.0, "no_answer"),  # right only in the reasoning
    "<think>17*100 = 1700, minus": (0.0, "unfinished"),  # cut off while reasoning
    "<think>ok</think>\nSo we get $\\boxed{1692}$, not \\boxed{1}? No: \\boxed{1692}.":
        (1.0, "correct"),
    "<think>ok</think>\nWorking...\n1692.0": (1.0, "correct"),
    "<think>ok</think>\nLet me check.<tool_call>calculator\n<arg_key>expression</arg_key>\n"
    "<arg_value>17*99</arg_value>\n</tool_call>": (0.0, "wrong_answer"),
}


@pytest.mark.parametrize("completion", list(REPLIES))
def test_exact_answer(completion):
    result = ExactAnswer()({"answer": "1692"}, completion)
    assert (result.reward, result.reason) == REPLIES[completion]
    assert float(result) == result.reward


def test_answer_normalization():
    norm = rewards.normalize_answer
    assert norm(" 1,692. ") == norm("1692") == norm("1692.0") == "1692"
    assert norm("$2.50$") == norm("2.5")
    assert norm("Paris") == norm("paris.")
    assert norm("x = 3") != norm("3")
    assert rewards.extract_answer("a\n\\boxed{\\frac{1}{2}}\n") == "\\frac{1}{2}"
    assert rewards.extract_answer("") is None


def test_extract_code_takes_the_last_python_block():
    content = ("First try:\n```python\nbad()\n```\nOutput:\n```text\nerror\n```\n"
               "Fixed:\n```py\ndef f():\n    return 1\n```\n")
    assert rewards.extract_code(content) == "def f():\n    return 1\n"
    assert rewards.extract_code("no code here") is None
    result = rewards.UnitTests()({"tests": "assert f() == 1"}, "<think></think>\nno code")
    assert (result.reward, result.reason) == (0.0, "no_code")


def test_score_keeps_order_and_counts_reasons():
    examples = [{"answer": str(i)} for i in range(6)]
    completions = ["<think></think>\nThe answer is 0.", "<think></think>\nThe answer is 9.",
                   "<think>cut", "<think></think>\nThe answer is 3.", "<think></think>\n",
                   "<think></think>\nThe answer is 5."]
    results = rewards.score(ExactAnswer(), examples, completions, max_workers=3)
    assert [r.reward for r in results] == [1.0, 0.0, 0.0, 1.0, 0.0, 1.0]
    assert rewards.count_reasons(results) == {"correct": 3, "wrong_answer": 1,
                                              "unfinished": 1, "no_answer": 1}
    with pytest.raises(ValueError, match="2 examples but 1 completions"):
        rewards.score(ExactAnswer(), examples[:2], completions[:1])


def test_a_custom_reward_plugs_in():
    def length_penalty(example, completion):
        return RewardResult(-len(completion) / 100, "length")

    results = rewards.score(length_penalty, [{}, {}], ["ab", "abcd"])
    assert [float(r) for r in results] == [-0.02, -0.04]
