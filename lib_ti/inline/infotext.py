"""EM's ``EmbeddingMerge`` infotext field: written for every image, read back when pasting.

The field lists the expressions an image's prompts use, in EM's own format:
``<'EM_1'>=<'cat'+'dog'>, {'EM_2'}={'blurry'+'cropped'}``. Our infotexts keep the expressions in the
prompts, so pasting them needs nothing; EM's infotexts hold ``<'EM_1'>`` in the prompts, which
:func:`restore` puts back as the expressions.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping

from lib_ti.inline.scan import EM_PLACEHOLDER, PromptExpressionError, closing, find_expressions

FIELD = "EmbeddingMerge"
#: the infotext keys (A1111's parse_generation_parameters) whose text may hold expressions
PROMPT_KEYS = ("Prompt", "Negative prompt", "Hires prompt", "Hires negative prompt")


def format_field(texts: Iterable[str], *, curly: bool = True) -> str:
    """The field for an image whose prompts are ``texts``: each distinct expression once, numbered in
    order of first use (``""`` when there is none)."""
    seen: dict[str, None] = {}
    for text in texts:
        if not text:
            continue
        try:
            found = find_expressions(text, curly=curly)
        except PromptExpressionError:
            continue
        for f in found:
            seen.setdefault(f.bracketed)
    items = []
    for n, bracketed in enumerate(seen, 1):
        name = f"{{'EM_{n}'}}" if bracketed.startswith("{") else f"<'EM_{n}'>"
        items.append(f"{name}={bracketed}")
    return ", ".join(items)


def parse_field(value: str) -> dict[str, str]:
    """``{placeholder: bracketed expression}`` from the field's value (as the host unquoted it, or still
    JSON-quoted as some tools keep it). Unreadable parts are left out."""
    value = value.strip()
    if value.startswith('"'):
        try:
            value = str(json.loads(value))
        except ValueError:
            value = value.strip('"')
    out: dict[str, str] = {}
    pos = 0
    while True:
        m = EM_PLACEHOLDER.search(value, pos)
        if m is None or not value.startswith("=", m.end()):
            return out
        start = m.end() + 1
        end = closing(value, start) if value[start : start + 2] in ("<'", "{'") else -1
        if end < 0:
            return out
        out[m.group()] = value[start:end]
        pos = end


def restore(text: str, mapping: Mapping[str, str]) -> str:
    """``text`` with EM's placeholders replaced by their expressions (unknown ones stay)."""
    return EM_PLACEHOLDER.sub(lambda m: mapping.get(m.group(), m.group()), text)


def on_pasted(params: dict[str, str]) -> None:
    """Fill EM's placeholders in the pasted prompts from the pasted ``EmbeddingMerge`` field (in place)."""
    value = params.get(FIELD)
    if not value:
        return
    mapping = parse_field(str(value))
    if not mapping:
        return
    for key in PROMPT_KEYS:
        if isinstance(params.get(key), str):
            params[key] = restore(params[key], mapping)
