"""Built-in, side-effect-free tools."""

from __future__ import annotations

import ast
import math
import operator
from datetime import datetime
from typing import Annotated

# What the calculator may use: a table of operators and functions; anything else is refused.
BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
          ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}
FUNCTIONS = {"sqrt": math.sqrt, "abs": abs, "round": round, "min": min, "max": max, "log": math.log, "log10": math.log10,
             "exp": math.exp, "sin": math.sin, "cos": math.cos, "tan": math.tan, "floor": math.floor, "ceil": math.ceil}
CONSTANTS = {"pi": math.pi, "e": math.e}
MAX_POWER = 10_000  # 2 ** 10000 is fine; 9 ** 9 ** 9 would take the machine down
MAX_BITS = 4_000  # integers up to about 1200 digits, at every step: (9 ** 9999) ** 9999 is refused before it is computed
MAX_DIGITS = 1_300  # round(x, n): |n| beyond the digits an integer may have (round(x, -10**9) computes 10**(10**9))
MAX_LENGTH = 500
TOO_BIG = "the result would have more than 1200 digits"


def _check_power(base, exponent) -> None:
    if isinstance(exponent, (int, float)) and abs(exponent) > MAX_POWER:
        raise ValueError(f"exponent {exponent} is too large")
    if isinstance(base, int) and isinstance(exponent, int) and exponent > 0 and abs(base) > 1 \
            and math.log2(abs(base)) * exponent > MAX_BITS:
        raise ValueError(TOO_BIG)


def _check_round(number=None, ndigits=None, *rest) -> None:
    if isinstance(ndigits, int) and abs(ndigits) > MAX_DIGITS:
        raise ValueError(f"round to {ndigits} digits is out of range")


# Checks made before a function runs, where its arguments set its cost.
BEFORE = {"round": _check_round}


def _bounded(value):
    """Every intermediate result, not only the last: an integer beyond MAX_BITS is refused."""
    if isinstance(value, int) and value.bit_length() > MAX_BITS:
        raise ValueError(TOO_BIG)
    return value


def _eval(node):
    return _bounded(_node(node))


def _node(node):
    if isinstance(node, ast.Expression):
        return _eval(node.body)
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
        return node.value
    if isinstance(node, ast.BinOp) and type(node.op) in BINARY:
        left, right = _eval(node.left), _eval(node.right)
        if isinstance(node.op, ast.Pow):
            _check_power(left, right)
        return BINARY[type(node.op)](left, right)
    if isinstance(node, ast.UnaryOp) and type(node.op) in UNARY:
        return UNARY[type(node.op)](_eval(node.operand))
    if isinstance(node, ast.Name) and node.id in CONSTANTS:
        return CONSTANTS[node.id]
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in FUNCTIONS and not node.keywords:
        args = [_eval(a) for a in node.args]
        BEFORE.get(node.func.id, lambda *a: None)(*args)
        return FUNCTIONS[node.func.id](*args)
    raise ValueError(f"not allowed in an arithmetic expression: {ast.unparse(node)}")


def calculator(expression: Annotated[str, {"pattern": r"^[-(0-9a-z][0-9a-z+\-*/%^(). ]{0,79}$"}]) -> float | int:
    """Evaluate an arithmetic expression exactly, e.g. "(2 + 3) * 7 / 2" or "sqrt(2) * pi".

    Args:
        expression: numbers, + - * / // % **, parentheses, pi, e, and sqrt abs round min max log log10 exp sin cos tan floor ceil
    """
    if len(expression) > MAX_LENGTH:
        raise ValueError("expression too long")
    try:
        tree = ast.parse(expression.replace("^", "**"), mode="eval")
    except SyntaxError:
        raise ValueError(f"not an arithmetic expression: {expression!r}") from None
    return _eval(tree)


def current_datetime(timezone: str = "local") -> str:
    """The current date and time (ISO 8601), with the weekday.

    Args:
        timezone: "local" or an IANA name such as "Europe/Paris"
    """
    if timezone == "local":
        now = datetime.now().astimezone()
    else:
        from zoneinfo import ZoneInfo

        now = datetime.now(ZoneInfo(timezone))
    return f"{now.isoformat(timespec='seconds')} ({now.strftime('%A')})"


BUILTINS = [calculator, current_datetime]
