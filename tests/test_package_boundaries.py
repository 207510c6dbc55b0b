"""lib_ti is a pure package: no gradio or host imports in the core, host code only in lib_ti/host, UI code
only in lib_ti/ui, no import cycles; the entry script only composes them."""

from __future__ import annotations

import ast
import subprocess
import sys
import types

import pytest

from .conftest import ROOT


def _import_in_subprocess(modules: list[str]) -> str:
    """Import ``modules`` in a fresh interpreter; returns the gradio, fastapi, web UI and lib_ti.ui modules
    that came along."""
    code = (
        "import sys\n"
        f"for m in {modules!r}: __import__(m)\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('gradio', 'modules', 'fastapi')"
        " or m.startswith('lib_ti.ui'))\n"
        "print(','.join(bad))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


def test_core_imports_neither_gradio_nor_host():
    core = sorted(m for m in _graph(True) if not _under(m, "lib_ti.host", "lib_ti.ui", "lib_ti.__main__"))
    assert "lib_ti.service" in core and "lib_ti.hostinfo" in core
    assert _import_in_subprocess(core) == ""


def test_host_modules_import_without_the_web_ui():
    """Importing any adapter (detection imports them all) touches neither the host nor gradio."""
    host = sorted(m for m in _graph(True) if _under(m, "lib_ti.host"))
    assert "lib_ti.host.detect" in host
    assert _import_in_subprocess(host) == ""


HOST_PACKAGES = ("modules", "modules_forge", "backend", "launch", "ldm", "sgm", "ldm_patched", "k_diffusion")


def _module_name(path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _import_nodes(tree: ast.AST, type_checking: bool = False):
    """``(node, under TYPE_CHECKING)`` for every import statement, at any depth (functions included)."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node, type_checking
        elif isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.body:
                yield from _import_nodes(ast.Module(body=[child], type_ignores=[]), True)
            for child in node.orelse:
                yield from _import_nodes(ast.Module(body=[child], type_ignores=[]), type_checking)
        else:
            yield from _import_nodes(node, type_checking)
        if isinstance(node, ast.Call):  # importlib.import_module("lib_ti.x") / __import__("x")
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if name in ("import_module", "__import__") and node.args:
                arg = node.args[0]
                if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                    yield ast.Import(names=[ast.alias(name=arg.value)]), type_checking


def _resolve(module: str, is_package: bool, node: ast.Import | ast.ImportFrom, known: set[str]) -> list[str]:
    """The modules an import statement names (``from a import b`` names ``a.b`` when that is a module)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    base = node.module or ""
    if node.level:
        package = module.split(".") if is_package else module.split(".")[:-1]
        package = package[: len(package) - (node.level - 1)]
        base = ".".join([*package, *([base] if base else [])])
    out = []
    for a in node.names:
        sub = f"{base}.{a.name}"
        out.append(sub if sub in known else base)
    return out


def _graph(include_type_checking: bool) -> dict[str, set[str]]:
    """Every module of lib_ti -> every module it imports (lib_ti's and third parties')."""
    paths = {_module_name(p): p for p in (ROOT / "lib_ti").rglob("*.py")}
    known = set(paths)
    graph: dict[str, set[str]] = {}
    for module, path in paths.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        targets: set[str] = set()
        for node, under_tc in _import_nodes(tree):
            if under_tc and not include_type_checking:
                continue
            targets.update(_resolve(module, path.name == "__init__.py", node, known))
        graph[module] = targets - {module}
    return graph


def _under(name: str, *packages: str) -> bool:
    return any(name == p or name.startswith(p + ".") for p in packages)


def test_import_direction():
    """core -> nothing of host, ui, gradio, fastapi or the web UI; host -> core only (+ the web UI);
    ui -> core only (+ gradio, fastapi). Every import counts: inside functions and TYPE_CHECKING too."""
    offenders = []
    for module, targets in sorted(_graph(include_type_checking=True).items()):
        if _under(module, "lib_ti.host"):
            banned = ("lib_ti.ui", "gradio", "fastapi", "starlette")
        elif _under(module, "lib_ti.ui"):
            banned = ("lib_ti.host", *HOST_PACKAGES)
        else:
            banned = ("lib_ti.host", "lib_ti.ui", "gradio", "fastapi", "starlette", *HOST_PACKAGES)
        offenders += [f"{module} imports {t}" for t in sorted(targets) if _under(t, *banned)]
    assert offenders == [], "\n".join(offenders)


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path ``[a, b, ..., a]``, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in graph:
                continue
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def _all_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected group, found by removing each found edge and searching again."""
    graph = {k: set(v) for k, v in graph.items()}
    cycles = []
    while (cycle := _find_cycle(graph)) is not None and len(cycles) < 20:
        cycles.append(cycle)
        graph[cycle[-2]].discard(cycle[-1])
    return cycles


def test_no_import_cycles():
    """No cycle among lib_ti's modules, counting imports inside functions (they run when called).
    Imports under ``if TYPE_CHECKING:`` never run and are left out."""
    cycles = _all_cycles(_graph(include_type_checking=False))
    assert cycles == [], "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_cycle_finder_reports_the_path():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "x"}, "d": {"a"}}
    assert _find_cycle(graph) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b"}, "b": set()}) is None


def test_graph_sees_function_level_and_type_checking_imports():
    graph = _graph(include_type_checking=True)
    assert "lib_ti.service" in graph["lib_ti.host.adapter"]
    assert "modules" in graph["lib_ti.host.webui"]  # imported inside functions only
    assert "lib_ti.parts" in graph["lib_ti.hostinfo"]  # under TYPE_CHECKING
    assert "lib_ti.parts" not in _graph(include_type_checking=False)["lib_ti.hostinfo"]


def test_no_eval_or_exec():
    for path in [*ROOT.joinpath("lib_ti").rglob("*.py"), *ROOT.joinpath("scripts").glob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
                assert node.func.id not in ("eval", "exec"), path


def _fake_modules(monkeypatch, tmp_path, registered: dict, options: dict) -> None:
    """A stand-in ``modules`` whose on_* accept no ``name=`` (Forge Classic's API)."""

    def on(kind):
        def register(callback):  # positional only, like Forge Classic
            registered[kind] = callback

        return register

    class OptionInfo:
        def __init__(self, default, label, component, component_args=None, section=None):
            self.default, self.label, self.section = default, label, section
            self.component, self.component_args, self.comment = component, component_args, ""

        def info(self, text):
            self.comment = text
            return self

    names = (
        "modules",
        "modules.script_callbacks",
        "modules.shared",
        "modules.sd_hijack",
        "modules.sd_models",
        "modules.processing",
        "modules.scripts",
    )
    fake = {name: types.ModuleType(name) for name in names}
    fake["modules.scripts"].Script = type("Script", (), {})
    fake["modules.scripts"].AlwaysVisible = object()
    fake["modules.processing"].StableDiffusionProcessing = type(
        "StableDiffusionProcessing", (), {"get_conds_with_caching": lambda self, *a: None}
    )
    for kind in (
        "ui_tabs",
        "ui_settings",
        "app_started",
        "model_loaded",
        "infotext_pasted",
        "before_token_counter",
    ):
        setattr(fake["modules.script_callbacks"], f"on_{kind}", on(kind))
    shared = fake["modules.shared"]
    shared.cmd_opts = types.SimpleNamespace(embeddings_dir=str(tmp_path), api_auth="me:secret")
    shared.opts = types.SimpleNamespace(add_option=options.__setitem__)
    shared.OptionInfo = OptionInfo
    shared.data_path = str(tmp_path)
    fake["modules.sd_hijack"].model_hijack = types.SimpleNamespace(
        embedding_db=types.SimpleNamespace(word_embeddings={}, skipped_embeddings={})
    )
    fake["modules.sd_models"].model_data = types.SimpleNamespace(sd_model=None)
    for k, v in fake.items():
        monkeypatch.setitem(sys.modules, k, v)
        if "." in k:
            setattr(fake["modules"], k.split(".")[1], v)


@pytest.mark.parametrize("forge_package", [False, True])
def test_entry_script_registers_positionally(monkeypatch, tmp_path, forge_package):
    """The entry script against a stand-in ``modules``: tab, settings, routes once per app (with the
    host's --api-auth), check routes only with LIB_TI_HOST_CHECKS=1. With ``modules_forge`` present
    too, the host is Forge Classic (the A1111 adapter, training refused)."""
    pytest.importorskip("gradio")
    fastapi = pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from lib_ti.host import adapter, detect
    from lib_ti.settings import SETTINGS

    if forge_package:
        monkeypatch.setattr(detect, "_exists", lambda name: name == "modules_forge")
    monkeypatch.setattr(adapter, "_SERVICE", {})
    monkeypatch.setenv("LIB_TI_HOST_CHECKS", "1")
    registered: dict = {}
    options: dict = {}
    _fake_modules(monkeypatch, tmp_path, registered, options)
    import runpy

    script = runpy.run_path(str(ROOT / "scripts" / "ti_tab.py"))
    host = script["ADAPTER"]
    assert isinstance(host, adapter.HostAdapter)
    assert host.name == ("classic" if forge_package else "a1111")
    assert set(registered) == {"ui_tabs", "ui_settings", "app_started", "model_loaded", "infotext_pasted",
                               "before_token_counter"}  # fmt: skip
    hooked = sys.modules["modules.processing"].StableDiffusionProcessing.get_conds_with_caching
    assert hasattr(hooked, "_lib_ti_inline_original")  # prompt expressions
    always_on = script["InlineExpressions"]()  # carries {'…'} through sd-dynamic-prompts
    assert always_on.show(False) is sys.modules["modules.scripts"].AlwaysVisible
    [(blocks, title, elem_id)] = registered["ui_tabs"]()
    assert (title, elem_id) == ("Textual Inversion", "ti_tab")

    registered["ui_settings"]()
    assert list(options) == [s.key for s in SETTINGS]
    fmt = options["ti_save_format"]
    assert fmt.component.__name__ == "Radio" and fmt.component_args == {"choices": ["safetensors", "pt"]}
    assert fmt.section == ("ti", "Textual Inversion") and fmt.comment

    app = fastapi.FastAPI()
    registered["app_started"](None, app)
    registered["app_started"](None, app)  # Reload UI: same app, routes stay single
    paths = [r.path for r in app.routes]
    assert paths.count("/ti/v1/embeddings") == 1
    assert {"/ti/v1/_checks/parity", "/ti/v1/_checks/gradient", "/ti/v1/_checks/inline_cost"} <= set(paths)
    client = TestClient(app)
    assert client.get("/ti/v1/embeddings").status_code == 401
    assert client.get("/ti/v1/embeddings", auth=("me", "secret")).status_code == 200
    service = adapter.get_service(host)
    assert service.host.training_blocked() is None  # every host trains (Classic through ldm_patched's parts)
    if forge_package:
        assert "/ti/v1/_checks/unet" in paths and "/ti/v1/_checks/vae" in paths


def test_entry_script_without_checks_registers_no_check_routes(monkeypatch, tmp_path):
    pytest.importorskip("gradio")
    fastapi = pytest.importorskip("fastapi")
    from lib_ti.host import adapter

    monkeypatch.setattr(adapter, "_SERVICE", {})
    monkeypatch.delenv("LIB_TI_HOST_CHECKS", raising=False)
    registered: dict = {}
    _fake_modules(monkeypatch, tmp_path, registered, {})
    import runpy

    runpy.run_path(str(ROOT / "scripts" / "ti_tab.py"))
    app = fastapi.FastAPI()
    registered["app_started"](None, app)
    paths = [r.path for r in app.routes]
    assert "/ti/v1/embeddings" in paths and not any("_checks" in p for p in paths)
