"""Helpers shared by the tab's views: messages, the embedding card, the service."""

from __future__ import annotations

import html
import logging
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from lib_ti.embedding import KIND_LABELS, Embedding
from lib_ti.errors import TIError
from lib_ti.hostinfo import HostInfo
from lib_ti.text.prompt import CHUNK_LENGTH

logger = logging.getLogger(__name__)

#: tokens in one prompt chunk
CHUNK = CHUNK_LENGTH
NEAREST_HEADERS = ["encoder", "vector", "nearest tokens (cosine)"]


def error_html(e: Exception | str) -> str:
    return f"<span class='ti-error'>⚠ {html.escape(str(e))}</span>"


def warn_html(text: str) -> str:
    return f"<span class='ti-warn'>ℹ {html.escape(str(text))}</span>"


def ok_html(text: str) -> str:
    return f"<span class='ti-ok'>✔ {html.escape(text)}</span>"


def get_service(host: HostInfo) -> Any:
    """The host's service, or a TIError saying why there is none."""
    if host.service is None:
        msg = f"creating, merging and training are not available on this host ({host.name})"
        raise TIError(msg)
    return host.service()


#: how often a view re-reads a running job's status
POLL_SECONDS = 1.0
T = TypeVar("T")


def find_job(host: HostInfo, job_id: str, kind: str) -> Any:
    """The job ``job_id`` if it is a ``kind`` job (else None, also when the host has no service)."""
    try:
        job = get_service(host).jobs.get(job_id) if job_id else None
    except TIError:
        return None
    return job if job is not None and job.status.kind == kind else None


def follow(job: Any, snapshot: Callable[[], T]) -> Iterator[T]:
    """``snapshot()`` every :data:`POLL_SECONDS` while ``job`` runs, and once more when it has ended."""
    while job is not None and job.status.running:
        yield snapshot()
        time.sleep(POLL_SECONDS)
    yield snapshot()


def model_error(e: Exception) -> str:
    """A message for an exception from the loaded model (none loaded yet, an unknown model type...)."""
    if isinstance(e, TIError):
        return error_html(e)
    logger.warning("model access failed: %s", e, exc_info=True)
    return error_html(f"the loaded model cannot be used ({type(e).__name__}: {e})")


def nearest_rows(nearest: dict[str, list[list[dict[str, Any]]]]) -> list[list[object]]:
    """Table rows ``[encoder, vector, "tok (0.93), tok (0.81), ..."]``."""
    rows: list[list[object]] = []
    for enc, per_vector in nearest.items():
        for i, found in enumerate(per_vector):
            rows.append([enc, i, ", ".join(f"{n['text']} ({n['score']:.2f})" for n in found)])
    return rows


def card_markdown(
    emb: Embedding, file_name: str, nearest: dict[str, list[list[dict[str, Any]]]] | None
) -> str:
    """What the Create and Merge views show after a save."""
    lines = [
        f"### {emb.name}",
        (
            f"- **{KIND_LABELS[emb.kind]}**, {emb.num_vectors} vector(s): uses {emb.num_vectors} of the {CHUNK} "
            "tokens of a prompt chunk"
        ),
        f"- file: `{file_name}`",
        f"- in a prompt: `{emb.name}`",
    ]
    if nearest:
        lines.append("- nearest tokens:")
        for enc, per_vector in nearest.items():
            for i, found in enumerate(per_vector):
                words = ", ".join(f"`{n['text']}`" for n in found[:3])
                lines.append(f"  - {enc} vector {i}: {words}")
    return "\n".join(lines)
