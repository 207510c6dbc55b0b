"""Finding ``<'…'>`` and ``{'…'}`` expressions in a prompt, as the Embedding Merge extension does.

An expression starts where ``<'`` (or ``{'``) is written with nothing between the two characters and
ends at the first ``>`` (``}``) outside a quoted string; inside strings ``''`` is a quote. LoRA and
other extra-network tags (``<lora:x:1>``), attention brackets, ``[a:b:0.5]`` and ``BREAK`` are not
expressions and stay as they are.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from lib_ti.merge import MergeSyntaxError

#: EM's temporary names (``<'EM_1'>``) as EM writes them into prompts and infotexts
EM_PLACEHOLDER = re.compile(r"<'EM[_/-]\d+'>|\{'EM[_/-]\d+'\}")


@dataclass(frozen=True)
class Found:
    """One expression: ``prompt[start:end]`` is the whole ``<'…'>``; ``expr`` what is inside the brackets."""

    start: int
    end: int
    expr: str
    curly: bool

    @property
    def bracketed(self) -> str:
        return ("{" if self.curly else "<") + self.expr + ("}" if self.curly else ">")


class PromptExpressionError(MergeSyntaxError):
    """A ``<'`` in a prompt that does not hold a usable expression (unclosed, an EM placeholder)."""


def might_hold(prompt: str, *, curly: bool = True) -> bool:
    """Cheap test: could ``prompt`` hold an expression at all."""
    return "<'" in prompt or (curly and "{'" in prompt)


def find_expressions(prompt: str, *, curly: bool = True) -> list[Found]:
    """Every expression of ``prompt``, left to right. ``curly``: ``{'…'}`` counts too (EM's default).

    Raises :class:`PromptExpressionError` (with the column in the prompt) for an unclosed one and for
    EM's own placeholders, which only EM could fill.
    """
    found: list[Found] = []
    openers = "<{" if curly else "<"
    i = 0
    n = len(prompt)
    while i < n - 1:
        c = prompt[i]
        if c not in openers or prompt[i + 1] != "'":
            i += 1
            continue
        placeholder = EM_PLACEHOLDER.match(prompt, i)
        if placeholder is not None:
            msg = (
                f"{placeholder.group()} is a name the Embedding Merge extension gave an expression; paste the "
                "whole generation info (its EmbeddingMerge field holds the expression) or write the expression"
            )
            raise PromptExpressionError(msg, i + 1, prompt)
        end = closing(prompt, i)
        if end < 0:
            msg = f"no closing {'}' if c == '{' else '>'!r} after {c}' in the prompt"
            raise PromptExpressionError(msg, i + 1, prompt)
        found.append(Found(i, end, prompt[i + 1 : end - 1].strip(), c == "{"))
        i = end
    return found


def closing(text: str, i: int) -> int:
    """The end (after the closing bracket) of the expression that opens at ``text[i]``, or -1."""
    closer = "}" if text[i] == "{" else ">"
    quoted = False
    j = i + 1
    while j < len(text):
        ch = text[j]
        if ch == "'":
            if quoted and text.startswith("''", j):
                j += 2
                continue
            quoted = not quoted
        elif ch == closer and not quoted:
            return j + 1
        j += 1
    return -1


def replace_expressions(prompt: str, found: list[Found], names: list[str]) -> str:
    """``prompt`` with each found expression replaced by its name ("" removes it), spaced apart so the
    name is read as its own words."""
    out: list[str] = []
    last = 0
    for f, name in zip(found, names):
        out.append(prompt[last : f.start])
        out.append(f" {name} " if name else " ")
        last = f.end
    out.append(prompt[last:])
    return "".join(out)
