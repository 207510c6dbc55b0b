"""The extension's top-level tab: Create, Merge, Prepare, Train and Inspect."""

from __future__ import annotations

import gradio as gr

from lib_ti.hostinfo import HostInfo
from lib_ti.ui import create_view, inspect_view, merge_view, prepare_view, train_view

TAB_TITLE = "Textual Inversion"
TAB_ID = "ti_tab"


def build_tab(host: HostInfo) -> gr.Blocks:
    with gr.Blocks(analytics_enabled=False) as blocks, gr.Tabs(elem_id="ti_tabs"):
        with gr.Tab("Create", elem_id="ti_tab_create"):
            create_view.build(host)
        with gr.Tab("Merge", elem_id="ti_tab_merge"):
            merge_view.build(host)
        with gr.Tab("Prepare", elem_id="ti_tab_prepare"):
            prepare = gr.Column()
        with gr.Tab("Train", elem_id="ti_tab_train") as train_tab:
            train = train_view.build(host, shown=train_tab)
        with prepare:  # built after Train: its "Use this folder for training" fills Train's folder box
            prepare_view.build(host, train_dataset=train.components["dataset_dir"])
        with gr.Tab("Inspect", elem_id="ti_tab_inspect"):
            inspect_view.build(host)
    return blocks


def on_ui_tabs(host: HostInfo) -> list[tuple[gr.Blocks, str, str]]:
    """What ``script_callbacks.on_ui_tabs`` callbacks return: ``[(blocks, title, elem_id)]``."""
    return [(build_tab(host), TAB_TITLE, TAB_ID)]
