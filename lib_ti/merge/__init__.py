"""Embedding math: an expression language over words, token ids and existing embeddings.

It reads the Embedding Merge extension's syntax (``'a'+'b'``, ``*N``, ``/N``, ``*NL``/``*NG``, ``:N``,
``:+N``/``:-N``, ``'',ID``, ``00``/``000``/``0000``, ``=*N`` …) and adds parentheses with normal
precedence, numeric expressions, slicing and functions. Three phases, one module each:
:mod:`~lib_ti.merge.lexer` (tokens), :mod:`~lib_ti.merge.syntax` (syntax tree and :func:`parse`) and
:mod:`~lib_ti.merge.evaluator` (:func:`evaluate`); :mod:`~lib_ti.merge.errors` holds what they raise.
Nothing is ever passed to ``eval``.
"""

from __future__ import annotations

from lib_ti.merge.errors import MergeError, MergeSyntaxError
from lib_ti.merge.evaluator import MAX_INTERMEDIATE, MergeContext, evaluate, merge_to_embedding, vocab_norms
from lib_ti.merge.lexer import SUFFIX_ENCODERS
from lib_ti.merge.syntax import (
    FUNCTIONS,
    SPECIAL_TOKENS,
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

__all__ = [
    "FUNCTIONS",
    "MAX_INTERMEDIATE",
    "SPECIAL_TOKENS",
    "SUFFIX_ENCODERS",
    "Binary",
    "Call",
    "Concat",
    "Crop",
    "Index",
    "MergeContext",
    "MergeError",
    "MergeSyntaxError",
    "Node",
    "Number",
    "Roll",
    "Slice",
    "SpecialToken",
    "Text",
    "Unary",
    "evaluate",
    "merge_to_embedding",
    "parse",
    "vocab_norms",
]
