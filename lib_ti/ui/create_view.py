"""The Create view: a new embedding for the loaded model from an init text, zeros or random vectors."""

from __future__ import annotations

import logging

import gradio as gr

from lib_ti.create import WARN_VECTORS, CreateArgs, InitMode
from lib_ti.errors import TIError
from lib_ti.hostinfo import HostInfo
from lib_ti.io.formats import read_embedding
from lib_ti.training.recipes import default_vectors
from lib_ti.ui.common import CHUNK, card_markdown, error_html, get_service, model_error, ok_html, warn_html
from lib_ti.ui.compat import js_kwargs

logger = logging.getLogger(__name__)

INIT_MODES: dict[str, InitMode] = {
    "from the init text": "text",
    "zeros": "zeros",
    "random (vocabulary-sized norms)": "random",
}


class CreateHandlers:
    def __init__(self, host: HostInfo) -> None:
        self.host = host

    @staticmethod
    def budget(vectors: float) -> str:
        n = int(vectors or 1)
        text = f"Each use of the name takes **{n} of the {CHUNK} tokens** of a prompt chunk."
        if n > WARN_VECTORS:
            text += f" More than {WARN_VECTORS} vectors overfit quickly and crowd the prompt."
        return text

    def count_tokens(self, init_text: str, vectors: float) -> str:
        if not (init_text or "").strip():
            return "Type an init text: a few words that describe the subject or style."
        try:
            counts = get_service(self.host).token_counts(init_text)
        except Exception as e:  # no model loaded yet, or a host without one
            return model_error(e)
        n = int(vectors or 1)
        parts = ", ".join(f"{enc}: {c} token(s)" for enc, c in counts.items())
        first = next(iter(counts.values()), 0)
        if first == 0:
            return parts + " (no tokens: the vectors cannot be initialized from this text)"
        if first < n:
            hint = f"; {n} vectors from {first} token(s): some tokens are used more than once"
        elif first > n:
            hint = f"; {n} vector(s) from {first} tokens: vector i starts as token i x {first} // {n}"
        else:
            hint = "; one vector per token"
        return parts + hint

    def create(
        self, name: str, vectors: float, mode_label: str, init_text: str, seed: float, overwrite: bool
    ) -> tuple[str, str]:
        name = (name or "").strip()
        mode: InitMode = INIT_MODES.get(mode_label, "text")
        args = CreateArgs(
            name, int(vectors or 1), mode, init_text or "*", int(seed) if seed and seed >= 0 else None
        )
        try:
            service = get_service(self.host)
            path, warnings = service.create(args, overwrite=bool(overwrite))
            emb = read_embedding(path)
            try:
                nearest = service.nearest(emb, 3)
            except (TIError, RuntimeError) as e:
                logger.warning("nearest tokens: %s", e)
                nearest = None
        except (TIError, FileExistsError, ValueError) as e:
            return error_html(e), ""
        except Exception as e:
            return model_error(e), ""
        note = ok_html(f"Created {path.name}; use it in prompts as {emb.name}.")
        if warnings:
            note += "<br>" + "<br>".join(warn_html(w) for w in warnings)
        return note, card_markdown(emb, path.name, nearest)


def build(host: HostInfo) -> CreateHandlers:
    h = CreateHandlers(host)
    vectors_default = default_vectors(host.get_option)
    with gr.Row():
        with gr.Column():
            name = gr.Textbox(label="Name", placeholder="my-subject", elem_id="ti_create_name")
            vectors = gr.Slider(
                1,
                CHUNK,
                value=vectors_default,
                step=1,
                label="Vectors per token",
                elem_id="ti_create_vectors",
            )
            budget = gr.Markdown(h.budget(vectors_default), elem_id="ti_create_budget")
            mode = gr.Radio(
                list(INIT_MODES), value="from the init text", label="Initialize", elem_id="ti_create_mode"
            )
            init_text = gr.Textbox(
                label="Init text",
                value="",
                placeholder="a photo of a red sports car",
                elem_id="ti_create_init",
            )
            tokens = gr.Markdown(elem_id="ti_create_tokens")
            with gr.Row():
                seed = gr.Number(-1, label="Seed for random (-1: any)", precision=0, elem_id="ti_create_seed")
                overwrite = gr.Checkbox(
                    False, label="Overwrite an existing embedding", elem_id="ti_create_overwrite"
                )
            button = gr.Button("Create embedding", variant="primary", elem_id="ti_create_button")
        with gr.Column():
            result = gr.HTML(elem_id="ti_create_result")
            card = gr.Markdown(elem_id="ti_create_card")
    vectors.change(h.budget, inputs=[vectors], outputs=[budget])
    init_text.change(h.count_tokens, inputs=[init_text, vectors], outputs=[tokens])
    vectors.change(h.count_tokens, inputs=[init_text, vectors], outputs=[tokens])
    button.click(
        h.create, inputs=[name, vectors, mode, init_text, seed, overwrite], outputs=[result, card]
    ).then(fn=None, **js_kwargs("tiRefreshCards"))
    return h
