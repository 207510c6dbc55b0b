"""The Merge view: an embedding from an expression over words and embeddings (docs/SYNTAX.md)."""

from __future__ import annotations

import logging
from pathlib import Path

import gradio as gr

from lib_ti.embedding import KIND_LABELS
from lib_ti.errors import TIError
from lib_ti.hostinfo import HostInfo
from lib_ti.io.formats import read_embedding
from lib_ti.ui.common import (
    NEAREST_HEADERS,
    card_markdown,
    error_html,
    get_service,
    model_error,
    nearest_rows,
    ok_html,
)
from lib_ti.ui.compat import js_kwargs

logger = logging.getLogger(__name__)

SYNTAX_DOC = Path(__file__).resolve().parents[2] / "docs" / "SYNTAX.md"
EXAMPLES = [
    "'a red sports car'",
    "avg('cat', 'dog')",
    "'cat' + ('photo' - 'painting') * 0.5",
    "pool('a photo of a red sports car', 2)",
]


def syntax_help() -> str:
    """docs/SYNTAX.md without its Python-only opening section."""
    try:
        text = SYNTAX_DOC.read_text(encoding="utf-8")
    except OSError:
        return "See docs/SYNTAX.md in the extension's folder."
    start = text.find("## Strings")
    return text[start:] if start >= 0 else text


class MergeHandlers:
    def __init__(self, host: HostInfo) -> None:
        self.host = host

    def preview(self, expression: str) -> tuple[str, list[list[object]]]:
        if not (expression or "").strip():
            return "Type an expression; the result shows here as you type.", []
        try:
            service = get_service(self.host)
            got = service.evaluate(expression, nearest=3)
        except (TIError, ValueError) as e:
            return error_html(e), []
        except Exception as e:
            return model_error(e), []
        summary = f"**{KIND_LABELS[got['kind']]}**, {got['vectors']} vector(s); norms " + "; ".join(
            f"{k}: {', '.join(f'{x:.3f}' for x in v)}" for k, v in got["norms"].items()
        )
        return summary, nearest_rows(got["nearest"])

    def save(self, expression: str, name: str, overwrite: bool) -> tuple[str, str]:
        try:
            service = get_service(self.host)
            path = service.merge(expression or "", (name or "").strip(), overwrite=bool(overwrite))
            emb = read_embedding(path)
        except (TIError, FileExistsError, ValueError) as e:
            return error_html(e), ""
        except Exception as e:
            return model_error(e), ""
        return ok_html(f"Saved {path.name}; use it in prompts as {emb.name}."), card_markdown(
            emb, path.name, None
        )


def build(host: HostInfo) -> MergeHandlers:
    h = MergeHandlers(host)
    expression = gr.Textbox(
        label="Expression", lines=2, placeholder="avg('cat', 'dog') * 1.1", elem_id="ti_merge_expression"
    )
    with gr.Accordion("Syntax", open=False, elem_id="ti_merge_syntax"):
        gr.Markdown("Examples: " + " · ".join(f"`{e}`" for e in EXAMPLES))
        gr.Markdown(syntax_help(), elem_id="ti_merge_syntax_text")
    summary = gr.Markdown(elem_id="ti_merge_summary")
    table = gr.Dataframe(headers=NEAREST_HEADERS, interactive=False, elem_id="ti_merge_nearest")
    with gr.Row():
        name = gr.Textbox(label="Name", elem_id="ti_merge_name")
        overwrite = gr.Checkbox(False, label="Overwrite an existing embedding", elem_id="ti_merge_overwrite")
    save = gr.Button("Save", variant="primary", elem_id="ti_merge_save")
    result = gr.HTML(elem_id="ti_merge_result")
    card = gr.Markdown(elem_id="ti_merge_card")
    expression.change(h.preview, inputs=[expression], outputs=[summary, table])
    save.click(h.save, inputs=[expression, name, overwrite], outputs=[result, card]).then(
        fn=None, **js_kwargs("tiRefreshCards")
    )
    return h
