"""The model's tools: a calculator and a Python sandbox.

calculator(expression) answers what a small model asks for in <|python_start|> ... <|python_end|>: arithmetic
(GSM8K) and letter counting ("strawberry".count("r")). It parses the expression with `ast` and evaluates a
whitelist of node types itself -- no eval(), no signals (so it works from any thread), bounded input length,
bounded number size, bounded tree size.

python_tool(code) runs untrusted code in the sandbox of picochat/sandbox.py (run_python; its module doc says
exactly what it stops and what it does not) and answers with what the code printed.
"""

from __future__ import annotations

import ast
import math
import operator
import re

from picochat.sandbox import ExecutionResult, run_python

__all__ = ["ExecutionResult", "calculator", "python_tool", "run_python", "tool_named"]

# ----------------------------------------------------------------------------------------------------------
# Calculator

MAX_EXPRESSION_CHARS = 1000
MAX_NODES = 200  # AST nodes: bounds the work and the recursion depth of the evaluator
MAX_MAGNITUDE = 1e30  # every intermediate value stays within +-1e30 (Python ints could otherwise grow without end)

_BINARY_OPERATORS = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
}
# Models (and people) write 1,234,567 and ×, ÷, − ; translate those to Python before parsing.
_THOUSANDS_COMMA = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")
_UNICODE_OPERATORS = str.maketrans({"×": "*", "÷": "/", "−": "-", "–": "-"})


class _Rejected(Exception):
    """The expression is outside the whitelist or its bounds."""


def calculator(expression: str) -> str | None:
    """Evaluate arithmetic or a letter count; return the result as text, or None when the expression is not
    something the calculator does (or fails: division by zero, too large, too long).

    Allowed: int and float literals, + - * / // %, parentheses, unary minus/plus, and `"literal".count("x")`.
    Integral results print without ".0" (5, not 5.0), others with up to 10 significant digits.
    """
    if not isinstance(expression, str):
        return None
    expression = expression.strip()
    if not expression or len(expression) > MAX_EXPRESSION_CHARS:
        return None
    if '"' not in expression and "'" not in expression:
        expression = _THOUSANDS_COMMA.sub("", expression).translate(_UNICODE_OPERATORS)
    try:
        tree = ast.parse(expression, mode="eval")
    except (SyntaxError, ValueError, MemoryError, RecursionError):
        return None
    if sum(1 for _ in ast.walk(tree)) > MAX_NODES:
        return None
    try:
        value = _evaluate(tree.body)
    except (_Rejected, ArithmeticError, ValueError, TypeError):
        return None
    return _format_number(value)


def _evaluate(node: ast.AST) -> int | float:
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return _bounded(node.value)
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY_OPERATORS:
        left, right = _evaluate(node.left), _evaluate(node.right)
        return _bounded(_BINARY_OPERATORS[type(node.op)](left, right))
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        value = _evaluate(node.operand)
        return -value if isinstance(node.op, ast.USub) else value
    if (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr == "count"
        and isinstance(node.func.value, ast.Constant)
        and isinstance(node.func.value.value, str)
        and len(node.args) == 1
        and not node.keywords
        and isinstance(node.args[0], ast.Constant)
        and isinstance(node.args[0].value, str)
    ):
        return node.func.value.value.count(node.args[0].value)
    raise _Rejected(type(node).__name__)


def _bounded(value: int | float) -> int | float:
    if isinstance(value, float) and not math.isfinite(value):
        raise _Rejected("not finite")
    if abs(value) > MAX_MAGNITUDE:
        raise _Rejected("too large")
    return value


def _format_number(value: int | float) -> str:
    if isinstance(value, float):
        if value.is_integer():
            return str(int(value))
        return f"{value:.10g}"
    return str(value)


def python_tool(code: str) -> str | None:
    """The python tool for the engine: what the code printed (or its error), cropped to 500 characters."""
    result = run_python(code)
    text = result.stdout.strip() if result.success else (result.error or "error")
    return text[:500]


def tool_named(name: str):
    """The tool for a --tool value: "calculator", "python" (the sandbox) or "none" (None: tool calls are not run)."""
    return {"calculator": calculator, "python": python_tool, "none": None}[name]
