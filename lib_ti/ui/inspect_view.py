"""The Inspect view: pick an embedding (or upload one), see its numbers, compare, convert and save."""

from __future__ import annotations

import html
import logging
from typing import Any

import gradio as gr

from lib_ti.embedding import HOST_KINDS, KIND_LABELS, Embedding
from lib_ti.errors import TIError
from lib_ti.hostinfo import HostInfo
from lib_ti.io import library
from lib_ti.io.formats import read_embedding
from lib_ti.stats import Comparison, embedding_stats
from lib_ti.ui import grid_view
from lib_ti.ui.common import NEAREST_HEADERS, nearest_rows
from lib_ti.ui.compat import file_upload_kwargs, js_kwargs, uploaded_path
from lib_ti.ui.plots import bar_plot

logger = logging.getLogger(__name__)

CONVERT_TARGETS: dict[str, library.ConvertTarget] = {
    "same kind": "same",
    "SD1 (CLIP-L half of an SDXL embedding)": "sd1",
    "SDXL: CLIP-L from this, CLIP-G from the comparison embedding": "sdxl_g_from_other",
    "SDXL: CLIP-L from this, CLIP-G zeros": "sdxl_g_zeros",
    "SDXL: CLIP-L from this, CLIP-G by nearest tokens (an SDXL model loaded)": "sdxl_g_by_tokens",
    "SD1 from a CLIP-G-only file by nearest tokens (an SDXL model loaded)": "sd1_by_tokens",
    "SDXL from SD3 (T5 dropped)": "sdxl",
    "SD3/Flux with OneTrainer's keys (t5)": "onetrainer",
    "SD3/Flux with ComfyUI's keys (t5xxl)": "comfyui",
}


#: summary, stats rows, metadata, status line, nearest-token rows, norms plot
Described = tuple[str, list[list[object]], dict[str, Any], str, list[list[object]], str]


def _error(e: Exception) -> str:
    return f"<span class='ti-error'>⚠ {html.escape(str(e))}</span>"


STATS_HEADERS = ["encoder", "vector", "norm", "min", "max", "mean", "std"]
COMPARE_HEADERS = ["encoder", "vector", "cosine", "mean |A-B|"]


def vector_count_text(emb: Embedding) -> str:
    """``2 vector(s) per token``, or the count of each encoder where they differ (SD3/Flux T5)."""
    counts = emb.vector_counts
    if len(set(counts.values())) == 1:
        return f"{emb.num_vectors} vector(s) per token"
    return "vectors per token: " + ", ".join(f"{k} {n}" for k, n in counts.items())


def summary_markdown(emb: Embedding, relpath: str, status: dict[str, str]) -> str:
    host = status.get(emb.name)
    host_line = {
        "loaded": "loaded by the web UI: usable in prompts",
        "skipped": "skipped by the web UI (made for another model type)",
    }.get(host or "", "not in the web UI's database")
    lines = [
        f"### {emb.name}",
        f"- file: `{relpath}` ({emb.source})",
        f"- kind: **{KIND_LABELS[emb.kind]}**, {vector_count_text(emb)}",
        f"- step: {emb.step if emb.step is not None else 'unknown'}",
        f"- status: {host_line}",
    ]
    if emb.kind == "sd3":
        lines.append("- the web UIs use its CLIP-L and CLIP-G vectors as an SDXL embedding (T5 is not used)")
    elif emb.kind not in HOST_KINDS:
        lines.append(
            "- the web UIs cannot load this kind (their loader reports an error for it at every reload): "
            "keep it outside the embeddings folder, or convert it to SD1 below"
        )
    if emb.sd_checkpoint or emb.sd_checkpoint_name:
        lines.append(f"- trained on: {emb.sd_checkpoint_name or '?'} [{emb.sd_checkpoint or '?'}]")
    return "\n".join(lines)


def stats_rows(emb: Embedding) -> list[list[object]]:
    rows: list[list[object]] = []
    for enc, stats in embedding_stats(emb).items():
        rows.extend(
            [
                enc,
                s.index,
                round(s.norm, 4),
                round(s.min, 4),
                round(s.max, 4),
                round(s.mean, 5),
                round(s.std, 5),
            ]
            for s in stats
        )
    return rows


def compare_rows(result: Comparison) -> list[list[object]]:
    rows: list[list[object]] = []
    for part in result.encoders:
        rows.extend(
            [part.encoder, i, round(c, 5), round(d, 6)]
            for i, (c, d) in enumerate(zip(part.cosine, part.mean_abs_diff))
        )
        rows.append([part.encoder, "all", "", round(part.mean_abs_diff_all, 6)])
    rows.append(["overall", "", "", round(result.mean_abs_diff, 6)])
    return rows


class InspectHandlers:
    """Event handlers; plain functions of plain values so they can be tested without a browser."""

    def __init__(self, host: HostInfo) -> None:
        self.host = host

    def folder(self) -> str:
        return self.host.embeddings_dir()

    def choices(self) -> list[str]:
        return [e.relpath for e in library.list_files(self.folder())]

    def refresh(self, current: str | None, other: str | None) -> tuple[Any, Any, str]:
        choices = self.choices()
        keep = current if current in choices else (choices[0] if choices else None)
        keep_other = other if other in choices else None
        msg = f"{len(choices)} file(s) in `{self.folder()}`"
        return gr.update(choices=choices, value=keep), gr.update(choices=choices, value=keep_other), msg

    def _views(self, emb: Any, md: str) -> Described:
        norms = {k: [float(x) for x in v.float().norm(dim=1)] for k, v in emb.vectors.items()}
        return (
            md,
            stats_rows(emb),
            dict(emb.metadata),
            "",
            self._nearest(emb),
            bar_plot(norms, "norm of each vector"),
        )

    def _nearest(self, emb: Any) -> list[list[object]]:
        """Nearest vocabulary tokens on the loaded model's encoders (empty without a model)."""
        if self.host.service is None:
            return []
        try:
            return nearest_rows(self.host.service().nearest(emb, 5))
        except Exception as e:  # no model loaded, another model type: the rest of the view still works
            logger.info("nearest tokens unavailable: %s", e)
            return []

    def describe(self, relpath: str | None) -> Described:
        if not relpath:
            return "", [], {}, "Choose an embedding.", [], ""
        try:
            emb = read_embedding(library.resolve(self.folder(), relpath))
        except TIError as e:
            return "", [], {}, _error(e), [], ""
        status = self.host.embedding_status()
        return self._views(emb, summary_markdown(emb, relpath, status))

    def describe_upload(self, upload: Any) -> Described:
        path = uploaded_path(upload)
        if not path:
            return "", [], {}, "", [], ""
        try:
            emb = read_embedding(path)
        except TIError as e:
            return "", [], {}, _error(e), [], ""
        return self._views(emb, summary_markdown(emb, "(uploaded)", {}))

    def remake(
        self, relpath: str | None, fmt: str, overwrite: bool
    ) -> tuple[Any, Any, list[list[object]], str]:
        """Re-make the chosen embedding for the loaded checkpoint; its table of differences."""
        if not relpath or self.host.service is None:
            return gr.update(), gr.update(), [], "Choose an embedding made from text or by Merge."
        name = library.Path(relpath).stem
        try:
            done = self.host.service().remake(
                name, overwrite=bool(overwrite), fmt=fmt if fmt != "png" else None
            )
        except (TIError, FileExistsError) as e:
            return gr.update(), gr.update(), [], _error(e)
        rows = compare_rows(Comparison.from_dict(done["delta"])) if done["delta"] else []
        choices = self.choices()
        rel = library.Path(done["file"]).relative_to(library.Path(self.folder()).resolve()).as_posix()
        note = [
            f"Re-made from its {done['recipe']} recipe as `{done['name']}` (`{rel}`): A = {name}, B = the re-made one."
        ]
        note += [f"⚠ {html.escape(w)}" for w in done["warnings"]]
        return gr.update(choices=choices), gr.update(choices=choices), rows, "\n\n".join(note)

    # ------------------------------------------------------------------ embeddings inside LoRA files
    def lora_files(self) -> list[str]:
        try:
            return self.host.service().lora_files() if self.host.service is not None else []
        except Exception as e:  # the rest of the view works without them
            logger.warning("LoRA files cannot be listed: %s", e)
            return []

    def refresh_loras(self) -> Any:
        return gr.update(choices=self.lora_files())

    def bundles(self, file: str | None) -> tuple[list[list[object]], str]:
        """The embeddings a LoRA file holds (from its header), and the host's note about them."""
        if not file or self.host.service is None:
            return [], "Choose a LoRA file."
        try:
            found = self.host.service().bundles(file)
        except TIError as e:
            return [], _error(e)
        rows: list[list[object]] = [
            [b["name"], b["kind"], b["vectors"], b["producer"], b["problem"] or b["name_problem"] or ""]
            for b in found["embeddings"]
        ]
        note = f"{len(rows)} embedding(s) in `{html.escape(file)}`."
        if found["note"]:
            note += f" {found['note']}"
        return rows, note

    def extract(
        self, file: str | None, names: str, new_name: str, fmt: str, overwrite: bool
    ) -> tuple[Any, Any, str]:
        """Write the bundled embeddings (all, or the names given) into the embeddings folder."""
        if not file or self.host.service is None:
            return gr.update(), gr.update(), "Choose a LoRA file."
        chosen = [n.strip() for n in (names or "").split(",") if n.strip()] or None
        rename = None
        if (new_name or "").strip():
            if not chosen or len(chosen) != 1:
                return (
                    gr.update(),
                    gr.update(),
                    _error(TIError("a new name is for one embedding: name it in 'Embeddings'")),
                )
            rename = {chosen[0]: new_name.strip()}
        try:
            paths = self.host.service().extract(
                file, chosen, rename=rename, overwrite=bool(overwrite), fmt=fmt if fmt != "png" else None
            )
        except (TIError, FileExistsError) as e:
            return gr.update(), gr.update(), _error(e)
        choices = self.choices()
        made = ", ".join(f"`{p.stem}`" for p in paths)
        return (
            gr.update(choices=choices),
            gr.update(choices=choices),
            f"Extracted {made}: usable in prompts by name.",
        )

    def compare(self, a: str | None, b: str | None) -> tuple[list[list[object]], str]:
        if not a or not b:
            return [], "Choose two embeddings to compare."
        try:
            result = library.compare_files(self.folder(), a, b)
            rows = compare_rows(result)
        except TIError as e:
            return [], _error(e)
        return rows, "; ".join(result.notes)

    def save_as(
        self, source: str | None, other: str | None, name: str, fmt: str, target_label: str, overwrite: bool
    ) -> tuple[Any, Any, str]:
        if fmt == "png" and not self.host.extra.get("image_embeddings", True):
            return (
                gr.update(),
                gr.update(),
                _error(TIError(f"{self.host.name} cannot load embeddings stored in images")),
            )
        try:
            path = library.convert_and_save(
                self.folder(),
                source or "",
                (name or "").strip(),
                fmt,
                CONVERT_TARGETS.get(target_label, "same"),
                other,
                overwrite,
                tables=self.host.service().token_tables if self.host.service is not None else None,
            )
        except (TIError, FileExistsError) as e:
            return gr.update(), gr.update(), _error(e)
        try:
            self.host.reload_embeddings()
        except Exception as e:  # the file is written; a failed reload must not hide that
            logger.warning("reloading embeddings failed: %s", e)
            return gr.update(), gr.update(), f"Saved `{path.name}`, but the web UI could not reload: {e}"
        choices = self.choices()
        rel = path.relative_to(library.Path(self.folder()).resolve()).as_posix()
        return (
            gr.update(choices=choices, value=rel),
            gr.update(choices=choices),
            f"Saved `{rel}`; usable in prompts as `{path.stem}`.",
        )


def build(host: HostInfo) -> InspectHandlers:
    """Build the view inside the current gradio Blocks context; returns its handlers."""
    h = InspectHandlers(host)
    choices = h.choices()
    default_fmt = str(host.get_option("ti_save_format", "safetensors"))
    with gr.Row():
        file = gr.Dropdown(
            label="Embedding",
            choices=choices,
            value=choices[0] if choices else None,
            elem_id="ti_inspect_file",
        )
        refresh = gr.Button("🔄", elem_id="ti_inspect_refresh", elem_classes=["tool", "ti-tool"])
        upload = gr.File(label="…or inspect a file", elem_id="ti_inspect_upload", **file_upload_kwargs())
    status = gr.Markdown(f"{len(choices)} file(s) in `{h.folder()}`", elem_id="ti_inspect_status")
    summary = gr.Markdown(elem_id="ti_inspect_summary")
    table = gr.Dataframe(headers=STATS_HEADERS, interactive=False, elem_id="ti_inspect_table")
    norms = gr.HTML(elem_id="ti_inspect_norms")
    nearest = gr.Dataframe(headers=NEAREST_HEADERS, interactive=False, elem_id="ti_inspect_nearest")
    with gr.Accordion("Metadata", open=False):
        meta = gr.JSON(elem_id="ti_inspect_meta")
    with gr.Accordion("Compare with another embedding", open=False):
        other = gr.Dropdown(label="Second embedding", choices=choices, value=None, elem_id="ti_inspect_other")
        compare_btn = gr.Button("Compare", elem_id="ti_inspect_compare")
        compare_note = gr.Markdown(elem_id="ti_inspect_compare_note")
        compare_table = gr.Dataframe(
            headers=COMPARE_HEADERS, interactive=False, elem_id="ti_inspect_compare_table"
        )
    with gr.Accordion("Convert and save as", open=False):
        with gr.Row():
            new_name = gr.Textbox(label="New name", elem_id="ti_inspect_new_name")
            fmt = gr.Radio(
                ["safetensors", "pt", "png"]
                if host.extra.get("image_embeddings", True)
                else ["safetensors", "pt"],
                value=default_fmt if default_fmt in ("safetensors", "pt") else "safetensors",
                label="Format",
                elem_id="ti_inspect_format",
            )
        target = gr.Radio(
            list(CONVERT_TARGETS), value="same kind", label="Convert to", elem_id="ti_inspect_target"
        )
        overwrite = gr.Checkbox(False, label="Overwrite an existing file", elem_id="ti_inspect_overwrite")
        save = gr.Button("Save", variant="primary", elem_id="ti_inspect_save")
        save_note = gr.Markdown(elem_id="ti_inspect_save_note")
    with gr.Accordion("Embeddings inside a LoRA file", open=False, elem_id="ti_bundles"):
        with gr.Row():
            # listed on 🔄 only: reading every LoRA header at each start would slow the web UI down
            lora = gr.Dropdown(label="LoRA file (🔄 lists those in the LoRA folder that hold embeddings)",
                               choices=[], elem_id="ti_bundles_file")  # fmt: skip
            lora_refresh = gr.Button("🔄", elem_id="ti_bundles_refresh", elem_classes=["tool", "ti-tool"])
        bundle_note = gr.Markdown(elem_id="ti_bundles_note")
        bundle_table = gr.Dataframe(
            headers=["name", "kind", "vectors", "written by", "problem"], interactive=False,
            elem_id="ti_bundles_table",
        )  # fmt: skip
        with gr.Row():
            bundle_names = gr.Textbox(
                label="Embeddings (comma-separated; empty: all)", elem_id="ti_bundles_names"
            )
            bundle_new = gr.Textbox(label="New name (one embedding)", elem_id="ti_bundles_new_name")
        extract_btn = gr.Button("Extract into the embeddings folder", elem_id="ti_bundles_extract")
        extract_note = gr.Markdown(elem_id="ti_bundles_extract_note")
    with gr.Accordion("Re-make for the loaded checkpoint", open=False, elem_id="ti_remake"):
        gr.Markdown(
            "An embedding made from text (Create) or by Merge is evaluated again on the loaded checkpoint's "
            "token tables and saved as `<name>-<checkpoint>`; the table shows how far each vector moved. "
            "A trained embedding has no recipe: use the comparison grid below to see it on each checkpoint.",
            elem_id="ti_remake_help",
        )
        remake_btn = gr.Button("Re-make for this checkpoint", elem_id="ti_remake_start")
        remake_note = gr.Markdown(elem_id="ti_remake_note")
        remake_table = gr.Dataframe(headers=COMPARE_HEADERS, interactive=False, elem_id="ti_remake_table")
    with gr.Accordion("Comparison grid: embeddings × checkpoints", open=False, elem_id="ti_grid"):
        grid_view.build(host)

    outputs = [summary, table, meta, status, nearest, norms]
    file.change(h.describe, inputs=[file], outputs=outputs)
    upload.change(h.describe_upload, inputs=[upload], outputs=outputs)
    refresh.click(h.refresh, inputs=[file, other], outputs=[file, other, status])
    compare_btn.click(h.compare, inputs=[file, other], outputs=[compare_table, compare_note])
    save.click(
        h.save_as, inputs=[file, other, new_name, fmt, target, overwrite], outputs=[file, other, save_note]
    ).then(fn=None, **js_kwargs("tiRefreshCards"))
    lora.change(h.bundles, inputs=[lora], outputs=[bundle_table, bundle_note])
    lora_refresh.click(h.refresh_loras, outputs=[lora])
    extract_btn.click(
        h.extract,
        inputs=[lora, bundle_names, bundle_new, fmt, overwrite],
        outputs=[file, other, extract_note],
    ).then(fn=None, **js_kwargs("tiRefreshCards"))
    remake_btn.click(
        h.remake, inputs=[file, fmt, overwrite], outputs=[file, other, remake_table, remake_note]
    ).then(fn=None, **js_kwargs("tiRefreshCards"))
    return h
