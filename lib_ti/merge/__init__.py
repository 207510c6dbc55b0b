"""Embedding math: an expression language over words, token ids and existing embeddings.

It reads the Embedding Merge extension's syntax (``'a'+'b'``, ``*N``, ``/N``, ``*NL``/``*NG``, ``:N``,
``:+N``/``:-N``, ``'',ID``, ``00``/``000``/``0000``, ``=*N`` …) and adds parentheses with normal
precedence, numeric expressions, slicing and functions. A tokenizer and a Pratt parser build a tree of
dataclasses (:func:`parse`); :func:`evaluate` walks it. Nothing is ever passed to ``eval``.

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

import logging
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch

from lib_ti.embedding import ENCODER_WIDTHS, KIND_LABELS, MAX_VECTORS, Embedding
from lib_ti.errors import TIError
from lib_ti.names import validate_name

logger = logging.getLogger(__name__)

#: Longest vector sequence an intermediate value may hold (a final result holds 1 to 75).
MAX_INTERMEDIATE = 4096
#: Number suffix -> the encoder it scales.
SUFFIX_ENCODERS = {"L": "clip_l", "G": "clip_g"}
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
_NORM_CHUNK = 4096


# ---------------------------------------------------------------- errors


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


# ---------------------------------------------------------------- tokenizer


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
                right = self.expression(_BP_MUL + 1, commas=commas, colons=colons)
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


# ---------------------------------------------------------------- context and evaluation


@dataclass
class MergeContext:
    """What expressions are evaluated against: the model's encoders, tokenizer, tables and embeddings.

    ``tokenize`` gives CLIP BPE ids without the start and end tokens; ``token_vectors`` gives rows of
    each encoder's token-embedding table (``{encoder: [n, width]}``, no gradient). ``pad_id`` is 49407
    for CLIP-L models and 0 for open_clip SD2 (EM's ``00``).
    """

    encoders: tuple[str, ...]
    tokenize: Callable[[str], list[int]]
    token_vectors: Callable[[list[int]], dict[str, torch.Tensor]]
    embeddings: Mapping[str, Embedding]
    vocab_size: int = 49408
    bos_id: int = 49406
    eos_id: int = 49407
    pad_id: int = 49407
    #: Mean L2 norm of each encoder's token table, filled by :func:`vocab_norms` on first use.
    _vocab_norms: dict[str, float] = field(default_factory=dict, init=False, repr=False, compare=False)


def vocab_norms(ctx: MergeContext) -> dict[str, float]:
    """Mean L2 norm of the rows of each encoder's token table (the target of ``norm(x)``); cached on ``ctx``."""
    missing = [e for e in ctx.encoders if e not in ctx._vocab_norms]
    if missing:
        sums = dict.fromkeys(missing, 0.0)
        for start in range(0, ctx.vocab_size, _NORM_CHUNK):
            rows = ctx.token_vectors(list(range(start, min(start + _NORM_CHUNK, ctx.vocab_size))))
            for enc in missing:
                sums[enc] += float(rows[enc].detach().to("cpu", torch.float64).norm(dim=1).sum())
        for enc in missing:
            ctx._vocab_norms[enc] = sums[enc] / ctx.vocab_size
        logger.debug("vocabulary mean norms: %s", ctx._vocab_norms)
    return {e: ctx._vocab_norms[e] for e in ctx.encoders}


@dataclass(frozen=True)
class _Scale:
    """An ``L``/``G``-suffixed number: it scales one encoder's part of a sequence."""

    value: float
    encoder: str


_Seq = dict[str, torch.Tensor]
_Value = float | _Scale | _Seq


def _what(v: _Value) -> str:
    if isinstance(v, dict):
        n = _length(v)
        return f"{n} vector{'s' * (n != 1)}"
    if isinstance(v, _Scale):
        suffix = "L" if v.encoder == "clip_l" else "G"
        return f"the scale {v.value:g}{suffix}"
    return f"the number {v:g}"


def _length(seq: _Seq) -> int:
    return next(iter(seq.values())).shape[0]


class _Evaluator:
    def __init__(self, expr: str, ctx: MergeContext) -> None:
        self.expr = expr
        self.ctx = ctx
        self.encoders = tuple(ctx.encoders)
        if not self.encoders:
            msg = "the model has no text encoders"
            raise MergeError(msg)
        unknown = [e for e in self.encoders if e not in ENCODER_WIDTHS]
        if unknown:
            msg = f"unknown encoder {unknown[0]!r} (expected clip_l, clip_h or clip_g)"
            raise MergeError(msg)
        self.by_name = dict(ctx.embeddings)
        folded: dict[str, list[str]] = {}
        for name in self.by_name:
            folded.setdefault(" ".join(name.split()).casefold(), []).append(name)
        self.folded = folded
        self.max_words = max((len(name.split()) for name in self.by_name), default=1)

    def fail(self, message: str, col: int | None) -> MergeError:
        return MergeError(message, col, self.expr)

    # -- helpers

    def zeros(self, n: int) -> _Seq:
        return {e: torch.zeros(n, ENCODER_WIDTHS[e]) for e in self.encoders}

    def checked(self, seq: _Seq, col: int) -> _Seq:
        n = _length(seq)
        if n > MAX_INTERMEDIATE:
            msg = f"{n} vectors is too many, even for a step on the way (limit {MAX_INTERMEDIATE})"
            raise self.fail(msg, col)
        return seq

    def pad(self, seq: _Seq, n: int) -> _Seq:
        have = _length(seq)
        if have >= n:
            return seq
        return {e: torch.cat([t, t.new_zeros(n - have, t.shape[1])]) for e, t in seq.items()}

    def integer(self, v: _Value, what: str, col: int) -> int:
        if not isinstance(v, float):
            msg = f"{what} must be a whole number, not {_what(v)}"
            raise self.fail(msg, col)
        if not v.is_integer():
            msg = f"{what} must be a whole number, not {v:g}"
            raise self.fail(msg, col)
        return int(v)

    def sequence(self, v: _Value, what: str, col: int) -> _Seq:
        if not isinstance(v, dict):
            msg = f"{what} needs vectors, not {_what(v)}"
            raise self.fail(msg, col)
        return v

    def number(self, v: _Value, what: str, col: int) -> float:
        if isinstance(v, _Scale):
            msg = f"{_what(v)} only scales vectors, as in 'x' * 0.5L"
            raise self.fail(msg, col)
        if not isinstance(v, float):
            msg = f"{what} must be a number, not {_what(v)}"
            raise self.fail(msg, col)
        return v

    def finite(self, v: float, col: int) -> float:
        if not math.isfinite(v):
            msg = "the number overflows"
            raise self.fail(msg, col)
        return v

    # -- vectors from text and ids

    def lookup_ids(self, ids: list[int], col: int) -> _Seq:
        if not ids:
            return self.zeros(0)
        rows = self.ctx.token_vectors(list(ids))
        out: _Seq = {}
        for e in self.encoders:
            t = rows.get(e) if isinstance(rows, Mapping) else None
            if not isinstance(t, torch.Tensor) or tuple(t.shape) != (len(ids), ENCODER_WIDTHS[e]):
                got = list(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                msg = f"token_vectors gave {got} for {e}, expected [{len(ids)}, {ENCODER_WIDTHS[e]}]"
                raise self.fail(msg, col)
            out[e] = t.detach().to(device="cpu", dtype=torch.float32)
        return out

    def find_embedding(self, words: list[str], i: int, col: int) -> tuple[str, int] | None:
        """The embedding name that starts at ``words[i]`` (longest first) and its word count."""
        for k in range(min(self.max_words, len(words) - i), 0, -1):
            phrase = " ".join(words[i : i + k])
            if phrase in self.by_name:
                return phrase, k
            names = self.folded.get(phrase.casefold(), [])
            if len(names) > 1:
                msg = f"{phrase!r} matches several embeddings ({', '.join(sorted(names))}); write one exactly"
                raise self.fail(msg, col)
            if names:
                return names[0], k
        return None

    def embedding_vectors(self, name: str, col: int) -> _Seq:
        emb = self.by_name[name]
        missing = [e for e in self.encoders if e not in emb.vectors]
        if missing:
            label = KIND_LABELS.get(emb.kind, emb.kind)
            msg = f"embedding {name!r} has no {missing[0]} vectors: it is {label}, this model needs {' + '.join(self.encoders)}"
            raise self.fail(msg, col)
        return {e: emb.vectors[e].detach().to(device="cpu", dtype=torch.float32) for e in self.encoders}

    def text(self, node: Text) -> _Seq:
        matches = list(re.finditer(r"\S+", node.text))
        words = [m.group() for m in matches]
        cols = [node.positions[m.start()] if node.positions else node.col for m in matches]
        parts: list[_Seq] = []
        run: list[int] = []

        def flush() -> None:
            if run:
                text = " ".join(words[j] for j in run)
                ids = list(self.ctx.tokenize(text))
                if len(ids) > MAX_INTERMEDIATE:
                    msg = f"the text gives {len(ids)} tokens (limit {MAX_INTERMEDIATE})"
                    raise self.fail(msg, cols[run[0]])
                parts.append(self.lookup_ids(ids, cols[run[0]]))
                run.clear()

        i = 0
        while i < len(words):
            found = self.find_embedding(words, i, cols[i])
            if found is None:
                run.append(i)
                i += 1
                continue
            flush()
            name, k = found
            parts.append(self.embedding_vectors(name, cols[i]))
            i += k
        flush()
        if not parts:
            return self.zeros(0)
        return self.checked({e: torch.cat([p[e] for p in parts]) for e in self.encoders}, node.col)

    def token_id(self, v: _Value, col: int) -> int:
        if isinstance(v, float) and not v.is_integer():
            msg = f"token id {v:g} is not a whole number"
            raise self.fail(msg, col)
        tid = self.integer(v, "a token id", col)
        if not 0 <= tid < self.ctx.vocab_size:
            msg = f"token id {tid} is outside the vocabulary (0 to {self.ctx.vocab_size - 1})"
            raise self.fail(msg, col)
        return tid

    def concat(self, node: Concat) -> _Seq:
        parts: list[_Seq] = []
        ids: list[int] = []
        first_col = node.col
        special = {"pad": self.ctx.pad_id, "eos": self.ctx.eos_id, "bos": self.ctx.bos_id}
        for item in node.items:
            if isinstance(item, SpecialToken):
                if not ids:
                    first_col = item.col
                ids.append(self.token_id(float(special[item.which]), item.col))
                continue
            v = self.visit(item)
            if isinstance(v, dict):
                if ids:
                    parts.append(self.lookup_ids(ids, first_col))
                    ids = []
                parts.append(v)
                continue
            if not ids:
                first_col = item.col
            ids.append(self.token_id(v, item.col))
        if ids:
            parts.append(self.lookup_ids(ids, first_col))
        return self.checked({e: torch.cat([p[e] for p in parts]) for e in self.encoders}, node.col)

    # -- operators

    def binary(self, node: Binary) -> _Value:
        a = self.visit(node.left)
        b = self.visit(node.right)
        op, col = node.op, node.col
        if op == "^":
            x = self.number(a, "each side of '^'", col)
            y = self.number(b, "each side of '^'", col)
            try:
                return self.finite(math.pow(x, y), col)
            except (OverflowError, ValueError, ZeroDivisionError):
                msg = f"{x:g}^{y:g} is not a real number"
                raise self.fail(msg, col) from None
        if op in "+-":
            if isinstance(a, float) and isinstance(b, float):
                return self.finite(a + b if op == "+" else a - b, col)
            if isinstance(a, dict) and isinstance(b, dict):
                n = max(_length(a), _length(b))
                a, b = self.pad(a, n), self.pad(b, n)
                return {e: a[e] + b[e] if op == "+" else a[e] - b[e] for e in self.encoders}
            for v, side in ((a, node.left), (b, node.right)):
                if isinstance(v, _Scale):
                    msg = f"{_what(v)} only scales vectors, as in 'x' * 0.5L"
                    raise self.fail(msg, side.col)
            msg = f"'{op}' needs two numbers or two vector sequences, not {_what(a)} and {_what(b)}"
            raise self.fail(msg, col)
        if op == "*":
            if isinstance(a, dict) and isinstance(b, dict):
                msg = "cannot multiply two vector sequences; scale by a number, or combine with + or avg()"
                raise self.fail(msg, col)
            if isinstance(a, dict) or isinstance(b, dict):
                seq, factor = (a, b) if isinstance(a, dict) else (b, a)
                return self.scale(seq, factor, col, divide=False)  # type: ignore[arg-type]
            return self.finite(
                self.number(a, "each side of '*'", col) * self.number(b, "each side of '*'", col), col
            )
        # "/"
        if isinstance(b, dict):
            msg = f"cannot divide {_what(a)} by vectors"
            raise self.fail(msg, col)
        if isinstance(a, dict):
            return self.scale(a, b, col, divide=True)
        x, y = self.number(a, "each side of '/'", col), self.number(b, "each side of '/'", col)
        if y == 0:
            msg = "division by zero"
            raise self.fail(msg, col)
        return self.finite(x / y, col)

    def scale(self, seq: _Seq, factor: _Value, col: int, *, divide: bool) -> _Seq:
        if isinstance(factor, _Scale):
            value, only = factor.value, factor.encoder
        else:
            value, only = self.number(factor, "a scale", col), None
        if divide:
            if value == 0:
                msg = "division by zero"
                raise self.fail(msg, col)
            return {e: (t / value if only in (None, e) else t) for e, t in seq.items()}
        return {e: (t * value if only in (None, e) else t) for e, t in seq.items()}

    def unary(self, node: Unary) -> _Value:
        v = self.visit(node.operand)
        if node.op == "+":
            return v
        if isinstance(v, dict):
            return {e: -t for e, t in v.items()}
        if isinstance(v, _Scale):
            return _Scale(-v.value, v.encoder)
        return -v

    def suffixed(self, node: Number) -> _Scale:
        assert node.encoder is not None
        if set(self.encoders) != {"clip_l", "clip_g"}:
            suffix = "L" if node.encoder == "clip_l" else "G"
            msg = f"L/G suffix needs an SDXL model (clip_l + clip_g): {node.text}{suffix} scales only {node.encoder}"
            raise self.fail(msg, node.col)
        return _Scale(node.value, node.encoder)

    def crop(self, node: Crop) -> _Seq:
        seq = self.sequence(self.visit(node.operand), "':N'", node.col)
        n = self.integer(self.visit(node.size), "the size after ':'", node.size.col)
        if n < 0:
            msg = f"the size after ':' cannot be negative ({n}); ':+N' and ':-N' roll"
            raise self.fail(msg, node.size.col)
        if n > MAX_INTERMEDIATE:
            msg = f"{n} vectors is too many (limit {MAX_INTERMEDIATE})"
            raise self.fail(msg, node.size.col)
        return self.pad({e: t[:n] for e, t in seq.items()}, n)

    def roll(self, node: Roll) -> _Seq:
        seq = self.sequence(self.visit(node.operand), "':+N' and ':-N'", node.col)
        shift = node.sign * self.integer(
            self.visit(node.shift), "the shift after ':+' or ':-'", node.shift.col
        )
        n = _length(seq)
        if n == 0:
            return seq
        return {e: torch.roll(t, shift % n, dims=0) for e, t in seq.items()}

    def index(self, node: Index) -> _Seq:
        seq = self.sequence(self.visit(node.operand), "'[...]'", node.col)
        i = self.integer(self.visit(node.index), "an index", node.index.col)
        n = _length(seq)
        if not -n <= i < n:
            msg = f"index {i} is out of range for {n} vector{'s' * (n != 1)}"
            raise self.fail(msg, node.index.col)
        return {e: t[i : i + 1 if i != -1 else None] for e, t in seq.items()}

    def slice(self, node: Slice) -> _Seq:
        seq = self.sequence(self.visit(node.operand), "'[...]'", node.col)
        bounds: list[int | None] = []
        for part, what in (
            (node.start, "a slice start"),
            (node.stop, "a slice end"),
            (node.step, "a slice step"),
        ):
            bounds.append(None if part is None else self.integer(self.visit(part), what, part.col))
        if bounds[2] == 0:
            assert node.step is not None
            msg = "the slice step cannot be zero"
            raise self.fail(msg, node.step.col)
        keep = list(range(_length(seq)))[slice(*bounds)]
        idx = torch.tensor(keep, dtype=torch.long)
        return {e: t.index_select(0, idx) for e, t in seq.items()}

    # -- functions

    def call(self, node: Call) -> _Value:
        values = [self.visit(a) for a in node.args]
        name, col = node.name, node.col
        if name in ("avg", "mean"):
            return self.average(values, node)
        if name == "lerp":
            a, b, t = values
            w = self.number(t, "the t of lerp(a, b, t)", node.args[2].col)
            if isinstance(a, float) and isinstance(b, float):
                return self.finite(a + (b - a) * w, col)
            sa = self.sequence(a, "lerp(a, b, t)", node.args[0].col)
            sb = self.sequence(b, "lerp(a, b, t)", node.args[1].col)
            n = max(_length(sa), _length(sb))
            sa, sb = self.pad(sa, n), self.pad(sb, n)
            return {e: torch.lerp(sa[e], sb[e], w) for e in self.encoders}
        if name == "norm":
            return self.norm(values, node)
        if name == "pool":
            seq = self.sequence(values[0], "pool(x, n)", node.args[0].col)
            n = self.integer(values[1], "the n of pool(x, n)", node.args[1].col)
            if not 1 <= n <= MAX_INTERMEDIATE:
                msg = f"pool(x, n) needs n from 1 to {MAX_INTERMEDIATE}, not {n}"
                raise self.fail(msg, node.args[1].col)
            if _length(seq) == 0:
                msg = "pool(x, n) needs at least one vector in x"
                raise self.fail(msg, node.args[0].col)
            return {
                e: torch.nn.functional.adaptive_avg_pool1d(t.T.unsqueeze(0), n).squeeze(0).T.contiguous()
                for e, t in seq.items()
            }
        # L(...) / G(...)
        keep = SUFFIX_ENCODERS[name]
        if set(self.encoders) != {"clip_l", "clip_g"}:
            msg = f"{name}(...) needs an SDXL model (clip_l + clip_g)"
            raise self.fail(msg, col)
        seq = self.sequence(values[0], f"{name}(...)", node.args[0].col)
        return {e: (t if e == keep else torch.zeros_like(t)) for e, t in seq.items()}

    def average(self, values: list[_Value], node: Call) -> _Value:
        if all(isinstance(v, float) for v in values):
            return self.finite(math.fsum(values) / len(values), node.col)  # type: ignore[arg-type]
        seqs = [self.sequence(v, f"{node.name}(...)", a.col) for v, a in zip(values, node.args)]
        n = max(_length(s) for s in seqs)
        seqs = [self.pad(s, n) for s in seqs]
        return {e: torch.stack([s[e] for s in seqs]).mean(dim=0) for e in self.encoders}

    def norm(self, values: list[_Value], node: Call) -> _Seq:
        seq = self.sequence(values[0], "norm(x)", node.args[0].col)
        if len(values) == 1:
            target = vocab_norms(self.ctx)
        elif isinstance(values[1], dict):
            target = {}
            for e, t in values[1].items():
                lengths = t.norm(dim=1)
                lengths = lengths[lengths > 0]
                if lengths.numel() == 0:
                    msg = "norm(x, target): the target has no nonzero vectors"
                    raise self.fail(msg, node.args[1].col)
                target[e] = float(lengths.mean())
        else:
            value = self.number(values[1], "the target of norm(x, target)", node.args[1].col)
            if value < 0:
                msg = f"norm(x, target): a length cannot be negative ({value:g})"
                raise self.fail(msg, node.args[1].col)
            target = dict.fromkeys(self.encoders, value)
        out: _Seq = {}
        for e, t in seq.items():
            lengths = t.norm(dim=1, keepdim=True)
            factor = torch.where(lengths > 0, target[e] / lengths.clamp_min(1e-30), torch.zeros_like(lengths))
            out[e] = t * factor
        return out

    # -- dispatch

    def visit(self, node: Node) -> _Value:
        if isinstance(node, Number):
            return node.value if node.encoder is None else self.suffixed(node)
        if isinstance(node, Text):
            return self.text(node)
        if isinstance(node, Concat):
            return self.concat(node)
        if isinstance(node, SpecialToken):  # only inside a chain; kept for completeness
            return self.concat(Concat((node,), col=node.col))
        if isinstance(node, Unary):
            return self.unary(node)
        if isinstance(node, Binary):
            return self.binary(node)
        if isinstance(node, Crop):
            return self.crop(node)
        if isinstance(node, Roll):
            return self.roll(node)
        if isinstance(node, Index):
            return self.index(node)
        if isinstance(node, Slice):
            return self.slice(node)
        if isinstance(node, Call):
            return self.call(node)
        msg = f"unknown syntax node {type(node).__name__}"
        raise TypeError(msg)

    def result(self, node: Node) -> dict[str, torch.Tensor]:
        v = self.visit(node)
        start = len(self.expr) - len(self.expr.lstrip()) + 1
        if not isinstance(v, dict):
            msg = f"the expression gives {_what(v)}, not vectors"
            raise self.fail(msg, start)
        n = _length(v)
        if not 1 <= n <= MAX_VECTORS:
            hint = "" if n == 0 else f"; crop with :{MAX_VECTORS} or shrink with pool(x, n)"
            msg = f"the expression gives {n} vectors; an embedding holds 1 to {MAX_VECTORS}{hint}"
            raise self.fail(msg, start)
        out: dict[str, torch.Tensor] = {}
        for e in self.encoders:
            t = v[e].to(dtype=torch.float32).contiguous().clone()
            bad = ~torch.isfinite(t)
            if bad.any():
                row = int(bad.any(dim=1).nonzero()[0, 0])
                msg = f"the result overflows: {e} vector {row} is not finite"
                raise self.fail(msg, start)
            out[e] = t
        return out


def evaluate(expr: str, ctx: MergeContext) -> dict[str, torch.Tensor]:
    """Evaluate an expression: ``{encoder: [n, width]}`` float32 CPU tensors, 1 to 75 finite vectors.

    Raises :class:`MergeSyntaxError` for a malformed expression and :class:`MergeError` for one that
    cannot be computed (both say where).
    """
    node = parse(expr)
    try:
        vectors = _Evaluator(expr, ctx).result(node)
    except RecursionError:
        msg = "the expression is nested too deeply (too many operators in a row)"
        raise MergeError(msg, 1, expr) from None
    logger.debug("merged %r into %d vectors", expr, next(iter(vectors.values())).shape[0])
    return vectors


def merge_to_embedding(expr: str, ctx: MergeContext, name: str) -> Embedding:
    """Evaluate ``expr`` into a new embedding called ``name``; the expression goes into its metadata."""
    validate_name(name)
    return Embedding(name, evaluate(expr, ctx), metadata={"merge_expression": expr})
