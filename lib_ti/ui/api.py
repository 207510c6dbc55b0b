"""REST routes under ``/ti/v1`` (FastAPI; pydantic 1 on A1111, 2 on Forge), with the host API's auth.

Bodies are strict: a body that is not JSON is a 400, an unknown field or a value outside a field's
set is a 422 naming the field (and the allowed values), text longer than :data:`MAX_TEXT`, text with
a lone surrogate (``\\ud800``) and a number beyond a float's range a 422, and a body over
:data:`MAX_BODY_BYTES` a 413; the names older clients used are accepted through
:data:`TRAIN_ALIASES`, and two names for one field with different values are a 400. Every error body
is ``{"detail": "..."}``; in answers, NaN and infinities are null (:func:`jsonable`). ``GET
/ti/v1/schema`` gives the JSON schema of each body. ``tests/test_api_fuzz.py`` sends each route a few
hundred seeded malformed bodies and asserts a 4xx for each.
"""

from __future__ import annotations

import difflib
import functools
import json
import logging
import math
import secrets
import sys
from collections.abc import Callable, Mapping
from dataclasses import asdict, fields
from typing import Any, Literal, Optional, Union

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPBasic, HTTPBasicCredentials
from pydantic import BaseModel, StrictInt, StrictStr, ValidationError, create_model
from starlette.concurrency import run_in_threadpool

from lib_ti.create import CreateArgs, InitMode
from lib_ti.errors import EmbeddingExists, JobNotFound, NotFoundError, TIError, short_repr
from lib_ti.grid.options import FIELD_TYPES as GRID_TYPES
from lib_ti.grid.options import ITEM_TYPES as GRID_ITEMS
from lib_ti.grid.options import GridRequest
from lib_ti.io.formats import read_embedding
from lib_ti.io.library import list_files
from lib_ti.prepare.options import FIELD_TYPES as PREPARE_TYPES
from lib_ti.prepare.options import REQUIRED as PREPARE_REQUIRED
from lib_ti.prepare.options import PrepareRequest
from lib_ti.service import Service
from lib_ti.stats import embedding_stats
from lib_ti.training.jobs import BusyError, JobStatus
from lib_ti.training.options import FIELD_TYPES, MAXIMUM, TrainRequest, choices

logger = logging.getLogger(__name__)
PREFIX = "/ti/v1"
PYDANTIC_2 = hasattr(BaseModel, "model_validate")

SaveFormat = Literal["safetensors", "pt"]

#: other names clients used for training fields -> the field's name
TRAIN_ALIASES = {"dataset": "dataset_dir", "learning_rate": "lr", "save_every": "snapshot_every"}
#: ``width`` and ``height`` (given together) stand for ``resolution`` = sqrt(width x height), rounded to 64
SIZE_FIELDS = ("width", "height")
#: the largest body a route reads (bytes) and the longest text a field takes (characters)
MAX_BODY_BYTES = 1 << 20
MAX_TEXT = 10_000
#: the most nearest tokens a route lists per vector and encoder
MAX_NEAREST = 50


class ApiError(Exception):
    def __init__(self, status: int, detail: str, **extra: Any) -> None:
        super().__init__(detail)
        self.status, self.detail, self.extra = status, detail, extra


class StrictBody(BaseModel):
    """Unknown fields are an error (pydantic 1 reads ``Config``, pydantic 2 ``model_config``)."""

    if PYDANTIC_2:
        model_config = {"extra": "forbid"}
    else:

        class Config:
            extra = "forbid"


class CreateBody(StrictBody):
    name: str
    vectors: int = 1
    init_mode: InitMode = "text"
    init_text: str = "*"
    seed: Optional[int] = None  # noqa: UP045 (pydantic 1 on Python 3.10 needs Optional)
    overwrite: bool = False
    format: Optional[SaveFormat] = None  # noqa: UP045


class MergeBody(StrictBody):
    expression: str
    name: str
    overwrite: bool = False
    format: Optional[SaveFormat] = None  # noqa: UP045


class RemakeBody(StrictBody):
    #: an embedding made from text (Create) or by Merge, re-made for the loaded checkpoint
    name: str
    overwrite: bool = False
    format: Optional[SaveFormat] = None  # noqa: UP045


class ExtractBody(StrictBody):
    #: a LoRA file: a path, or one relative to the web UI's LoRA folder
    file: str
    #: the bundled embeddings to extract (left out: all)
    names: Optional[list[StrictStr]] = None  # noqa: UP045
    #: {bundled name: new name}
    rename: Optional[dict[StrictStr, StrictStr]] = None  # noqa: UP045
    overwrite: bool = False
    format: Optional[SaveFormat] = None  # noqa: UP045


class EvaluateBody(StrictBody):
    expression: str
    #: top-k nearest vocabulary tokens per vector and encoder (0: none)
    nearest: int = 3


class InspectBody(StrictBody):
    name: str
    #: top-k nearest vocabulary tokens per vector and encoder (needs the loaded model; 0: none)
    nearest: int = 5


def _train_body() -> type[BaseModel]:
    """The body of POST /ti/v1/train: TrainRequest's fields; all but ``embedding`` and ``dataset_dir``
    may be left out (then the loaded model's recipe and the user's settings decide; with ``resume``,
    the settings of the run it continues, ``dataset_dir`` included)."""
    spec: dict[str, Any] = {}
    for f in fields(TrainRequest):
        kind = FIELD_TYPES[f.name]
        if kind is str and f.name == "lr":
            kind = Union[str, float]  # noqa: UP007 (a bare number is a rate too)
        # dataset_dir may be left out when resuming: the run's saved settings have it
        spec[f.name] = (kind, ...) if f.name == "embedding" else (Optional[kind], None)  # noqa: UP045
    return create_model("TrainBody", __base__=StrictBody, **spec)


TrainBody = _train_body()


def _prepare_body() -> type[BaseModel]:
    """The body of POST /ti/v1/prepare: PrepareRequest's fields; all but the two folders may be left out."""
    spec: dict[str, Any] = {
        f.name: (PREPARE_TYPES[f.name], ...)
        if f.name in PREPARE_REQUIRED
        else (Optional[PREPARE_TYPES[f.name]], None)  # noqa: UP045
        for f in fields(PrepareRequest)
    }
    return create_model("PrepareBody", __base__=StrictBody, **spec)


PrepareBody = _prepare_body()


def _grid_body() -> type[BaseModel]:
    """The body of POST /ti/v1/grid: GridRequest's fields, every one optional; a list field takes a JSON
    list or text (prompts one per line, the others comma-separated). List items are checked by
    :func:`~lib_ti.grid.options.grid_request` (pydantic 1 would round 1.5 to a seed of 1)."""
    spec: dict[str, Any] = {}
    for f in fields(GridRequest):
        item = GRID_ITEMS.get(f.name)
        items = StrictStr if item is str else Any
        strict = {int: StrictInt, str: StrictStr}.get(GRID_TYPES[f.name], GRID_TYPES[f.name])
        kind = Union[list[items], StrictStr] if item else strict  # type: ignore[valid-type]  # noqa: UP007
        spec[f.name] = (Optional[kind], None)  # noqa: UP045
    return create_model("GridBody", __base__=StrictBody, **spec)


GridBody = _grid_body()
CaptionOp = Literal["replace", "remove_tag", "rename_tag", "sort_tags", "add_tags", "set", "undo"]


class CaptionsBody(StrictBody):
    folder: str
    op: CaptionOp
    #: replace: the text (or regex) to find and what replaces it
    find: Optional[str] = None  # noqa: UP045
    replace: Optional[str] = None  # noqa: UP045
    regex: bool = False
    #: remove_tag, rename_tag: the tag; rename_tag: its new name
    tag: Optional[str] = None  # noqa: UP045
    new_tag: Optional[str] = None  # noqa: UP045
    #: add_tags: comma-separated tags, at the start or the end
    tags: Optional[str] = None  # noqa: UP045
    at_start: bool = True
    #: set: image (relative to the folder) -> its new caption
    captions: Optional[dict[str, str]] = None  # noqa: UP045


#: the type of each body field that has a value set
_CHOICES: dict[str, Any] = {
    **PREPARE_TYPES,
    **FIELD_TYPES,
    "init_mode": InitMode,
    "format": SaveFormat,
    "op": CaptionOp,
}
BODIES: dict[str, type[BaseModel]] = {
    "create": CreateBody,
    "merge": MergeBody,
    "evaluate": EvaluateBody,
    "inspect": InspectBody,
    "train": TrainBody,
    "prepare": PrepareBody,
    "captions": CaptionsBody,
    "grid": GridBody,
    "remake": RemakeBody,
    "bundles": ExtractBody,
}


def _schema(model: type[BaseModel]) -> dict[str, Any]:
    return model.model_json_schema() if PYDANTIC_2 else model.schema()  # type: ignore[attr-defined]


def _field_names(model: type[BaseModel]) -> list[str]:
    return list(model.model_fields if PYDANTIC_2 else model.__fields__)  # type: ignore[attr-defined]


def _error_text(model: type[BaseModel], err: Mapping[str, Any], given: Mapping[str, Any]) -> str:
    loc = [str(x) for x in err.get("loc", ()) if x != "__root__"]
    name = loc[0] if loc else ""
    known = _field_names(model)
    if name and name not in known:
        names = [*known, *TRAIN_ALIASES] if model is TrainBody else known  # the older names are train's
        close = difflib.get_close_matches(name, names, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        return f"unknown field {name!r}{hint}; the fields are: {', '.join(known)}"
    allowed = choices(_CHOICES.get(name))
    if allowed:
        return f"{name} must be one of {', '.join(allowed)} (got {short_repr(given.get(name))})"
    return f"{name}: {err.get('msg', 'invalid value')}" if name else str(err.get("msg", "invalid body"))


def _surrogate(text: str) -> str | None:
    """The first lone surrogate in ``text`` (JSON's ``\\ud800`` escapes can make them), None without one."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        return text[e.start]
    return None


def _check_values(model: type[BaseModel], data: Mapping[str, Any]) -> None:
    """What the field checks do not catch: text that is not Unicode (a lone surrogate: no file name or
    JSON answer can hold it) and numbers beyond a float's range (pydantic 1 fails on those); ApiError 422."""
    known = _field_names(model)
    for name, value in data.items():
        if (bad := _surrogate(name)) is not None:
            msg = f"a field name contains {bad!r}, half of a UTF-16 surrogate pair, which is not text"
            raise ApiError(422, msg)
        if name not in known:
            continue  # the model's check names it
        if isinstance(value, str) and (bad := _surrogate(value)) is not None:
            msg = f"{name} contains {bad!r}, half of a UTF-16 surrogate pair, which is not text"
            raise ApiError(422, msg)
        if isinstance(value, int) and not isinstance(value, bool) and abs(value) > sys.float_info.max:
            raise ApiError(422, f"{name} is too large a number (the limit is ±{sys.float_info.max:.3g})")


def validate(model: type[BaseModel], data: Any) -> dict[str, Any]:
    """``data`` checked against ``model``: every field's value, or ApiError 422."""
    if not isinstance(data, Mapping):
        raise ApiError(422, "the body must be a JSON object")
    _check_values(model, data)
    try:
        parsed = model.model_validate(dict(data)) if PYDANTIC_2 else model.parse_obj(dict(data))  # type: ignore[attr-defined]
    except ValidationError as e:
        raise ApiError(422, "; ".join(_error_text(model, err, data) for err in e.errors())) from e
    values: dict[str, Any] = parsed.model_dump() if PYDANTIC_2 else parsed.dict()  # type: ignore[union-attr]
    for name, value in values.items():
        if isinstance(value, str) and len(value) > MAX_TEXT:
            raise ApiError(422, f"{name} is {len(value)} characters long; the limit is {MAX_TEXT}")
    return values


def parse_body(raw: bytes) -> Any:
    """A request's JSON body; ApiError 413 when too large, 400 when empty or not JSON."""
    if len(raw) > MAX_BODY_BYTES:
        raise ApiError(413, f"the body is {len(raw)} bytes; the limit is {MAX_BODY_BYTES}")
    if not raw.strip():
        raise ApiError(400, "the body is empty; send a JSON object")
    try:
        return json.loads(raw)
    except UnicodeDecodeError as e:
        raise ApiError(400, f"the body is not UTF-8 text ({e.reason} at byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise ApiError(
            400, f"the body is not valid JSON ({e.msg} at line {e.lineno} column {e.colno})"
        ) from None
    except RecursionError:
        raise ApiError(400, "the body nests too deeply") from None
    except ValueError:  # Python's limit on the digits of an integer (4300 by default)
        raise ApiError(400, "the body is not valid JSON: it holds a number with too many digits") from None


def train_fields(body: Any) -> dict[str, Any]:
    """The fields a training body gives (older names folded in, checked); the rest is the recipe's."""
    values = validate(TrainBody, unalias(body) if isinstance(body, Mapping) else body)
    given = {k: v for k, v in values.items() if v is not None}
    if isinstance(given.get("lr"), float | int):
        given["lr"] = repr(given["lr"])  # a bare number is a rate
    return given


def unalias(data: Mapping[str, Any]) -> dict[str, Any]:
    """A training body with the older names folded into the fields' names; ApiError 400 on a conflict."""
    out = {k: v for k, v in data.items() if k not in TRAIN_ALIASES and k not in SIZE_FIELDS}
    for alias, name in TRAIN_ALIASES.items():
        if alias not in data:
            continue
        if name in data and data[name] != data[alias]:
            msg = f"{alias!r} and {name!r} name the same field with different values; send only {name!r}"
            raise ApiError(400, msg)
        out[name] = data[alias]
    given = [k for k in SIZE_FIELDS if data.get(k) is not None]
    if given:
        if len(given) == 1:
            raise ApiError(422, f"{given[0]} needs {({'width': 'height', 'height': 'width'})[given[0]]} too")
        try:
            w, h = int(data["width"]), int(data["height"])
        except (TypeError, ValueError, OverflowError) as e:
            raise ApiError(422, "width and height must be whole numbers") from e
        if w < 64 or h < 64:
            raise ApiError(422, "width and height must be at least 64")
        side = MAXIMUM["resolution"]
        if w * h > side * side:
            raise ApiError(422, f"width x height must be at most {side} x {side} pixels")
        res = max(64, round((w * h) ** 0.5 / 64) * 64)
        if data.get("resolution") is not None and data["resolution"] != res:
            msg = f"width x height gives resolution {res} but resolution is {data['resolution']}; send one"
            raise ApiError(400, msg)
        out["resolution"] = res
    return out


#: our detailed states -> the API's: queued, running, done, stopped, failed
STATE = {"queued": "queued", "running": "running", "finished": "done", "early_stopped": "done",
         "stopped": "stopped", "model_changed": "stopped", "failed": "failed", "error": "failed"}  # fmt: skip


def status_view(st: JobStatus) -> dict[str, Any]:
    """A job's status, each value once."""
    d = asdict(st)
    failed = st.state in ("failed", "error")
    view: dict[str, Any] = {
        "job": d.pop("id"),
        "kind": d.pop("kind"),
        "name": d.pop("name"),
        "state": STATE.get(st.state, st.state),
        #: how it ended, in detail (None while queued or running)
        "outcome": None if st.running else d["state"],
        "step": d.pop("step"),
        "steps": d.pop("total"),
        "eta_s": d.pop("eta_seconds"),
        "message": None if failed else st.message,
        "error": st.message if failed else None,
    }
    view.update({k: v for k, v in d.items() if k not in ("state", "message")})
    return view


def describe(emb: Any) -> dict[str, Any]:
    stats = {k: [asdict(s) for s in v] for k, v in embedding_stats(emb).items()}
    return {"name": emb.name, "kind": emb.kind, "vectors": emb.num_vectors, "step": emb.step,
            "sd_checkpoint": emb.sd_checkpoint, "metadata": emb.metadata, "stats": stats}  # fmt: skip


def basic_auth(credentials: str | None) -> Callable[..., None] | None:
    """A dependency that checks HTTP basic auth like the host's ``--api-auth user:pass,user2:pass2``."""
    if not credentials:
        return None
    allowed = dict(c.split(":", 1) for c in credentials.split(",") if ":" in c)
    security = HTTPBasic()

    def check(creds: HTTPBasicCredentials = Depends(security)) -> None:  # noqa: B008
        expected = allowed.get(creds.username)
        if expected is None or not secrets.compare_digest(creds.password, expected):
            raise HTTPException(status_code=401, detail="Incorrect username or password",
                                headers={"WWW-Authenticate": "Basic"})  # fmt: skip

    return check


def check_nearest(k: int) -> None:
    """ApiError 400 unless ``k`` is 0 to :data:`MAX_NEAREST`."""
    if not 0 <= k <= MAX_NEAREST:
        raise ApiError(400, f"nearest must be 0 to {MAX_NEAREST} (got {short_repr(k)})")


def http_status(e: Exception) -> int:
    """The HTTP status of an error, by its type."""
    if isinstance(e, ApiError):
        return e.status
    if isinstance(e, NotFoundError):
        return 404
    if isinstance(e, (EmbeddingExists, BusyError)):
        return 409
    return 400


def _utf8(text: str) -> str:
    """``text`` as UTF-8 can carry it: a file name's bytes in another encoding (Python's surrogate
    escapes) as ``\\xff``, a lone surrogate as ``\\ud800``."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        try:
            return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
        except UnicodeEncodeError:
            return text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text


def jsonable(value: Any) -> Any:
    """``value`` as JSON can carry it: NaN and infinities (a loss that diverged, a file's vectors) as
    null, text as :func:`_utf8` gives it."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, str):
        return _utf8(value)
    if isinstance(value, Mapping):
        return {_utf8(k) if isinstance(k, str) else k: jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return value


def error_response(e: Exception) -> JSONResponse:
    content: dict[str, Any] = {"detail": e.detail if isinstance(e, ApiError) else str(e)}
    if isinstance(e, ApiError):
        content.update(e.extra)
    if isinstance(e, BusyError):
        content["job"] = e.job_id
    return JSONResponse(status_code=http_status(e), content=jsonable(content))


def handled(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Our errors as ``{"detail": ...}`` responses with the status of their type; results made
    :func:`jsonable`."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            result = fn(*args, **kwargs)
        except (ApiError, TIError) as e:
            return error_response(e)
        return result if isinstance(result, Response) else jsonable(result)

    return wrapper


def add_routes(app: FastAPI, service: Service, auth: str | None = None) -> None:
    deps = [Depends(dep)] if (dep := basic_auth(auth)) else []

    def route(path: str, fn: Callable[..., Any], method: str) -> None:
        app.add_api_route(PREFIX + path, handled(fn), methods=[method], dependencies=deps)

    def body_route(path: str, fn: Callable[[Any], Any], model: type[BaseModel]) -> None:
        """A POST route whose JSON body we read ourselves, so that every error is ``{"detail": text}``."""
        run = handled(fn)

        async def endpoint(request: Request) -> Any:
            try:
                body = parse_body(await request.body())
            except ApiError as e:
                return error_response(e)
            return await run_in_threadpool(run, body)

        endpoint.__name__ = f"ti_{fn.__name__}"
        schema = {"content": {"application/json": {"schema": _schema(model)}}, "required": True}
        app.add_api_route(PREFIX + path, endpoint, methods=["POST"], dependencies=deps,
                          openapi_extra={"requestBody": schema})  # fmt: skip

    def embeddings() -> Any:
        folder = service.folder()
        status = service.host.embedding_status()
        runs = service.unfinished_runs()
        items: list[dict[str, Any]] = []
        for entry in list_files(folder):
            try:
                emb = read_embedding(entry.path)
            except TIError as e:
                items.append({"file": entry.relpath, "error": str(e)})
                continue
            items.append({"file": entry.relpath, "name": emb.name, "kind": emb.kind, "vectors": emb.num_vectors,
                          "step": emb.step, "host": status.get(emb.name, "not loaded"),
                          "unfinished": runs.get(emb.name)})  # fmt: skip
        return {
            "folder": str(folder),
            "embeddings": items,
            "loaded": sorted(n for n, v in status.items() if v == "loaded"),
            "skipped": sorted(n for n, v in status.items() if v == "skipped"),
        }

    def inspect(name: str) -> Any:
        return describe(read_embedding(service.find_embedding_file(name)))

    def inspect_post(body: Any) -> Any:
        b = validate(InspectBody, body)
        check_nearest(b["nearest"])
        emb = read_embedding(service.find_embedding_file(b["name"]))
        out = describe(emb)
        if b["nearest"] > 0:
            out["nearest"] = service.nearest(emb, int(b["nearest"]))
        return out

    def create(body: Any) -> Any:
        b = validate(CreateBody, body)
        args = CreateArgs(b["name"], b["vectors"], b["init_mode"], b["init_text"], b["seed"])
        path, warnings = service.create(args, overwrite=b["overwrite"], fmt=b["format"])
        emb = read_embedding(path)
        return {"name": emb.name, "kind": emb.kind, "vectors": emb.num_vectors, "file": str(path),
                "warnings": warnings}  # fmt: skip

    def merge(body: Any) -> Any:
        b = validate(MergeBody, body)
        path = service.merge(b["expression"], b["name"], overwrite=b["overwrite"], fmt=b["format"])
        emb = read_embedding(path)
        return {"name": emb.name, "kind": emb.kind, "vectors": emb.num_vectors, "file": str(path)}

    def evaluate(body: Any) -> Any:
        b = validate(EvaluateBody, body)
        check_nearest(b["nearest"])
        return service.evaluate(b["expression"], nearest=b["nearest"])

    def train(body: Any) -> Any:
        job = service.start_training(train_fields(body))
        return JSONResponse(status_code=202, content={"job": job.id})

    def prepare_options() -> Any:
        return service.prepare.options()

    def prepare(body: Any) -> Any:
        given = {k: v for k, v in validate(PrepareBody, body).items() if v is not None}
        job = service.prepare.start(given, service.loaded_kind)
        return JSONResponse(status_code=202, content={"job": job.id})

    def captions(folder: str = "") -> Any:
        if not folder.strip():
            raise ApiError(400, "give the folder: /ti/v1/captions?folder=<path>")
        return service.prepare.captions(folder)

    def captions_post(body: Any) -> Any:
        b = validate(CaptionsBody, body)
        folder, op = b.pop("folder"), b.pop("op")
        return service.prepare.edit_captions(folder, op, **b)

    def remake(body: Any) -> Any:
        b = validate(RemakeBody, body)
        return service.remake(b["name"], overwrite=b["overwrite"], fmt=b["format"])

    def bundles(file: str = "") -> Any:
        if not file.strip():
            return {
                "folder": service.host.lora_dir(),
                "files": service.lora_files(),
                "note": service.host.bundle_note,
            }
        return service.bundles(file)

    def extract(body: Any) -> Any:
        b = validate(ExtractBody, body)
        paths = service.extract(
            b["file"], b["names"], rename=b["rename"], overwrite=b["overwrite"], fmt=b["format"]
        )
        return {"files": [str(p) for p in paths], "names": [p.stem for p in paths]}

    def grid_options() -> Any:
        return service.grid.options()

    def grid(body: Any) -> Any:
        given = {k: v for k, v in validate(GridBody, body).items() if v is not None}
        job = service.grid.start(given)
        return JSONResponse(status_code=202, content={"job": job.id})

    def job_status(job_id: str) -> Any:
        return status_view(_job(job_id).status)

    def job_stop(job_id: str) -> Any:
        job = _job(job_id)
        job.stop()
        return {"job": job_id, "stopping": job.status.running}

    def _job(job_id: str) -> Any:
        job = service.jobs.get(job_id)
        if job is None:
            msg = f"no job {job_id!r}"
            raise JobNotFound(msg)
        return job

    def schema() -> Any:
        return {
            "bodies": {name: _schema(model) for name, model in BODIES.items()},
            "aliases": {"train": {**TRAIN_ALIASES, "width + height": "resolution"}},
        }

    route("/schema", schema, "GET")
    route("/embeddings", embeddings, "GET")
    route("/inspect/{name}", inspect, "GET")
    body_route("/inspect", inspect_post, InspectBody)
    body_route("/create", create, CreateBody)
    body_route("/merge", merge, MergeBody)
    body_route("/evaluate", evaluate, EvaluateBody)
    body_route("/train", train, TrainBody)
    route("/prepare", prepare_options, "GET")
    body_route("/prepare", prepare, PrepareBody)
    route("/captions", captions, "GET")
    body_route("/captions", captions_post, CaptionsBody)
    body_route("/remake", remake, RemakeBody)
    route("/bundles", bundles, "GET")
    body_route("/bundles", extract, ExtractBody)
    route("/grid", grid_options, "GET")
    body_route("/grid", grid, GridBody)
    route("/jobs/{job_id}", job_status, "GET")
    route("/jobs/{job_id}/stop", job_stop, "POST")
