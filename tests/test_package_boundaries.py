"""lib_ti is a pure package: no gradio or host imports in the core, host code only in lib_ti/host."""

from __future__ import annotations

import ast
import subprocess
import sys
import types

import pytest

from .conftest import ROOT

CORE_MODULES = [
    "lib_ti",
    "lib_ti.service",
    "lib_ti.training.jobs",
    "lib_ti.training.trainer",
    "lib_ti.training.data",
    "lib_ti.merge",
    "lib_ti.text.encoders",
    "lib_ti.create",
    "lib_ti.io.formats",
    "lib_ti.cli",
    "lib_ti.stats",
    "lib_ti.io.library",
    "lib_ti.io.convert",
    "lib_ti.io.image_data",
    "lib_ti.io.safe_pickle",
    "lib_ti.names",
    "lib_ti.settings",
    "lib_ti.hostinfo",
]


def test_core_imports_neither_gradio_nor_host():
    code = (
        "import sys\n"
        f"for m in {CORE_MODULES!r}: __import__(m)\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('gradio', 'modules', 'fastapi'))\n"
        "print(','.join(bad))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == ""


def _imports(path):
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module


def test_host_imports_only_in_host_package():
    offenders = []
    for path in (ROOT / "lib_ti").rglob("*.py"):
        rel = path.relative_to(ROOT).as_posix()
        if rel.startswith("lib_ti/host/"):
            continue
        for name in _imports(path):
            top = name.split(".")[0]
            if top in ("modules", "modules_forge", "backend", "launch", "ldm", "sgm"):
                offenders.append((rel, name))
            if top == "gradio" and not rel.startswith("lib_ti/ui/"):
                offenders.append((rel, name))
    assert offenders == []


def test_no_eval_or_exec():
    for path in [*ROOT.joinpath("lib_ti").rglob("*.py"), *ROOT.joinpath("scripts").glob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
                assert node.func.id not in ("eval", "exec"), path


@pytest.mark.parametrize("forge_package", [False, True])
def test_entry_script_registers_positionally(monkeypatch, tmp_path, forge_package):
    """Thin-glue check with a stand-in ``modules`` whose on_* accept no ``name=`` (Forge Classic);
    with ``modules_forge`` present too, that is detected as Forge Classic (A1111-style adapter)."""
    pytest.importorskip("gradio")
    from lib_ti.host import detect

    if forge_package:
        monkeypatch.setattr(detect, "_exists", lambda name: name == "modules_forge")
    registered = {}

    def on(kind):
        def register(callback):  # positional only, like Forge Classic
            registered[kind] = callback

        return register

    fake = {
        "modules": types.ModuleType("modules"),
        "modules.script_callbacks": types.ModuleType("modules.script_callbacks"),
        "modules.shared": types.ModuleType("modules.shared"),
        "modules.sd_hijack": types.ModuleType("modules.sd_hijack"),
        "modules.sd_models": types.ModuleType("modules.sd_models"),
    }
    fake["modules.script_callbacks"].on_ui_tabs = on("ui_tabs")
    fake["modules.script_callbacks"].on_ui_settings = on("ui_settings")
    fake["modules.script_callbacks"].on_app_started = on("app_started")
    fake["modules.script_callbacks"].on_model_loaded = on("model_loaded")
    fake["modules.shared"].cmd_opts = types.SimpleNamespace(embeddings_dir=str(tmp_path))
    fake["modules.shared"].opts = types.SimpleNamespace()
    fake["modules.sd_hijack"].model_hijack = types.SimpleNamespace(
        embedding_db=types.SimpleNamespace(word_embeddings={}, skipped_embeddings={})
    )
    fake["modules.sd_models"].model_data = types.SimpleNamespace(sd_model=None)
    for k, v in fake.items():
        monkeypatch.setitem(sys.modules, k, v)
        if "." in k:
            setattr(fake["modules"], k.split(".")[1], v)
    monkeypatch.delitem(sys.modules, "lib_ti.host.a1111", raising=False)
    monkeypatch.delitem(sys.modules, "lib_ti.host.a1111_services", raising=False)
    monkeypatch.delitem(sys.modules, "lib_ti.host.a1111_model", raising=False)
    import runpy

    script = runpy.run_path(str(ROOT / "scripts" / "ti_tab.py"))
    assert script["_HOST"] == ("classic" if forge_package else "a1111")
    assert set(registered) == {"ui_tabs", "ui_settings", "app_started", "model_loaded"}
    [(blocks, title, elem_id)] = registered["ui_tabs"]()
    assert (title, elem_id) == ("Textual Inversion", "ti_tab")
    for name in ("lib_ti.host.a1111", "lib_ti.host.a1111_services", "lib_ti.host.a1111_model"):
        monkeypatch.delitem(sys.modules, name, raising=False)
