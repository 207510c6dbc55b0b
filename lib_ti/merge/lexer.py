"""Tokenizer of embedding math: :func:`_tokens` splits an expression into strings, numbers, names and operators."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from lib_ti.merge.errors import MergeSyntaxError

#: Number suffix -> the encoder it scales.
SUFFIX_ENCODERS = {"L": "clip_l", "G": "clip_g"}


@dataclass(frozen=True)
class _Token:
    kind: str  # "str", "num", "name", "op", "end"
    text: str
    col: int
    suffix: str = ""
    positions: tuple[int, ...] = ()


_NUMBER = re.compile(r"(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?", re.ASCII)
_WORDISH = re.compile(r"[\w.]+")
_NAME = re.compile(r"[A-Za-z_]\w*")
_OPS = set("+-*/^()[],:=")
_DIGITS = set("0123456789")


def _tokens(expr: str) -> list[_Token]:
    out: list[_Token] = []
    i, n = 0, len(expr)
    while i < n:
        c = expr[i]
        col = i + 1
        if c.isspace():
            i += 1
        elif c == "'":
            chars: list[str] = []
            positions: list[int] = []
            j = i + 1
            while True:
                if j >= n:
                    msg = "unclosed quote: this string has no closing '"
                    raise MergeSyntaxError(msg, col, expr)
                if expr[j] == "'":
                    if expr.startswith("''", j):
                        chars.append("'")
                        positions.append(j + 1)
                        j += 2
                        continue
                    break
                chars.append(expr[j])
                positions.append(j + 1)
                j += 1
            out.append(_Token("str", "".join(chars), col, positions=tuple(positions)))
            i = j + 1
        elif c in _DIGITS or (c == "." and expr[i + 1 : i + 2] in _DIGITS):
            m = _NUMBER.match(expr, i)
            assert m is not None
            j = m.end()
            k = j
            while k < n and expr[k] in " \t":
                k += 1
            after = expr[k + 1 : k + 2]
            glued = after.isalnum() or (after != "" and after in "_.(")
            suffix = expr[k] if k < n and expr[k] in SUFFIX_ENCODERS and not glued else ""
            if not suffix and j < n and (expr[j].isalnum() or expr[j] in "._"):
                bad = _WORDISH.match(expr, i)
                assert bad is not None
                msg = f"bad number {bad.group()!r}"
                raise MergeSyntaxError(msg, col, expr)
            if not math.isfinite(float(m.group())):
                msg = f"number {m.group()!r} is too large"
                raise MergeSyntaxError(msg, col, expr)
            out.append(_Token("num", m.group(), col, suffix=suffix))
            i = k + 1 if suffix else j
        elif c.isalpha() or c == "_":
            m = _NAME.match(expr, i)
            if m is None:
                msg = f"unexpected character {c!r}"
                raise MergeSyntaxError(msg, col, expr)
            out.append(_Token("name", m.group(), col))
            i = m.end()
        elif c in _OPS:
            if expr.startswith("**", i):
                msg = "'**' is not an operator; write powers with ^ (2^-1)"
                raise MergeSyntaxError(msg, col, expr)
            out.append(_Token("op", c, col))
            i += 1
        else:
            hint = "; strings take single quotes: 'text'" if c == '"' else ""
            msg = f"unexpected character {c!r}{hint}"
            raise MergeSyntaxError(msg, col, expr)
    out.append(_Token("end", "", n + 1))
    return out


def _describe(tok: _Token) -> str:
    if tok.kind == "str":
        return "a string"
    if tok.kind == "num":
        return f"the number {tok.text}"
    if tok.kind == "name":
        return repr(tok.text)
    if tok.kind == "end":
        return "the end of the expression"
    return repr(tok.text)
