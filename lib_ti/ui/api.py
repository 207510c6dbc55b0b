"""REST routes under ``/ti/v1`` (FastAPI; pydantic 1 on A1111, 2 on Forge), with the host API's auth."""

from __future__ import annotations

import logging
import secrets
import typing
from collections.abc import Callable
from dataclasses import MISSING, asdict, fields
from typing import Any, Optional

from fastapi import Depends, FastAPI, HTTPException
from fastapi.responses import JSONResponse
from fastapi.security import HTTPBasic, HTTPBasicCredentials
from pydantic import BaseModel, create_model

from lib_ti.create import CreateArgs
from lib_ti.errors import TIError
from lib_ti.io.formats import read_embedding
from lib_ti.io.library import list_files
from lib_ti.service import Service, TrainRequest
from lib_ti.stats import embedding_stats
from lib_ti.training.jobs import BusyError

logger = logging.getLogger(__name__)
PREFIX = "/ti/v1"


def dump(model: BaseModel) -> dict[str, Any]:
    """Model fields as a dict on pydantic 1 and 2."""
    return model.model_dump() if hasattr(model, "model_dump") else model.dict()


class CreateBody(BaseModel):
    name: str
    vectors: int = 1
    init_mode: str = "text"
    init_text: str = "*"
    seed: Optional[int] = None  # noqa: UP045 (pydantic 1 on Python 3.10 needs Optional)
    overwrite: bool = False
    format: Optional[str] = None  # noqa: UP045


class MergeBody(BaseModel):
    expression: str
    name: str
    overwrite: bool = False
    format: Optional[str] = None  # noqa: UP045


def _model_from_dataclass(name: str, cls: type) -> type[BaseModel]:
    """A pydantic model (v1 or v2) with the fields and defaults of a dataclass."""
    hints = typing.get_type_hints(cls)
    spec = {f.name: (hints[f.name], f.default if f.default is not MISSING else ...) for f in fields(cls)}
    return create_model(name, **spec)  # type: ignore[call-overload]


#: The body of POST /ti/v1/train: the fields of lib_ti.service.TrainRequest.
TrainBody = _model_from_dataclass("TrainBody", TrainRequest)


class InspectBody(BaseModel):
    name: str
    #: top-k nearest vocabulary tokens per vector and encoder (needs the loaded model; 0: none)
    nearest: int = 5


#: our detailed states -> the API's: queued, running, done, stopped, failed
STATE = {"queued": "queued", "running": "running", "finished": "done", "early_stopped": "done",
         "stopped": "stopped", "model_changed": "stopped", "failed": "failed", "error": "failed"}  # fmt: skip


def status_view(st: Any) -> dict[str, Any]:
    d = st.to_dict()
    d.update(
        job=st.id,
        state=STATE.get(st.state, st.state),
        detail=st.state,
        steps=st.total,
        eta_s=st.eta_seconds,
        file=st.files[-1] if st.files else None,
        preview=st.previews[-1] if st.previews else None,
        error=st.message if st.state in ("failed", "error") else None,
    )
    return d


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


def _error(e: Exception, status: int = 400) -> JSONResponse:
    return JSONResponse(status_code=status, content={"error": str(e)})


def add_routes(app: FastAPI, service: Service, auth: str | None = None) -> None:
    deps = [Depends(dep)] if (dep := basic_auth(auth)) else []

    def route(path: str, fn: Callable[..., Any], method: str) -> None:
        app.add_api_route(PREFIX + path, fn, methods=[method], dependencies=deps)

    def embeddings() -> Any:
        folder = service.folder()
        status = service.host.embedding_status()
        items = []
        for entry in list_files(folder):
            try:
                emb = read_embedding(entry.path)
            except TIError as e:
                items.append({"file": entry.relpath, "error": str(e)})
                continue
            items.append({"file": entry.relpath, "name": emb.name, "kind": emb.kind, "vectors": emb.num_vectors,
                          "step": emb.step, "host": status.get(emb.name, "not loaded")})  # fmt: skip
        return {
            "folder": str(folder),
            "files": [i["file"] for i in items],
            "embeddings": items,
            "loaded": sorted(n for n, v in status.items() if v == "loaded"),
            "skipped": sorted(n for n, v in status.items() if v == "skipped"),
        }

    def inspect(name: str) -> Any:
        try:
            emb = read_embedding(service.find_embedding_file(name))
        except TIError as e:
            return _error(e, 404)
        return describe(emb)

    def inspect_post(body: InspectBody) -> Any:
        b = dump(body)
        try:
            emb = read_embedding(service.find_embedding_file(b["name"]))
            out = describe(emb)
            if b["nearest"] > 0:
                out["nearest"] = service.nearest(emb, int(b["nearest"]))
        except TIError as e:
            return _error(e, 404 if "no embedding named" in str(e) else 400)
        return out

    def create(body: CreateBody) -> Any:
        b = dump(body)
        try:
            path, warnings = service.create(
                CreateArgs(b["name"], b["vectors"], b["init_mode"], b["init_text"], b["seed"]),
                overwrite=b["overwrite"],
                fmt=b["format"],
            )
        except FileExistsError as e:
            return _error(e, 409)
        except TIError as e:
            return _error(e)
        emb = read_embedding(path)
        return {
            "name": emb.name,
            "kind": emb.kind,
            "vectors": emb.num_vectors,
            "file": str(path),
            "warnings": warnings,
        }

    def merge(body: MergeBody) -> Any:
        b = dump(body)
        try:
            path = service.merge(b["expression"], b["name"], overwrite=b["overwrite"], fmt=b["format"])
        except FileExistsError as e:
            return _error(e, 409)
        except TIError as e:
            return _error(e)
        emb = read_embedding(path)
        return {"name": emb.name, "kind": emb.kind, "vectors": emb.num_vectors, "file": str(path)}

    def train(body: TrainBody) -> Any:  # type: ignore[valid-type]
        b = dump(body)
        req = TrainRequest(**{f.name: b[f.name] for f in fields(TrainRequest) if f.name in b})
        try:
            job = service.start_training(req)
        except BusyError as e:
            return JSONResponse(
                status_code=409, content={"error": str(e), "job": e.job_id, "job_id": e.job_id}
            )
        except TIError as e:
            return _error(e)
        return JSONResponse(status_code=202, content={"job": job.id, "job_id": job.id})

    def job_status(job_id: str) -> Any:
        job = service.jobs.get(job_id)
        if job is None:
            return _error(TIError(f"no job {job_id}"), 404)
        return status_view(job.status)

    def job_stop(job_id: str) -> Any:
        job = service.jobs.get(job_id)
        if job is None:
            return _error(TIError(f"no job {job_id}"), 404)
        job.stop()
        return {"job_id": job_id, "stopping": job.status.running}

    route("/embeddings", embeddings, "GET")
    route("/inspect/{name}", inspect, "GET")
    route("/inspect", inspect_post, "POST")
    route("/create", create, "POST")
    route("/merge", merge, "POST")
    route("/train", train, "POST")
    route("/jobs/{job_id}", job_status, "GET")
    route("/jobs/{job_id}/stop", job_stop, "POST")
