"""Install from URL: the Extensions tab clones this extension from a git URL; it works after a restart.

On AUTOMATIC1111 (SD_WEBUI_DIR) and Forge Neo (SD_NEO_DIR: the way its users install). Offline: the URL
is a ``file://`` bare repository made from this checkout's files (tracked and new, not ignored), so it
tests the working tree. Runs its own host on the host's port + 2 in webui.sh's restart loop, without
the development link in ``extensions/``; install.py must run clean under the host's Python.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from ..conftest import ROOT
from .conftest import LINK_NAME, NEO_FLAGS, checkout, running_host

pytestmark = pytest.mark.host

LABELS = ["Local directory name", "URL for extension's git repository", "Specific branch name"]


def _git(*args: str, cwd) -> str:
    env = dict(os.environ, GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@localhost", GIT_COMMITTER_NAME="t",
               GIT_COMMITTER_EMAIL="t@localhost")  # fmt: skip
    return subprocess.run(["git", *args], cwd=cwd, env=env, check=True, capture_output=True, text=True).stdout


def bare_repo_of_this_checkout(tmp_path):
    files = _git("ls-files", "-co", "--exclude-standard", "-z", cwd=ROOT).split("\0")
    work = tmp_path / "work"
    for rel in filter(None, files):
        src = ROOT / rel
        if src.is_file():
            (work / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, work / rel)
    _git("init", "-q", "-b", "main", cwd=work)
    _git("add", "-A", cwd=work)
    _git("commit", "-qm", "sd-webui-ti under test", cwd=work)
    bare = tmp_path / "sd-webui-ti.git"
    _git("clone", "-q", "--bare", str(work), str(bare), cwd=tmp_path)
    return bare


def gradio_call(host, pick, data, timeout=600):
    cfg = host.config()
    label = {c["id"]: c.get("props", {}).get("label") for c in cfg["components"]}
    fn = next(i for i, d in enumerate(cfg["dependencies"]) if pick(d, label))
    body = {"fn_index": fn, "data": data, "session_hash": "ti-install-test"}
    try:
        return host.post("/run/predict", body, timeout=timeout)["data"]
    except (OSError, ValueError) as e:  # "Apply and restart" ends the process before it answers
        return f"connection closed ({type(e).__name__})"


@pytest.fixture(params=["a1111", "neo"])
def install_host(request):
    """(checkout, python, the host's default embeddings folder, port, running_host keywords)."""
    if request.param == "a1111":
        webui, python, _ = request.getfixturevalue("host_paths")
        return webui, python, webui / "embeddings", int(os.environ.get("SD_WEBUI_PORT", "7861")) + 2, {}
    webui, python = checkout("SD_NEO_DIR", "SD_NEO_PYTHON", "Forge Neo host")
    kwargs = {"flags": NEO_FLAGS, "ckpt_flags": False, "started_line": "Startup time:"}
    return (
        webui,
        python,
        webui / "models" / "embeddings",
        int(os.environ.get("SD_NEO_PORT", "7891")) + 2,
        kwargs,
    )


def test_install_from_url_and_restart(install_host, tmp_path):
    """Started without --embeddings-dir: the extension uses the host's own folder (Neo: models/embeddings)."""
    webui, python, folder, port, kwargs = install_host
    link = webui / "extensions" / LINK_NAME
    installed = webui / "extensions" / LINK_NAME
    had_link = link.is_symlink()
    if had_link:
        link.unlink()
    elif installed.exists():
        pytest.skip(f"{installed} is a real folder; refusing to replace it")
    url = f"file://{bare_repo_of_this_checkout(tmp_path)}"
    log = tmp_path / "webui.log"
    made_files: list[Path] = []
    try:
        with running_host(webui, python, None, log, port, [], link=False, restart_loop=True,
                          ready="/sdapi/v1/sd-models", **kwargs) as (host, _proc):  # fmt: skip
            assert "Textual Inversion" not in str(host.get("/sdapi/v1/extensions"))
            t = time.time()
            out = gradio_call(
                host, lambda d, lab: [lab.get(x) for x in d["inputs"]] == LABELS, [LINK_NAME, url, ""]
            )
            print(f"install ({time.time() - t:.1f}s):", str(out)[-200:])
            assert "Installed into" in str(out), out
            assert (installed / "scripts" / "ti_tab.py").is_file() and not installed.is_symlink()
            out = gradio_call(host, lambda d, lab: d.get("js") == "extensions_apply", ["[]", "[]", "none"])
            print("apply and restart ->", out)
            t = time.time()
            time.sleep(3)
            while True:
                try:
                    listed = host.get("/ti/v1/embeddings", timeout=5)
                    break
                except OSError:
                    if time.time() - t > 600:
                        pytest.fail(
                            f"no /ti/v1 after the restart:\n{log.read_text(errors='replace')[-3000:]}"
                        )
                    time.sleep(1)
            print(f"back after {time.time() - t:.0f}s")
            assert listed["folder"] == str(folder)  # the host's default embeddings folder
            tabs = [
                c["props"].get("label") for c in host.config()["components"] if c.get("type") == "tabitem"
            ]
            assert "Textual Inversion" in tabs
            ext = [e for e in host.get("/sdapi/v1/extensions") if e["name"] == LINK_NAME]
            assert ext and ext[0]["enabled"], ext
            assert ext[0]["remote"] == url
            name = f"ti-url-{time.time_ns() % 10**6}"
            made_files.append(folder / f"{name}.safetensors")
            made_files.append(folder / f"{name}.json")
            made = host.post("/ti/v1/create", {"name": name, "init_text": "a red car", "vectors": 1})
            assert made["kind"] == "sd1"
            res = host.post("/sdapi/v1/txt2img", {"prompt": f"a photo of {name} {time.time_ns()}", "steps": 2,
                                                  "width": 64, "height": 64})  # fmt: skip
            assert name in res["info"], res["info"][-300:]
            log_text = log.read_text(errors="replace")
            assert log_text.count("Textual Inversion tab (lib_ti") == 1  # loaded once: after the restart
            assert "Error running install.py" not in log_text
            assert "[sd-webui-ti]" not in log_text  # install.py found everything it needs: it said nothing
    finally:
        for f in made_files:  # the host's own folder: leave it as it was
            f.unlink(missing_ok=True)
        if installed.exists() and not installed.is_symlink():
            shutil.rmtree(installed)
        if had_link or not link.exists():
            link.symlink_to(ROOT, target_is_directory=True)
        urllib.request.urlcleanup()
