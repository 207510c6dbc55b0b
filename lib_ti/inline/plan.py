"""Evaluating the expressions of prompts and rewriting the prompts with temporary embedding names.

Each distinct expression is evaluated once per merge context (the loaded model and the embeddings
folder): :class:`InlineEvaluator` keeps the results until the context changes. A result becomes a
temporary :class:`~lib_ti.embedding.Embedding` whose name is derived from its vectors, so the host's
conditioning cache (keyed by prompt text) can never serve a result computed from other vectors.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from lib_ti.embedding import Embedding
from lib_ti.inline.scan import find_expressions, might_hold, replace_expressions
from lib_ti.merge import MergeContext, MergeError, evaluate

logger = logging.getLogger(__name__)

#: prefix of temporary embedding names (never written to disk)
TEMP_PREFIX = "tiinline"
#: a word that is one token on every CLIP tokenizer, standing in for one vector in the token counter
COUNT_FILLER = "a"
_MAX_CACHED = 512


@dataclass
class Plan:
    """Prompts with their expressions replaced, and the temporary embeddings those names stand for."""

    prompts: list[str]
    embeddings: dict[str, Embedding] = field(default_factory=dict)


def temp_name(vectors: dict[str, torch.Tensor]) -> str:
    """A name that depends only on the vectors (same vectors, same name)."""
    h = hashlib.sha1(usedforsecurity=False)
    for enc in sorted(vectors):
        t = vectors[enc].detach().to("cpu", torch.float32).contiguous()
        h.update(f"{enc}:{tuple(t.shape)};".encode())
        h.update(t.numpy().tobytes())
    return f"{TEMP_PREFIX}{h.hexdigest()[:12]}"


class InlineEvaluator:
    """Results of prompt expressions on one merge context (thread-safe; cleared when the context changes)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._ctx: MergeContext | None = None
        self._results: dict[str, dict[str, torch.Tensor] | MergeError] = {}

    def forget(self) -> None:
        """Drop the context and results (a new model: the old one's encoders must not stay reachable)."""
        with self._lock:
            self._ctx, self._results = None, {}

    def vectors(self, ctx: MergeContext, expr: str) -> dict[str, torch.Tensor]:
        """The vectors of ``expr`` (0 to 75 of them); raises the cached :class:`MergeError` for a bad one."""
        with self._lock:
            if ctx is not self._ctx:
                self._ctx, self._results = ctx, {}
            got = self._results.get(expr)
        if got is None:
            try:
                got = evaluate(expr, ctx, allow_empty=True)
            except MergeError as e:
                got = e
            with self._lock:
                if ctx is self._ctx:
                    if len(self._results) >= _MAX_CACHED:
                        self._results.pop(next(iter(self._results)))
                    self._results[expr] = got
        if isinstance(got, MergeError):
            raise got
        return got

    def _located(self, ctx: MergeContext, expr: str, bracketed: str) -> dict[str, torch.Tensor]:
        try:
            return self.vectors(ctx, expr)
        except MergeError as e:
            msg = f"embedding math {bracketed} in the prompt: {e.reason}"
            raise MergeError(msg, e.column, expr) from None

    def check(self, ctx: MergeContext, prompts: Sequence[str], *, curly: bool = True) -> None:
        """Raise for the first prompt expression that cannot be evaluated (results stay cached)."""
        for prompt in prompts:
            if prompt and might_hold(prompt, curly=curly):
                for f in find_expressions(prompt, curly=curly):
                    self._located(ctx, f.expr, f.bracketed)

    def plan(self, ctx: MergeContext, prompts: Sequence[str], *, curly: bool = True) -> Plan:
        """``prompts`` with each expression replaced by a temporary embedding's name."""
        out = Plan(prompts=[])
        for prompt in prompts:
            if not prompt or not might_hold(prompt, curly=curly):
                out.prompts.append(prompt)
                continue
            found = find_expressions(prompt, curly=curly)
            names = []
            for f in found:
                vectors = self._located(ctx, f.expr, f.bracketed)
                if next(iter(vectors.values())).shape[0] == 0:
                    names.append("")  # EM: a result of no vectors removes the text
                    continue
                name = temp_name(vectors)
                if name not in out.embeddings:
                    out.embeddings[name] = Embedding(name, vectors, metadata={"merge_expression": f.expr})
                names.append(name)
            out.prompts.append(replace_expressions(prompt, found, names) if found else prompt)
        return out

    def counted(self, ctx: MergeContext, prompt: str, *, curly: bool = True) -> str:
        """``prompt`` for the token counter: each expression as one filler word per vector (a bad or
        unfinished expression stays as typed)."""
        if not might_hold(prompt, curly=curly):
            return prompt
        try:
            found = find_expressions(prompt, curly=curly)
        except MergeError:
            return prompt
        fillers = []
        for f in found:
            try:
                n = next(iter(self.vectors(ctx, f.expr).values())).shape[0]
            except MergeError:
                fillers.append(f.bracketed)
                continue
            fillers.append(" ".join([COUNT_FILLER] * n))
        return replace_expressions(prompt, found, fillers)
