"""Start a real AUTOMATIC1111 web UI with this extension linked in, on the CPU, for tests/host.

Enable with ``SD_WEBUI_DIR`` (the web UI checkout) and optionally ``SD_WEBUI_PYTHON`` (its
interpreter; default ``<checkout>/../venv/bin/python``), ``SD_WEBUI_CKPT`` (checkpoint stem, default
``tiny-sd1``) and ``SD_WEBUI_PORT`` (default 7861); tests/host/README.md says what the host needs.
The host is started on the CPU with a fresh ``--embeddings-dir``, and stopped at the end.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

from ..conftest import ROOT

LINK_NAME = "sd-webui-ti"
#: the flags that run the hosts on the CPU
A1111_FLAGS = ("--skip-torch-cuda-test", "--no-half", "--precision", "full", "--use-cpu", "all")
FORGE_FLAGS = ("--always-cpu", "--skip-torch-cuda-test", "--disable-gpu-warning")
#: Forge Neo: Forge's, and no bitsandbytes install at every start
NEO_FLAGS = (*FORGE_FLAGS, "--disable-bnb")
#: Forge Classic and reForge (no --disable-gpu-warning there)
CLASSIC_FLAGS = ("--always-cpu", "--skip-torch-cuda-test")
#: reForge clones Stability's repository at start; its pinned fork is not what the test host mirrors
REFORGE_ENV = {
    "STABLE_DIFFUSION_REPO": "https://github.com/Stability-AI/stablediffusion.git",
    "STABLE_DIFFUSION_COMMIT_HASH": "cf1d67a6fd5ea1aa600c4df58e5b47da45f6bdbf",
}


@dataclass
class Host:
    base: str
    webui: Path
    embeddings: Path
    log: Path

    def get(self, path: str, timeout: float = 120) -> object:
        with urllib.request.urlopen(self.base + path, timeout=timeout) as r:
            return json.loads(r.read())

    def post(self, path: str, body: object, timeout: float = 600) -> object:
        req = urllib.request.Request(
            self.base + path, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(req, timeout=timeout) as r:
            raw = r.read()
            return json.loads(raw) if raw else None

    def config(self) -> dict:
        return self.get("/config")  # type: ignore[return-value]

    def component(self, elem_id: str) -> dict:
        return next(c for c in self.config()["components"] if c.get("props", {}).get("elem_id") == elem_id)

    def call(self, fn_name_inputs: list[str], data: list, outputs_first: str | None = None) -> list:
        """Call a UI event the way the browser does: find it by the elem_ids of its inputs."""
        cfg = self.config()
        ids = {c["id"]: c.get("props", {}).get("elem_id") for c in cfg["components"]}
        for i, dep in enumerate(cfg["dependencies"]):
            if [ids.get(x) for x in dep["inputs"]] == fn_name_inputs and (
                outputs_first is None or (dep["outputs"] and ids.get(dep["outputs"][0]) == outputs_first)
            ):
                out = self.post("/run/predict", {"fn_index": i, "data": data, "session_hash": "ti-host-test"})
                return out["data"]  # type: ignore[index]
        msg = f"no event with inputs {fn_name_inputs}"
        raise LookupError(msg)


def _env(webui: Path) -> dict[str, str]:
    host_root = webui.parent
    env = dict(os.environ)
    env.update(
        HF_HOME=str(host_root / "hf_home"),
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        HF_HUB_DISABLE_TELEMETRY="1",
        GRADIO_ANALYTICS_ENABLED="False",
        DO_NOT_TRACK="1",
        CLIP_PACKAGE="clip-anytorch==2.6.0",
        PYTHONUNBUFFERED="1",
        LIB_TI_HOST_CHECKS="1",
    )
    reqs = host_root / "requirements_host.txt"
    if reqs.exists():
        env["REQS_FILE"] = str(reqs)
    for k in ("VIRTUAL_ENV", "PYTHONPATH"):
        env.pop(k, None)
    return env


def checkout(dir_var: str, python_var: str, what: str) -> tuple[Path, Path]:
    """The host checkout named by ``dir_var`` and its interpreter (``python_var``, default
    ``<checkout>/../venv/bin/python``), or a skip that says how to enable the tests."""
    webui = os.environ.get(dir_var)
    if not webui:
        pytest.skip(f"{what} tests: set {dir_var} to a checkout (see tests/host/README.md)")
    webui_p = Path(webui).expanduser().resolve()
    python = Path(os.environ.get(python_var, webui_p.parent / "venv" / "bin" / "python")).expanduser()
    if not python.exists():
        pytest.skip(f"{what} tests: interpreter {python} not found (set {python_var})")
    return webui_p, python


@pytest.fixture(scope="session")
def host_paths(tmp_path_factory):
    webui_p, python = checkout("SD_WEBUI_DIR", "SD_WEBUI_PYTHON", "AUTOMATIC1111 host")
    return webui_p, python, tmp_path_factory.mktemp("embeddings")


@contextlib.contextmanager
def running_host(
    webui: Path,
    python: Path,
    embeddings: Path | None,
    log: Path,
    port: int,
    extra: list[str],
    *,
    link: bool = True,
    restart_loop: bool = False,
    ready: str = "/ti/v1/embeddings",
    flags: tuple[str, ...] = A1111_FLAGS,
    ckpt: str | None = None,
    ckpt_flags: bool = True,
    env_extra: dict[str, str] | None = None,
    started_line: str | None = None,
):
    """Start the web UI like ``launch.sh`` does, wait for its checkpoint, stop it afterwards.

    ``embeddings``: the ``--embeddings-dir`` (None: the host's default folder).
    ``link``: link this checkout into ``extensions/`` first. ``restart_loop``: run it in webui.sh's
    loop, so that "Apply and restart UI" (which writes ``tmp/restart`` and exits) starts it again.
    ``ready``: the path that answers once the host is up (ours by default: added last).
    ``started_line``: a log line to wait for before the first request (reForge breaks when a request
    arrives before its API is added: "Cannot add middleware after an application has started").
    ``flags``: the host's CPU flags; ``ckpt``: the start-up checkpoint's stem (``ckpt_flags=False``:
    the host has no ``--ckpt``, as Forge Neo; it loads the one its settings name on first use).
    """
    if link:
        link_path = webui / "extensions" / LINK_NAME
        if link_path.is_symlink() or not link_path.exists():
            if link_path.is_symlink():
                link_path.unlink()
            link_path.symlink_to(ROOT, target_is_directory=True)
    ckpt_path = (
        webui
        / "models"
        / "Stable-diffusion"
        / f"{ckpt or os.environ.get('SD_WEBUI_CKPT', 'tiny-sd1')}.safetensors"
    )
    start = ["--no-download-sd-model", "--ckpt", str(ckpt_path)] if ckpt_flags else []
    folder = ["--embeddings-dir", str(embeddings)] if embeddings is not None else []
    args = [str(python), "launch.py", *flags, "--api", "--port", str(port), *start, *folder, *extra]
    env = {**_env(webui), **(env_extra or {})}
    if restart_loop:
        env["SD_WEBUI_RESTART"] = "tmp/restart"
        (webui / "tmp" / "restart").unlink(missing_ok=True)
        loop = 'while :; do "$0" "$@"; [[ -f tmp/restart ]] || break; rm -f tmp/restart; done'
        args = ["bash", "-c", loop, *args]
    with open(log, "wb") as logf:
        proc = subprocess.Popen(args, cwd=webui, env=env, stdout=logf, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
    host = Host(f"http://127.0.0.1:{port}", webui, embeddings, log)
    try:
        deadline = time.time() + 600
        while True:
            if proc.poll() is not None:
                pytest.fail(
                    f"web UI exited with {proc.returncode}:\n{log.read_text(errors='replace')[-4000:]}"
                )
            if started_line and started_line not in log.read_text(errors="replace"):
                if time.time() > deadline:
                    pytest.fail(f"web UI did not print {started_line!r} in 600 s")
                time.sleep(1)
                continue
            try:
                # our routes are added by on_app_started, after the host's own API
                urllib.request.urlopen(host.base + ready, timeout=5).close()
                break
            except urllib.error.HTTPError as e:
                if e.code != 404:  # 401 with --api-auth: up
                    break
                time.sleep(1)
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                if time.time() > deadline:
                    pytest.fail("web UI did not start in 600 s")
                time.sleep(1)
        yield host, proc
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=20)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            with contextlib.suppress(ProcessLookupError):  # a test may have killed it already
                os.killpg(proc.pid, signal.SIGKILL)
        print(f"\n[host log: {log}]")


@pytest.fixture(scope="session")
def a1111(host_paths, tmp_path_factory):
    webui, python, embeddings = host_paths
    from .seed import seed_embeddings

    seed_embeddings(embeddings)
    port = int(os.environ.get("SD_WEBUI_PORT", "7861"))
    log = tmp_path_factory.mktemp("host") / "webui.log"
    # a request before the API is added stops A1111 too ("Cannot add middleware after an application has
    # started"): wait for its start-up line
    with running_host(webui, python, embeddings, log, port, [], started_line="Startup time") as (host, _proc):
        host.get("/sdapi/v1/sd-models", timeout=60)
        host.post("/sdapi/v1/reload-checkpoint", {})  # waits for the start-up checkpoint load
        yield host


@pytest.fixture(scope="session")
def forge(tmp_path_factory):
    """A real Forge (SD_FORGE_DIR) on the CPU with this extension linked in, on port SD_FORGE_PORT (7871)."""
    webui_p, python = checkout("SD_FORGE_DIR", "SD_FORGE_PYTHON", "Forge host")
    embeddings = tmp_path_factory.mktemp("forge-embeddings")
    port = int(os.environ.get("SD_FORGE_PORT", "7871"))
    log = tmp_path_factory.mktemp("forge") / "webui.log"
    ckpt = os.environ.get("SD_FORGE_CKPT", "rand-sd15")
    with running_host(webui_p, python, embeddings, log, port, [], flags=FORGE_FLAGS, ckpt=ckpt) as (
        host,
        _proc,
    ):
        yield host


@pytest.fixture(scope="session")
def neo(tmp_path_factory):
    """A real Forge Neo (SD_NEO_DIR) on the CPU with this extension linked in, on port SD_NEO_PORT (7891),
    switched to SD_NEO_CKPT (``rand-sd15``) at start (Neo has no ``--ckpt``)."""
    webui_p, python = checkout("SD_NEO_DIR", "SD_NEO_PYTHON", "Forge Neo host")
    start_on(webui_p, os.environ.get("SD_NEO_CKPT", "rand-sd15"))
    embeddings = tmp_path_factory.mktemp("neo-embeddings")
    port = int(os.environ.get("SD_NEO_PORT", "7891"))
    log = tmp_path_factory.mktemp("neo") / "webui.log"
    with running_host(
        webui_p,
        python,
        embeddings,
        log,
        port,
        [],
        flags=NEO_FLAGS,
        ckpt_flags=False,
        started_line="Startup time:",
    ) as (
        host,
        _proc,
    ):
        # Neo has no --ckpt and starts on the checkpoint its settings saved last: the SD1.5 one
        host.post("/sdapi/v1/options", {"sd_model_checkpoint": os.environ.get("SD_NEO_CKPT", "rand-sd15")})
        yield host


def start_on(webui: Path, checkpoint: str) -> None:
    """Make a host without ``--ckpt`` (Neo) start on ``checkpoint``: its UI's checkpoint box takes the
    start-up checkpoint, and a page opened later selects that one again. Without a saved choice Neo
    starts on the first file by name (``rand-sd15-b`` before ``rand-sd15``)."""
    config = webui / "config.json"
    try:
        data = json.loads(config.read_text()) if config.exists() else {}
    except (OSError, json.JSONDecodeError):
        data = {}
    if data.get("sd_model_checkpoint") != f"{checkpoint}.safetensors":
        data["sd_model_checkpoint"] = f"{checkpoint}.safetensors"
        config.write_text(json.dumps(data, indent=4))


def _fork(tmp_path_factory, name: str, what: str, port: int, **kwargs):
    key = name.upper()
    webui_p, python = checkout(f"SD_{key}_DIR", f"SD_{key}_PYTHON", what)
    embeddings = tmp_path_factory.mktemp(f"{name}-embeddings")
    port = int(os.environ.get(f"SD_{key}_PORT", str(port)))
    log = tmp_path_factory.mktemp(name) / "webui.log"
    ckpt = os.environ.get(f"SD_{key}_CKPT", "rand-sd15")
    return running_host(webui_p, python, embeddings, log, port, [], flags=CLASSIC_FLAGS, ckpt=ckpt,
                        started_line="Startup time:", **kwargs)  # fmt: skip


@pytest.fixture(scope="session")
def classic(tmp_path_factory):
    """A real Forge Classic (SD_CLASSIC_DIR) on the CPU, port SD_CLASSIC_PORT (7893), checkpoint rand-sd15."""
    with _fork(tmp_path_factory, "classic", "Forge Classic host", 7893) as (host, _proc):
        yield host


@pytest.fixture(scope="session")
def reforge(tmp_path_factory):
    """A real reForge (SD_REFORGE_DIR) on the CPU, port SD_REFORGE_PORT (7895), checkpoint rand-sd15."""
    with _fork(tmp_path_factory, "reforge", "reForge host", 7895, env_extra=REFORGE_ENV) as (host, _proc):
        yield host


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """Four 64x64 images of plain colours (file-name captions)."""
    from PIL import Image

    d = tmp_path_factory.mktemp("host-data")
    for i, c in enumerate([(200, 60, 60), (60, 200, 60), (60, 60, 200), (200, 200, 60)]):
        Image.new("RGB", (64, 64), c).save(d / f"{i}-sample.png")
    return d
