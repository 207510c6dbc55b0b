"""Evaluator of embedding math: :func:`evaluate` walks a parsed expression against a :class:`MergeContext`."""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch

from lib_ti.embedding import ENCODER_WIDTHS, HOST_KINDS, MAX_VECTORS, Embedding, non_host_kind_message
from lib_ti.merge.errors import MergeError
from lib_ti.merge.lexer import SUFFIX_ENCODERS
from lib_ti.merge.syntax import (
    Binary,
    Call,
    Concat,
    Crop,
    Index,
    Node,
    Number,
    Roll,
    Slice,
    SpecialToken,
    Text,
    Unary,
    parse,
)
from lib_ti.names import validate_name

logger = logging.getLogger(__name__)

#: Longest vector sequence an intermediate value may hold (a final result holds 1 to 75).
MAX_INTERMEDIATE = 4096
_NORM_CHUNK = 4096


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
    #: each encoder's own padding id where it differs from ``pad_id`` (EM's ``00``: 0 for open_clip's CLIP-G)
    pad_ids: Mapping[str, int] = field(default_factory=dict)
    #: Mean L2 norm of each encoder's token table, filled by :func:`vocab_norms` on first use.
    _vocab_norms: dict[str, float] = field(default_factory=dict, init=False, repr=False, compare=False)
    #: first token id -> [(token ids of a name, names with those ids)], longest first; built on first use
    _name_index: dict[int, list[tuple[tuple[int, ...], list[str]]]] | None = field(
        default=None, init=False, repr=False, compare=False
    )


def _name_index(ctx: MergeContext) -> dict[int, list[tuple[tuple[int, ...], list[str]]]]:
    """Embedding names by their token ids, as the web UI finds them in a prompt; cached on ``ctx``.

    Only embeddings with vectors for every encoder of the model are names; the others are plain words
    there (A1111 skips an SD1 embedding on SDXL, and EM reads its name as words).
    """
    if ctx._name_index is None:
        by_ids: dict[tuple[int, ...], list[str]] = {}
        for name, emb in ctx.embeddings.items():
            if any(e not in emb.vectors for e in ctx.encoders):
                continue
            ids = tuple(ctx.tokenize(name))
            if ids:
                by_ids.setdefault(ids, []).append(name)
        index: dict[int, list[tuple[tuple[int, ...], list[str]]]] = {}
        for ids, names in sorted(by_ids.items(), key=lambda kv: -len(kv[0])):
            index.setdefault(ids[0], []).append((ids, names))
        ctx._name_index = index
    return ctx._name_index


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

    @staticmethod
    def written(name: str, node: Text) -> tuple[str, int]:
        """How ``name`` is written in the string (any case and spacing) and its column."""
        m = re.search(r"\s+".join(map(re.escape, name.split())), node.text, re.IGNORECASE)
        if m is None:
            return name, node.col
        return m.group(), node.positions[m.start()] if node.positions else node.col

    def find_embedding(self, ids: list[int], i: int, node: Text) -> tuple[str, int] | None:
        """The embedding whose name's tokens start at ``ids[i]`` (longest first) and its token count.

        Names are found by tokens, as the web UI finds them in prompts: ``'mystyle,cat'`` holds
        ``mystyle``. Names that differ only in case have the same tokens: the one written exactly wins.
        """
        for name_ids, names in _name_index(self.ctx).get(ids[i], []):
            if tuple(ids[i : i + len(name_ids)]) != name_ids:
                continue
            if len(names) > 1:
                spaced = " ".join(node.text.split())
                exact = [n for n in names if " ".join(n.split()) in spaced]
                if len(exact) != 1:
                    phrase, col = self.written(names[0], node)
                    msg = f"{phrase!r} matches several embeddings ({', '.join(sorted(names))}); write one exactly"
                    raise self.fail(msg, col)
                names = exact
            return names[0], len(name_ids)
        return None

    def embedding_vectors(self, name: str, node: Text) -> _Seq:
        emb = self.by_name[name]
        if emb.kind not in HOST_KINDS:  # SD3/Flux: converted first, by the user
            raise self.fail(non_host_kind_message(emb, "embedding math"), self.written(name, node)[1])
        return {e: emb.vectors[e].detach().to(device="cpu", dtype=torch.float32) for e in self.encoders}

    def text(self, node: Text) -> _Seq:
        ids = list(self.ctx.tokenize(node.text)) if node.text.strip() else []
        if len(ids) > MAX_INTERMEDIATE:
            msg = f"the text gives {len(ids)} tokens (limit {MAX_INTERMEDIATE})"
            raise self.fail(msg, node.col)
        parts: list[_Seq] = []
        run: list[int] = []
        i = 0
        while i < len(ids):
            found = self.find_embedding(ids, i, node)
            if found is None:
                run.append(ids[i])
                i += 1
                continue
            if run:
                parts.append(self.lookup_ids(run, node.col))
                run = []
            name, k = found
            parts.append(self.embedding_vectors(name, node))
            i += k
        if run:
            parts.append(self.lookup_ids(run, node.col))
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
        pads = {e: self.ctx.pad_ids.get(e, self.ctx.pad_id) for e in self.encoders}
        special = {"pad": pads[self.encoders[0]], "eos": self.ctx.eos_id, "bos": self.ctx.bos_id}
        for item in node.items:
            if isinstance(item, SpecialToken) and item.which == "pad" and len(set(pads.values())) > 1:
                if ids:  # each encoder's own padding id (0 on open_clip's CLIP-G, 49407 on CLIP-L)
                    parts.append(self.lookup_ids(ids, first_col))
                    ids = []
                parts.append({e: self.lookup_ids([pads[e]], item.col)[e] for e in self.encoders})
                continue
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

    def result(self, node: Node, *, allow_empty: bool = False) -> dict[str, torch.Tensor]:
        v = self.visit(node)
        start = len(self.expr) - len(self.expr.lstrip()) + 1
        if not isinstance(v, dict):
            msg = f"the expression gives {_what(v)}, not vectors"
            raise self.fail(msg, start)
        n = _length(v)
        if not (0 if allow_empty else 1) <= n <= MAX_VECTORS:
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


def evaluate(expr: str, ctx: MergeContext, *, allow_empty: bool = False) -> dict[str, torch.Tensor]:
    """Evaluate an expression: ``{encoder: [n, width]}`` float32 CPU tensors, 1 to 75 finite vectors
    (0 too with ``allow_empty``: in a prompt, EM's ``<'text':0>`` removes the text).

    Raises :class:`MergeSyntaxError` for a malformed expression and :class:`MergeError` for one that
    cannot be computed (both say where).
    """
    node = parse(expr)
    try:
        vectors = _Evaluator(expr, ctx).result(node, allow_empty=allow_empty)
    except RecursionError:
        msg = "the expression is nested too deeply (too many operators in a row)"
        raise MergeError(msg, 1, expr) from None
    logger.debug("merged %r into %d vectors", expr, next(iter(vectors.values())).shape[0])
    return vectors


def merge_to_embedding(expr: str, ctx: MergeContext, name: str) -> Embedding:
    """Evaluate ``expr`` into a new embedding called ``name``; the expression goes into its metadata."""
    validate_name(name)
    return Embedding(name, evaluate(expr, ctx), metadata={"merge_expression": expr})
