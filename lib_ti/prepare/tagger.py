"""The WD tagger: SmilingWolf's WD v3 models (ONNX, run with onnxruntime) caption pictures with tags.

The model files are fetched from the model hub on first use into ``<models dir>/<owner>--<name>``, and
onnxruntime is installed into the web UI's Python on first use; both go through :class:`TaggerDeps`,
which tests replace. The model takes NHWC float32 BGR pixels in 0..255 (a white background under
transparency, padded to a white square, resized bicubic) and gives one probability per tag.
"""

from __future__ import annotations

import contextlib
import csv
import importlib
import importlib.metadata
import logging
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from lib_ti.prepare.errors import PrepareError, TaggerError
from lib_ti.training.images import to_8bit

logger = logging.getLogger(__name__)

WD_MODELS: tuple[str, ...] = (
    "SmilingWolf/wd-vit-tagger-v3",
    "SmilingWolf/wd-swinv2-tagger-v3",
    "SmilingWolf/wd-convnext-tagger-v3",
    "SmilingWolf/wd-vit-large-tagger-v3",
    "SmilingWolf/wd-eva02-large-tagger-v3",
)
DEFAULT_MODEL = "SmilingWolf/wd-vit-tagger-v3"
MODEL_FILES = ("model.onnx", "selected_tags.csv")
#: the categories of selected_tags.csv
RATING, GENERAL, CHARACTER = 9, 0, 4
#: tags that keep their underscores when underscores become spaces (the underscore is part of the face)
KAOMOJI = frozenset(
    {
        "0_0", "(o)_(o)", "+_+", "+_-", "._.", "<o>_<o>", "<|>_<|>", "=_=", ">_<", "3_3", "6_9", ">_o",
        "@_@", "^_^", "o_o", "u_u", "x_x", "|_|", "||_||",
    }
)  # fmt: skip
HUB_URL = "https://huggingface.co/{repo}/resolve/main/{file}"
#: execution providers in order of preference (the first ones onnxruntime offers are used)
PROVIDERS = ("CUDAExecutionProvider", "CPUExecutionProvider")
#: seconds a pip install of onnxruntime may take, and a download may wait for data
PIP_TIMEOUT, DOWNLOAD_TIMEOUT = 1800, 60
#: the oldest onnxruntime that runs the WD v3 models
MIN_RUNTIME = (1, 17)
_REPO_PART = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}")

Report = Callable[[str], None]


def _quiet(message: str) -> None:
    """A report that goes nowhere."""


def _reason(e: BaseException) -> str:
    """The first line of an exception's message (its type when empty), shortened."""
    lines = str(e).strip().splitlines()
    text = lines[0].strip() if lines else type(e).__name__
    return text if len(text) <= 300 else text[:297] + "…"


def _older_than(version: str, minimum: tuple[int, ...]) -> bool:
    """``version`` (such as ``1.16.3``) is older than ``minimum``; False when it cannot be read."""
    found = re.match(r"(\d+)\.(\d+)", version)
    return found is not None and (int(found[1]), int(found[2])) < minimum


@dataclass(frozen=True)
class Tag:
    """One row of selected_tags.csv."""

    name: str
    category: int


@dataclass
class TaggerArgs:
    """How the tagger runs and how its scores become a caption."""

    model: str = DEFAULT_MODEL
    general_threshold: float = 0.35
    character_threshold: float = 0.85
    #: comma-separated tags left out, matched after formatting, case-insensitive
    drop_tags: str = ""
    underscores_to_spaces: bool = True
    #: ``(`` -> ``\\(`` and ``)`` -> ``\\)``, as A1111 prompts need
    escape_brackets: bool = True
    #: at most this many tags (the highest-scoring; the rating tag is extra); 0 = all
    max_tags: int = 0
    #: add the most likely rating tag (general, sensitive, questionable, explicit) last
    include_rating: bool = False

    def __post_init__(self) -> None:
        for name in ("general_threshold", "character_threshold"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                msg = f"{name.replace('_', ' ')} {value} is not between 0 and 1"
                raise PrepareError(msg)
        if self.max_tags < 0:
            msg = f"max tags {self.max_tags} is negative (0 keeps all)"
            raise PrepareError(msg)


# --- model files -------------------------------------------------------------------------------------


def model_dir(models_dir: str | os.PathLike[str], repo: str) -> Path:
    """The folder of a model's files: ``<models_dir>/<owner>--<name>``; TaggerError for a repo id that
    is not ``owner/name`` of letters, digits, ``.``, ``_`` and ``-``."""
    owner, _, name = repo.partition("/")
    if not all(
        _REPO_PART.fullmatch(part) and ".." not in part and "--" not in part and not part.endswith(".")
        for part in (owner, name)
    ):
        msg = (
            f"{repo!r} is not a model hub repository id (owner/name of letters, digits, '.', '_' and '-', "
            f"such as {DEFAULT_MODEL})"
        )
        raise TaggerError(msg)
    return Path(models_dir) / f"{owner}--{name}"


def load_tags(csv_path: str | os.PathLike[str], expected: int | None = None) -> list[Tag]:
    """The tags of a selected_tags.csv (columns ``tag_id,name,category,count``) in file order;
    ``expected``: the model's output width, which the tag count must equal."""
    path = Path(csv_path)
    again = f"delete {path.parent} to download the model again"
    tags: list[Tag] = []
    try:
        with path.open(encoding="utf-8-sig", newline="") as f:
            reader = csv.DictReader(f)
            missing = [c for c in ("name", "category") if c not in (reader.fieldnames or [])]
            if missing:
                msg = (
                    f"{path} is not a tag list (no {' or '.join(missing)} column in its first line); {again}"
                )
                raise TaggerError(msg)
            for row in reader:
                name, category = (row.get("name") or "").strip(), row.get("category")
                try:
                    tags.append(Tag(name, int(category or "")))
                except ValueError:
                    msg = (
                        f"{path} line {reader.line_num}: category {category!r} is not a whole number; {again}"
                    )
                    raise TaggerError(msg) from None
                if not name:
                    msg = f"{path} line {reader.line_num}: the tag has no name; {again}"
                    raise TaggerError(msg)
    except FileNotFoundError:
        msg = f"{path} is missing; {again}"
        raise TaggerError(msg) from None
    except (UnicodeDecodeError, csv.Error) as e:
        msg = f"{path} is not a readable tag list ({_reason(e)}); {again}"
        raise TaggerError(msg) from e
    except OSError as e:
        msg = f"could not read {path}: {e.strerror or e}"
        raise TaggerError(msg) from e
    if not tags:
        msg = f"{path} lists no tags; {again}"
        raise TaggerError(msg)
    if expected is not None and len(tags) != expected:
        msg = (
            f"{path} lists {len(tags)} tags but the model beside it gives {expected} scores: the two files "
            f"belong to different models; {again}"
        )
        raise TaggerError(msg)
    return tags


def fetch_from_hub(repo: str, dest: Path, report: Report) -> None:
    """Download the missing MODEL_FILES of ``repo`` into ``dest`` (with huggingface_hub when it
    imports, else plain HTTPS); each file appears whole or not at all."""
    dest = Path(dest)
    try:
        dest.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        msg = f"could not create {dest}: {e.strerror or e}"
        raise TaggerError(msg) from e
    try:
        hub: Any = importlib.import_module("huggingface_hub")
    except ImportError:
        hub = None
    for name in sorted(MODEL_FILES, key=lambda n: n == "model.onnx"):  # the small tag list first
        target = dest / name
        if target.is_file():
            continue
        report(f"downloading {name} from the model hub ({repo}) into {dest}")
        try:
            if hub is not None:
                _download_with_hub(hub, repo, name, target)
            else:
                _download_with_urllib(repo, name, target)
        except Exception as e:
            msg = (
                f"could not download {name} of {repo} from the model hub ({_reason(e)}); check the "
                f"connection, or put {' and '.join(MODEL_FILES)} into {dest} by hand"
            )
            raise TaggerError(msg) from e
        logger.info("downloaded %s of %s into %s", name, repo, dest)


def _download_with_hub(hub: Any, repo: str, name: str, target: Path) -> None:
    """hf_hub_download into a hidden folder beside ``target``, then the file moved into place."""
    work = Path(tempfile.mkdtemp(prefix=".download-", dir=target.parent))
    try:
        got = Path(hub.hf_hub_download(repo_id=repo, filename=name, local_dir=work))
        if got.is_symlink():  # older huggingface_hub links large files into its cache
            fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=target.parent)
            os.close(fd)
            try:
                shutil.copyfile(got, tmp)
                os.replace(tmp, target)
            finally:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
        else:
            os.replace(got, target)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _download_with_urllib(repo: str, name: str, target: Path) -> None:
    """Stream ``HUB_URL`` into a temporary file beside ``target``, then rename it."""
    url = HUB_URL.format(repo=repo, file=name)
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT) as response:
            length = response.headers.get("Content-Length")
            done = 0
            while chunk := response.read(1 << 20):
                out.write(chunk)
                done += len(chunk)
            if length is not None and length.isdigit() and done != int(length):
                msg = f"the connection closed after {done} of {length} bytes"
                raise OSError(msg)
        os.replace(tmp, target)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


# --- runtime -------------------------------------------------------------------------------------------


def runtime_package() -> str:
    """``onnxruntime-gpu`` where torch sees an NVIDIA GPU on Linux or Windows, else ``onnxruntime``."""
    if sys.platform.startswith("linux") or sys.platform == "win32":
        try:
            import torch

            if torch.cuda.is_available() and not getattr(torch.version, "hip", None):
                return "onnxruntime-gpu"
        except ImportError:
            pass
    return "onnxruntime"


def _command_text(cmd: list[str]) -> str:
    return subprocess.list2cmdline(cmd) if os.name == "nt" else shlex.join(cmd)


def _broken_runtime(module: Any) -> TaggerError:
    """The error for an onnxruntime folder without its code (what uninstalling one of onnxruntime and
    onnxruntime-gpu leaves when both were installed)."""
    cmd = [sys.executable, "-m", "pip", "install", "--force-reinstall", runtime_package()]
    where = ", ".join(map(str, getattr(module, "__path__", None) or [getattr(module, "__file__", "?")]))
    msg = (
        f"onnxruntime in this Python is broken (no InferenceSession in {where}); "
        f"run this by hand, then restart the web UI: {_command_text(cmd)}"
    )
    return TaggerError(msg)


_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_SAFE_VERSION = re.compile(r"[A-Za-z0-9][A-Za-z0-9.+!_-]*")


def installed_pins() -> list[str]:
    """``name==version`` of every distribution this Python has, onnxruntime's own left out: the
    constraints that keep an install from changing anything the web UI has (A1111 pins protobuf 3.20,
    which the newest onnxruntime would replace)."""
    pins: dict[str, str] = {}
    for dist in importlib.metadata.distributions():  # in sys.path order: the first of a name is imported
        name, version = dist.metadata["Name"] or "", dist.version or ""
        key = re.sub(r"[-_.]+", "-", name).lower()
        if key in pins or key in ("onnxruntime", "onnxruntime-gpu"):
            continue
        if _SAFE_NAME.fullmatch(name) and _SAFE_VERSION.fullmatch(version):
            pins[key] = f"{name}=={version}"
    return sorted(pins.values(), key=str.lower)


def install_command(package: str, constraints: str) -> list[str]:
    """The pip command that adds ``package`` (at least the version WD v3 needs) under ``constraints``."""
    low = ".".join(map(str, MIN_RUNTIME))
    return [sys.executable, "-m", "pip", "install", f"{package}>={low}", "-c", constraints]


def ensure_onnxruntime(report: Report) -> Any:
    """The onnxruntime module, pip-installed into this Python first when it does not import."""
    try:
        found = importlib.import_module("onnxruntime")
    except ImportError:
        pass
    else:
        if not hasattr(found, "InferenceSession"):
            raise _broken_runtime(found)
        return found
    package = runtime_package()
    report(
        "installing onnxruntime into this web UI's Python (first use of the WD tagger; this takes a minute)"
    )
    fd, constraints = tempfile.mkstemp(prefix="ti-onnxruntime-", suffix=".txt")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write("\n".join(installed_pins()) + "\n")
    cmd = install_command(package, constraints)
    try:
        run = subprocess.run(
            cmd,
            capture_output=True,
            text=True,
            encoding="utf-8",
            errors="replace",
            timeout=PIP_TIMEOUT,
            check=False,
        )
        output, failed = (run.stdout or "") + (run.stderr or ""), run.returncode != 0
    except (OSError, subprocess.TimeoutExpired) as e:
        output, failed = str(e), True
    finally:
        with contextlib.suppress(OSError):
            os.unlink(constraints)
    if failed:
        tail = "\n".join(output.strip().splitlines()[-5:])
        msg = (
            f"could not install {package} without changing the web UI's own packages; run this by hand, "
            f"then restart the web UI: {_command_text([*cmd[:5]])}"
            f"\n{tail}"
        )
        raise TaggerError(msg.rstrip())
    importlib.invalidate_caches()
    try:
        module = importlib.import_module("onnxruntime")
    except Exception as e:
        msg = f"{package} was installed but does not load ({_reason(e)}); restart the web UI and try again"
        raise TaggerError(msg) from e
    if not hasattr(module, "InferenceSession"):
        raise _broken_runtime(module)
    logger.info("installed %s %s", package, getattr(module, "__version__", "?"))
    return module


@dataclass
class TaggerDeps:
    """The tagger's reach beyond this process: fetching model files and installing its runtime."""

    #: ``fetch(repo, folder, report)`` downloads MODEL_FILES of ``repo`` into ``folder``
    fetch: Callable[[str, Path, Report], None] = field(default=fetch_from_hub)
    #: ``install(report)`` returns the onnxruntime module, installing it first if missing
    install: Callable[[Report], Any] = field(default=ensure_onnxruntime)


# --- captions ------------------------------------------------------------------------------------------


def format_name(name: str, args: TaggerArgs) -> str:
    """A tag as it goes into a caption: underscores to spaces (kaomoji kept) and brackets escaped."""
    if args.underscores_to_spaces and name not in KAOMOJI:
        name = name.replace("_", " ")
    if args.escape_brackets:
        name = name.replace("(", "\\(").replace(")", "\\)")
    return name


def _match_key(text: str) -> str:
    """What a formatted tag and a drop-list entry are compared by (escapes, underscores, case ignored)."""
    text = text.strip().lower().replace("\\(", "(").replace("\\)", ")")
    return text if text in KAOMOJI else text.replace("_", " ")


def format_tags(scores: np.ndarray, tags: Sequence[Tag], args: TaggerArgs) -> str:
    """One picture's caption from its scores: characters above the character threshold, then general
    tags above the general threshold, each by descending score; the top rating last when asked."""
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 1 or scores.shape[0] != len(tags):
        msg = f"{scores.shape[0] if scores.ndim else 0} scores for {len(tags)} tags"
        raise TaggerError(msg)
    categories = np.fromiter((t.category for t in tags), dtype=np.int64, count=len(tags))
    drop = {_match_key(t) for t in args.drop_tags.split(",") if t.strip()}
    chosen: list[tuple[float, str]] = []
    seen: set[str] = set()
    for category, threshold in ((CHARACTER, args.character_threshold), (GENERAL, args.general_threshold)):
        found = np.flatnonzero((categories == category) & (scores > threshold))
        for i in found[np.argsort(-scores[found], kind="stable")]:
            text = format_name(tags[i].name, args)
            if _match_key(text) not in drop and text not in seen:
                seen.add(text)
                chosen.append((float(scores[i]), text))
    if 0 < args.max_tags < len(chosen):
        best = sorted(range(len(chosen)), key=lambda j: -chosen[j][0])[: args.max_tags]
        chosen = [chosen[j] for j in sorted(best)]
    out = [text for _, text in chosen]
    ratings = np.flatnonzero(categories == RATING)
    if args.include_rating and ratings.size:
        text = format_name(tags[ratings[np.argmax(scores[ratings])]].name, args)
        if _match_key(text) not in drop:
            out.append(text)
    return ", ".join(out)


# --- the model -----------------------------------------------------------------------------------------


def prepare_image(image: Image.Image, size: int) -> np.ndarray:
    """A picture as the model takes it: [size, size, 3] float32 BGR in 0..255, transparency over white,
    padded to a centred white square, resized bicubic."""
    img = to_8bit(image)
    if img.mode != "RGB":
        if "A" in img.getbands() or "a" in img.getbands() or "transparency" in img.info or img.mode == "P":
            rgba = img.convert("RGBA")
            canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            canvas.alpha_composite(rgba)
            img = canvas.convert("RGB")
        else:
            img = img.convert("RGB")
    w, h = img.size
    side = max(w, h)
    if w != h:
        square = Image.new("RGB", (side, side), (255, 255, 255))
        square.paste(img, ((side - w) // 2, (side - h) // 2))
        img = square
    if side != size:
        img = img.resize((size, size), Image.Resampling.BICUBIC)
    return np.ascontiguousarray(np.asarray(img, dtype=np.float32)[:, :, ::-1])


@dataclass(frozen=True)
class Signature:
    """What a WD tagger model takes and gives."""

    input: str
    output: str
    #: the side of the square pictures it takes
    size: int
    #: how many pictures one run takes: None where the batch size is free (WD v3), else fixed (v2 models)
    batch: int | None
    #: how many scores it gives per picture (None when the model leaves it open)
    width: int | None


def _signature(session: Any, folder: Path) -> Signature:
    """The signature of an open model; TaggerError unless it takes one [batch, side, side, 3] input and
    gives [batch, n_tags] first."""
    inputs, outputs = session.get_inputs(), session.get_outputs()
    shape = list(inputs[0].shape) if len(inputs) == 1 else []
    out_shape = list(outputs[0].shape) if outputs else []
    if (
        len(shape) != 4
        or shape[3] != 3
        or not isinstance(shape[1], int)
        or shape[1] != shape[2]
        or len(out_shape) != 2
    ):
        msg = (
            f"{folder / 'model.onnx'} is not a WD tagger model (it takes {[(i.name, i.shape) for i in inputs]} "
            f"and gives {[(o.name, o.shape) for o in outputs]}, not one [batch, side, side, 3] input and "
            f"[batch, tags] scores); delete {folder} to download it again"
        )
        raise TaggerError(msg)
    batch, width = shape[0], out_shape[1]
    return Signature(
        inputs[0].name,
        outputs[0].name,
        shape[1],
        batch if isinstance(batch, int) and batch > 0 else None,
        width if isinstance(width, int) else None,
    )


class WdTagger:
    """An open WD tagger model and its tag list."""

    def __init__(self, session: Any, tags: list[Tag], folder: Path, signature: Signature) -> None:
        self.folder = folder
        self.tags = tags
        self.signature = signature
        self._session = session
        #: the side of the square pictures the model takes
        self.size = signature.size
        #: how many pictures one run takes (None: any number)
        self.batch = signature.batch
        #: the execution providers the session runs on (CPU only when CUDA could not start)
        self.providers: list[str] = list(session.get_providers())

    @classmethod
    def load(
        cls,
        models_dir: str | os.PathLike[str],
        args: TaggerArgs,
        deps: TaggerDeps | None = None,
        report: Report = _quiet,
    ) -> WdTagger:
        """Open ``args.model`` from ``models_dir``, fetching its files and installing onnxruntime first
        when they are missing."""
        deps = deps or TaggerDeps()
        folder = model_dir(models_dir, args.model)
        if any(not (folder / name).is_file() for name in MODEL_FILES):
            try:
                folder.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                msg = f"could not create {folder}: {e.strerror or e}"
                raise TaggerError(msg) from e
            deps.fetch(args.model, folder, report)
            missing = [name for name in MODEL_FILES if not (folder / name).is_file()]
            if missing:
                msg = (
                    f"{' and '.join(missing)} still missing from {folder} after the download; "
                    "put them there by hand"
                )
                raise TaggerError(msg)
        ort = deps.install(report)
        available = list(ort.get_available_providers())
        providers = [p for p in PROVIDERS if p in available] or ["CPUExecutionProvider"]
        model = folder / "model.onnx"
        try:
            session = ort.InferenceSession(str(model), providers=providers)
        except Exception as e:  # onnxruntime's errors derive from Exception only
            version = str(getattr(ort, "__version__", ""))
            if _older_than(version, MIN_RUNTIME):
                msg = (
                    f"onnxruntime {version} cannot open {model} ({_reason(e)}); WD v3 models need onnxruntime "
                    f"{'.'.join(map(str, MIN_RUNTIME))} or newer: update it and restart the web UI"
                )
            else:
                msg = (
                    f"{model} is not a usable ONNX model ({_reason(e)}); delete {folder} to download it again"
                )
            raise TaggerError(msg) from e
        signature = _signature(session, folder)
        tags = load_tags(folder / "selected_tags.csv", signature.width)
        tagger = cls(session, tags, folder, signature)
        logger.info(
            "WD tagger %s: %d tags, %dpx, on %s", args.model, len(tags), tagger.size, tagger.providers
        )
        report(f"WD tagger {args.model} loaded ({', '.join(tagger.providers)})")
        return tagger

    def scores(self, images: Sequence[Image.Image]) -> np.ndarray:
        """[len(images), n_tags] float32 probabilities, the pictures run as one batch (in runs of the
        model's fixed batch size where it has one)."""
        step = self.batch or max(len(images), 1)
        runs = [self._run(images[i : i + step]) for i in range(0, len(images), step)]
        return np.concatenate(runs) if runs else np.zeros((0, len(self.tags)), dtype=np.float32)

    def _run(self, images: Sequence[Image.Image]) -> np.ndarray:
        batch = np.stack([prepare_image(im, self.size) for im in images])
        try:
            out = self._session.run([self.signature.output], {self.signature.input: batch})[0]
        except Exception as e:  # onnxruntime's errors derive from Exception only
            msg = f"the WD tagger failed on {len(images)} picture(s) ({_reason(e)})"
            raise TaggerError(msg) from e
        out = np.asarray(out, dtype=np.float32)
        if out.shape != (len(images), len(self.tags)):
            msg = (
                f"the model in {self.folder} gave scores of shape {out.shape} for {len(images)} picture(s) "
                f"and {len(self.tags)} tags"
            )
            raise TaggerError(msg)
        return out

    def tag(self, images: Sequence[Image.Image], args: TaggerArgs) -> list[str]:
        """One caption (tags joined by ``", "``) per picture."""
        return [format_tags(row, self.tags, args) for row in self.scores(images)]
