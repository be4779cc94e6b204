"""The calculator tool of the embedded SFT set: its OpenAI tool definition and a safe
evaluator of integer arithmetic (+, -, *, parentheses), used to write the tool results of
the training episodes and to answer the model's calls at evaluation and in chat."""

from __future__ import annotations

import ast
import operator
from typing import Any

CALCULATOR_TOOL: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "calculator",
        "description": "Evaluate an integer arithmetic expression with + - * and parentheses.",
        "parameters": {
            "type": "object",
            "properties": {"expression": {"type": "string",
                                          "description": "for example (12 + 7) * 3"}},
            "required": ["expression"],
        },
    },
}

_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul}
_MAX_DIGITS = 64  # bounds the work a model-written expression can ask for


def evaluate(expression: str) -> int:
    """The value of `expression`; ValueError for anything but integers, + - *, unary minus
    and parentheses, or a result of more than 64 digits."""
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except SyntaxError:
        raise ValueError(f"cannot parse {expression!r}") from None

    def value(node: ast.AST) -> int:
        if isinstance(node, ast.Constant) and type(node.value) is int:
            return node.value
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
            v = value(node.operand)
            return -v if isinstance(node.op, ast.USub) else v
        if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
            result = _BINARY[type(node.op)](value(node.left), value(node.right))
            if len(str(abs(result))) > _MAX_DIGITS:
                raise ValueError("result too large")
            return result
        raise ValueError(f"unsupported element {ast.dump(node)[:40]!r} (only integers, "
                         "+ - * and parentheses)")

    return value(tree.body)


def call_calculator(arguments: dict[str, Any]) -> str:
    """The tool result text for a call's arguments: the value, or `error: ...`."""
    expression = arguments.get("expression")
    if not isinstance(expression, str):
        return "error: the argument 'expression' (a string) is required"
    try:
        return str(evaluate(expression))
    except ValueError as e:
        return f"error: {e}"
