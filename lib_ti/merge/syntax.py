"""Syntax tree and Pratt parser of embedding math: :func:`parse` turns an expression into frozen dataclasses.

Grammar (``docs/SYNTAX.md`` has the full description, with an example for every construct)::

    expression = term { ("+" | "-") term | "=" modifier { modifier } } ;
    term       = unary { modifier } ;
    modifier   = ("*" | "/") unary | ":" [ "+" | "-" ] unary ;
    unary      = ("-" | "+") unary | power ;
    power      = chain [ "^" unary ] ;
    chain      = postfix { "," postfix } ;           (in call arguments "," separates arguments)
    postfix    = primary { "[" subscript "]" } ;
    subscript  = expression | [ expression ] ":" [ expression ] [ ":" [ expression ] ] ;
    primary    = string | number [ "L" | "G" ] | name "(" [ expression { "," expression } ] ")"
               | "(" expression ")" ;
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from lib_ti.merge.errors import MergeSyntaxError
from lib_ti.merge.lexer import SUFFIX_ENCODERS, _describe, _Token, _tokens

#: Function name -> (fewest arguments, most arguments or None, how to call it).
FUNCTIONS: dict[str, tuple[int, int | None, str]] = {
    "avg": (1, None, "avg(x, y, ...)"),
    "mean": (1, None, "mean(x, y, ...)"),
    "lerp": (3, 3, "lerp(a, b, t)"),
    "norm": (1, 2, "norm(x) or norm(x, target)"),
    "pool": (2, 2, "pool(x, n)"),
    "L": (1, 1, "L(x)"),
    "G": (1, 1, "G(x)"),
}
#: EM's special token literals in a ``,`` chain.
SPECIAL_TOKENS = {"00": "pad", "000": "eos", "0000": "bos"}


# ---------------------------------------------------------------- syntax tree


@dataclass(frozen=True, kw_only=True)
class Node:
    """A node of the syntax tree. ``col``: 1-based column of the value, or of the operator."""

    col: int


@dataclass(frozen=True)
class Number(Node):
    """A number literal; ``encoder`` is set by an ``L``/``G`` suffix (``0.5L``)."""

    value: float
    text: str
    encoder: str | None = None


@dataclass(frozen=True)
class Text(Node):
    """A quoted string (already unquoted); ``positions`` holds each character's source column."""

    text: str
    positions: tuple[int, ...] = field(default=(), repr=False, compare=False)


@dataclass(frozen=True)
class SpecialToken(Node):
    """EM's ``00`` (pad), ``000`` (eos) or ``0000`` (bos) inside a ``,`` chain."""

    which: str


@dataclass(frozen=True)
class Concat(Node):
    """``a, b, ...``: strings, token ids and sequences joined end to end."""

    items: tuple[Node, ...]


@dataclass(frozen=True)
class Unary(Node):
    op: str
    operand: Node


@dataclass(frozen=True)
class Binary(Node):
    """``+ - * / ^``; EM's ``=*N`` and ``=/N`` become a ``*`` or ``/`` of everything to their left."""

    op: str
    left: Node
    right: Node


@dataclass(frozen=True)
class Crop(Node):
    """``x:N``: cut to N vectors or pad with zero vectors."""

    operand: Node
    size: Node


@dataclass(frozen=True)
class Roll(Node):
    """``x:+N`` (sign 1) / ``x:-N`` (sign -1): ``torch.roll`` along the vectors."""

    operand: Node
    shift: Node
    sign: int


@dataclass(frozen=True)
class Index(Node):
    """``x[i]``: one vector."""

    operand: Node
    index: Node


@dataclass(frozen=True)
class Slice(Node):
    """``x[a:b:c]``: Python slicing on the vectors."""

    operand: Node
    start: Node | None
    stop: Node | None
    step: Node | None = None


@dataclass(frozen=True)
class Call(Node):
    name: str
    args: tuple[Node, ...]


# ---------------------------------------------------------------- parser

# Binding powers (higher binds tighter).
_BP_MODIFY = 5  # = *N, = /N, = :N
_BP_ADD = 10  # + -
_BP_MUL = 20  # * / :N :+N
_BP_UNARY = 30  # unary - +
_BP_POW = 40  # ^ (right-associative)
_BP_CHAIN = 50  # ,
_BP_SUBSCRIPT = 60  # [...]


class _Parser:
    def __init__(self, expr: str) -> None:
        self.expr = expr
        self.toks = _tokens(expr)
        self.pos = 0

    def peek(self) -> _Token:
        return self.toks[self.pos]

    def take(self) -> _Token:
        tok = self.toks[self.pos]
        if tok.kind != "end":
            self.pos += 1
        return tok

    def at(self, chars: str) -> bool:
        tok = self.toks[self.pos]
        return tok.kind == "op" and tok.text in chars

    def error(self, message: str, col: int) -> MergeSyntaxError:
        return MergeSyntaxError(message, col, self.expr)

    def unexpected(self, tok: _Token, opener: _Token | None = None) -> MergeSyntaxError:
        """The error for a token that cannot continue what came before it."""
        if tok.kind == "end" and opener is not None:
            close = ")" if opener.text == "(" else "]"
            return self.error(f"unbalanced {opener.text!r}: no {close!r} closes it", opener.col)
        if tok.kind in ("str", "num", "name") or (tok.kind == "op" and tok.text == "("):
            return self.error(f"missing operator (+, -, *, /, …) before {_describe(tok)}", tok.col)
        if tok.kind == "op" and tok.text in ")]":
            open_ = "(" if tok.text == ")" else "["
            return self.error(f"unbalanced {tok.text!r}: no {open_!r} before it", tok.col)
        return self.error(f"unexpected {_describe(tok)}", tok.col)

    def parse(self) -> Node:
        if self.peek().kind == "end":
            msg = "the expression is empty"
            raise self.error(msg, 1)
        node = self.expression(0, commas=True, colons=True)
        if self.peek().kind != "end":
            raise self.unexpected(self.peek())
        return node

    def expression(self, bp: int, *, commas: bool, colons: bool) -> Node:
        left = self.prefix(commas=commas, colons=colons)
        while True:
            tok = self.peek()
            if tok.kind != "op":
                return left
            op = tok.text
            if op == "[" and bp < _BP_SUBSCRIPT:
                left = self.subscript(left)
            elif op == "," and commas and bp < _BP_CHAIN:
                left = self.chain(left, colons=colons)
            elif op == "^" and bp < _BP_POW:
                self.take()
                right = self.expression(_BP_POW - 1, commas=commas, colons=colons)
                left = Binary(op, left, right, col=tok.col)
            elif op in "*/" and bp < _BP_MUL:
                self.take()
                # EM's 'cat'*2,256 is ('cat'*2),256: a bare number before ',' ends the factor
                bare = self.peek().kind == "num" and self.toks[self.pos + 1].text == ","
                right = self.expression(_BP_MUL + 1, commas=commas and not bare, colons=colons)
                left = Binary(op, left, right, col=tok.col)
            elif op == ":" and colons and bp < _BP_MUL:
                left = self.resize(left)
            elif op in "+-" and bp < _BP_ADD:
                self.take()
                right = self.expression(_BP_ADD + 1, commas=commas, colons=colons)
                left = Binary(op, left, right, col=tok.col)
            elif op == "=" and bp < _BP_MODIFY:
                left = self.modify(left, commas=commas, colons=colons)
            else:
                return left

    def prefix(self, *, commas: bool, colons: bool) -> Node:
        tok = self.take()
        if tok.kind == "str":
            return Text(tok.text, tok.positions, col=tok.col)
        if tok.kind == "num":
            return Number(float(tok.text), tok.text, SUFFIX_ENCODERS.get(tok.suffix), col=tok.col)
        if tok.kind == "name":
            return self.call(tok)
        if tok.kind == "op" and tok.text == "(":
            inner = self.expression(0, commas=True, colons=True)
            self.close(tok)
            return inner
        if tok.kind == "op" and tok.text in "+-":
            operand = self.expression(_BP_UNARY, commas=commas, colons=colons)
            return Unary(tok.text, operand, col=tok.col)
        # No value here: name the operator that lacks one when there is one.
        at = self.pos - 1 if tok.kind == "end" else self.pos - 2
        prev = self.toks[at] if at >= 0 else None
        if prev is not None and prev.kind == "op":
            if tok.kind == "end" and prev.text in "([":
                raise self.unexpected(tok, prev)
            if prev.text == "(" and tok.kind == "op" and tok.text == ")":
                msg = "empty parentheses"
                raise self.error(msg, prev.col)
            closing = tok.kind == "end" or (tok.kind == "op" and tok.text in ")],:")
            if closing and prev.text not in "()[]":
                msg = f"{prev.text!r} needs a value after it"
                raise self.error(msg, prev.col)
        msg = f"a value is missing before {_describe(tok)}"
        raise self.error(msg, tok.col)

    def close(self, opener: _Token) -> None:
        want = ")" if opener.text == "(" else "]"
        if self.at(want):
            self.take()
            return
        raise self.unexpected(self.peek(), opener)

    def call(self, name: _Token) -> Node:
        if not self.at("("):
            if name.text in FUNCTIONS:
                msg = f"{name.text} is a function: write {FUNCTIONS[name.text][2]}"
            else:
                msg = f"unknown name {name.text!r}; words and embedding names go in quotes: '{name.text}'"
            raise self.error(msg, name.col)
        if name.text not in FUNCTIONS:
            known = ", ".join(FUNCTIONS)
            msg = f"unknown function {name.text!r} (functions: {known})"
            raise self.error(msg, name.col)
        opener = self.take()
        args: list[Node] = []
        if self.at(")"):
            self.take()
        else:
            while True:
                args.append(self.expression(0, commas=False, colons=True))
                if self.at(","):
                    self.take()
                elif self.at(")"):
                    self.take()
                    break
                else:
                    raise self.unexpected(self.peek(), opener)
        low, high, usage = FUNCTIONS[name.text]
        if len(args) < low or (high is not None and len(args) > high):
            msg = f"{name.text} takes {_count(low, high)}, got {len(args)}: write {usage}"
            raise self.error(msg, name.col)
        return Call(name.text, tuple(args), col=name.col)

    def subscript(self, operand: Node) -> Node:
        opener = self.take()
        if self.at("]"):
            msg = "empty brackets: write x[i], x[a:b] or x[a:b:step]"
            raise self.error(msg, opener.col)
        bound: dict[str, bool] = {"commas": False, "colons": False}
        start = stop = step = None
        if not self.at(":"):
            start = self.expression(0, **bound)
            if not self.at(":"):
                self.close(opener)
                return Index(operand, start, col=opener.col)
        self.take()
        if not self.at(":]"):
            stop = self.expression(0, **bound)
        if self.at(":"):
            self.take()
            if not self.at("]"):
                step = self.expression(0, **bound)
        self.close(opener)
        return Slice(operand, start, stop, step, col=opener.col)

    def chain(self, first: Node, *, colons: bool) -> Node:
        comma = self.peek()
        bare = self.toks[self.pos - 1].kind == "num"  # not (256),'a'
        if bare and isinstance(first, Number) and first.text not in SPECIAL_TOKENS:
            msg = "a ',' chain starts with a string ('',256 for a lone token) or a bracketed value, as in ('x'*2),256"
            raise self.error(msg, comma.col)
        items = [self.chain_item(first)]
        while self.at(","):
            self.take()
            items.append(self.chain_item(self.expression(_BP_CHAIN, commas=True, colons=colons)))
        return Concat(tuple(items), col=first.col)

    def chain_item(self, node: Node) -> Node:
        if not isinstance(node, Number):
            return node
        if node.encoder is not None:
            msg = "a token id takes no L/G suffix"
            raise self.error(msg, node.col)
        if node.text in SPECIAL_TOKENS:
            return SpecialToken(SPECIAL_TOKENS[node.text], col=node.col)
        if re.fullmatch(r"0\d+", node.text):
            msg = f"bad token id {node.text!r}: only 00 (pad), 000 (end) and 0000 (start) have leading zeros"
            raise self.error(msg, node.col)
        return node

    def resize(self, operand: Node) -> Node:
        colon = self.take()
        sign = 0
        if self.at("+-"):
            sign = 1 if self.take().text == "+" else -1
        amount = self.expression(_BP_UNARY, commas=False, colons=True)
        if sign:
            return Roll(operand, amount, sign, col=colon.col)
        return Crop(operand, amount, col=colon.col)

    def modify(self, left: Node, *, commas: bool, colons: bool) -> Node:
        eq = self.take()
        tok = self.peek()
        if self.at("*/"):
            self.take()
            right = self.expression(_BP_MUL + 1, commas=commas, colons=colons)
            return Binary(tok.text, left, right, col=tok.col)
        if self.at(":"):
            return self.resize(left)
        msg = "'=' must be followed by *, / or : (as in 'a'+'b' =* 0.5)"
        raise self.error(msg, eq.col)


def _count(low: int, high: int | None) -> str:
    if high is None:
        return f"at least {low} argument{'s' * (low != 1)}"
    if low == high:
        return f"{low} argument{'s' * (low != 1)}"
    return f"{low} or {high} arguments"


def parse(expr: str) -> Node:
    """Parse an expression into its syntax tree; raise :class:`MergeSyntaxError` at the first fault."""
    if not isinstance(expr, str):
        msg = f"an expression must be text, not {type(expr).__name__}"
        raise MergeSyntaxError(msg)
    try:
        return _Parser(expr).parse()
    except RecursionError:
        msg = "the expression is nested too deeply"
        raise MergeSyntaxError(msg, 1, expr) from None
