"""Errors of embedding math: what :func:`~lib_ti.merge.parse` and :func:`~lib_ti.merge.evaluate` raise.

Both carry a 1-based column; ``str()`` shows the expression with a caret under it.
"""

from __future__ import annotations

from lib_ti.errors import TIError


class MergeError(TIError, ValueError):
    """An expression cannot be evaluated. ``column`` (1-based) points at the cause when there is one.

    ``reason`` is the bare message; ``str()`` adds the expression with a caret under the column.
    """

    def __init__(self, message: str, column: int | None = None, expr: str | None = None) -> None:
        self.reason = message
        self.column = column
        self.expr = expr
        super().__init__(_locate(message, column, expr))

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (self.reason, self.column, self.expr))


class MergeSyntaxError(MergeError):
    """An expression is malformed (found by :func:`parse`, before anything is evaluated)."""


def _locate(message: str, column: int | None, expr: str | None) -> str:
    if column is None or expr is None:
        return message
    at = column - 1
    start = expr.rfind("\n", 0, at) + 1
    end = expr.find("\n", at)
    line = expr[start : len(expr) if end < 0 else end].replace("\t", " ").replace("\r", " ")
    pad = at - start
    if len(line) > 100:  # show a window around the column
        left = max(0, pad - 60)
        line = ("…" if left else "") + line[left : left + 100] + ("…" if left + 100 < len(line) else "")
        pad = pad - left + (1 if left else 0)
    return f"{message} (column {column}):\n  {line}\n  {' ' * pad}^"
