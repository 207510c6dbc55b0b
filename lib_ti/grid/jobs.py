"""What the Compare action and ``POST /ti/v1/grid`` do: a grid job under the one job manager, rendered
through the host's txt2img inside its GPU lock (queued behind generations, never beside training).

No gradio and no host imports: the host is the :class:`~lib_ti.hostinfo.HostServices` the service has.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from lib_ti.embedding import KIND_LABELS, Embedding
from lib_ti.errors import TIError, short_repr
from lib_ti.grid import layout
from lib_ti.grid.options import MAX_CELLS, PLACEHOLDER, GridRequest, defaults, grid_request
from lib_ti.hostinfo import Generation, HostServices
from lib_ti.io.formats import read_embedding
from lib_ti.names import checkpoint_label, without_hash
from lib_ti.training.jobs import Job, JobManager
from lib_ti.training.recipes import KIND_RECIPES

logger = logging.getLogger(__name__)

#: where grids are written, under the host's textual-inversion log folder
GRID_FOLDER = "grids"
_SNAPSHOT = r"^{name}-(\d+)\.(safetensors|pt)$"


@dataclass
class Row:
    """One row: an embedding (by the name the prompt uses), one prompt and one seed."""

    label: str
    name: str
    embedding: Embedding
    prompt: str
    seed: int
    #: registered with the host for this row's images only (a snapshot); else the host's own database
    temporary: bool
    #: the file it was read from
    file: str = ""


def same_checkpoint(a: str, b: str) -> bool:
    return a == b or without_hash(a) == without_hash(b)


def snapshots(log_dir: str | Path, name: str) -> dict[int, Path]:
    """A training run's snapshot files by step (``<log>/<name>/<name>-<step>.safetensors|.pt``)."""
    folder = Path(log_dir) / name
    pattern = re.compile(_SNAPSHOT.format(name=re.escape(name)))
    found: dict[int, Path] = {}
    if folder.is_dir():
        for p in sorted(folder.iterdir()):
            m = pattern.match(p.name)
            if m and p.is_file():
                found.setdefault(int(m.group(1)), p)
    return dict(sorted(found.items()))


class GridService:
    """Comparison grids over the service's host, job manager and embeddings folder."""

    def __init__(self, host: HostServices, jobs: JobManager, find_file: Callable[[str], Path]) -> None:
        self.host = host
        self.jobs = jobs
        self.find_file = find_file

    def available(self) -> str | None:
        """Why this host cannot make grids (None: it can)."""
        if self.host.generate is None or self.host.load_checkpoint is None:
            return f"{self.host.label} offers no txt2img to extensions that this tab can drive"
        return None

    def options(self) -> dict[str, Any]:
        """The host's checkpoints, the loaded one, and every default (for the view and ``GET /ti/v1/grid``)."""
        try:
            checkpoints, loaded = self.host.checkpoints(), self.host.checkpoint()
        except Exception:  # a host whose checkpoint list cannot be read still shows the view
            logger.exception("the host's checkpoint list cannot be read")
            checkpoints, loaded = [], ""
        return {
            "checkpoints": checkpoints,
            "loaded": loaded,
            "defaults": defaults(),
            "available": self.available(),
        }

    def request(self, given: Mapping[str, Any] | GridRequest) -> tuple[GridRequest, list[Row]]:
        """A checked request and its rows; TIError naming the problem."""
        why = self.available()
        if why:
            raise TIError(why)
        req = given if isinstance(given, GridRequest) else grid_request(given)
        known = self.host.checkpoints()
        titles = []
        for title in req.checkpoints:
            found = [k for k in known if same_checkpoint(k, title)]
            if not found:
                msg = f"checkpoint {short_repr(title)} is not one of this web UI's: {', '.join(known) or 'none'}"
                raise TIError(msg)
            titles.append(found[0])
        req = replace(req, checkpoints=tuple(titles))
        rows = self.rows(req)
        total = len(rows) * len(req.columns)  # rows hold every prompt and seed already
        if total > MAX_CELLS:
            msg = f"the grid would have {total} images; at most {MAX_CELLS} (fewer rows, columns, prompts or seeds)"
            raise TIError(msg)
        return req, rows

    def rows(self, req: GridRequest) -> list[Row]:
        """Embeddings from the folder (the host's database has them), then the run's snapshots."""
        entries: list[tuple[str, Embedding, bool, Path]] = []
        for name in req.embeddings:
            path = self.find_file(name)
            entries.append((name, read_embedding(path, name), False, path))
        if req.run:
            found = snapshots(self.host.log_dir(), req.run)
            if not found:
                msg = f"no snapshots of a training run {req.run!r} (set 'snapshot every' when training)"
                raise TIError(msg)
            steps = req.run_steps or tuple(found)
            missing = [s for s in steps if s not in found]
            if missing:
                msg = f"run {req.run!r} has no snapshot at step {missing[0]}; it has {', '.join(map(str, found))}"
                raise TIError(msg)
            for step in steps:
                name = f"{req.run}-{step}"
                entries.append((name, read_embedding(found[step], name), True, found[step]))
        rows = []
        for name, emb, temporary, path in entries:
            for i, prompt in enumerate(req.prompts):
                for seed in req.seeds:
                    parts = [name]
                    if len(req.prompts) > 1:
                        parts.append(f"prompt {i + 1}")
                    if len(req.seeds) > 1:
                        parts.append(f"seed {seed}")
                    rows.append(
                        Row(
                            " · ".join(parts),
                            name,
                            emb,
                            prompt.replace(PLACEHOLDER, name),
                            seed,
                            temporary,
                            str(path),
                        )
                    )
        return rows

    def start(
        self, given: Mapping[str, Any] | GridRequest, *, task_id: str = "", background: bool = True
    ) -> Job:
        """Start a grid job; BusyError at once while another job (training, Prepare) is running."""
        req, rows = self.request(given)
        title = ", ".join(dict.fromkeys(r.name for r in rows))
        return self.jobs.submit(
            "grid", title[:80], lambda job: self._run(job, req, rows, task_id), background=background
        )

    def _column_label(self, title: str, cfg: float, req: GridRequest) -> str:
        """The checkpoint's short name when the columns change checkpoints (or nothing changes), the CFG
        scale when they change it."""
        parts = [checkpoint_label(title)] if req.checkpoints or len(req.cfg_scales) == 1 else []
        if len(req.cfg_scales) > 1:
            parts.append(f"CFG {cfg:g}")
        return " · ".join(parts)

    def _run(self, job: Job, req: GridRequest, rows: list[Row], task_id: str) -> None:
        st = job.status
        columns = req.columns
        st.total = len(rows) * len(columns)
        if task_id:
            self.host.progress_queued(task_id)
        st.message = "waiting for the GPU (a generation is running)"
        with self.host.exclusive():
            if job.stop_event.is_set():
                st.state, st.message = "stopped", "stopped before the first image"
                return
            # the checkpoint the web UI's dropdown shows (Forge loads it on first use)
            before = self.host.selected_checkpoint() or self.host.checkpoint()
            picture = layout.GridPicture(
                rows=[r.label for r in rows],
                columns=[self._column_label(c or before, s, req) for c, s in columns],
                title=f"{job.status.name} · {len(rows)} × {len(columns)}",
            )
            self.host.progress_begin(f"Grid: {picture.title}", st.total, task_id)
            self.host.progress_jobs(st.total)
            started = time.perf_counter()
            stopped = False
            try:
                stopped = self._cells(job, req, rows, picture, before, started)
            finally:
                try:
                    self._restore(before, st)
                finally:
                    self.host.progress_end(task_id)
                    out = (
                        Path(self.host.log_dir())
                        / GRID_FOLDER
                        / f"grid-{time.strftime('%Y%m%d-%H%M%S')}-{job.id}.png"
                    )
                    st.file = str(layout.write(picture, out))
        made = sum(1 for c in picture.cells.values() if c.image is not None)
        st.report = {"rows": picture.rows, "columns": picture.columns, "images": made,
                     "notes": sorted({c.note for c in picture.cells.values() if c.note})}  # fmt: skip
        st.eta_seconds = 0.0
        if stopped:
            st.state = "stopped"
            st.message = f"stopped: {made} of {st.total} images in {Path(st.file).name}"
        else:
            st.message = f"{made} of {st.total} images in {Path(st.file).name}"

    def _restore(self, before: str, st: Any) -> None:
        """Load the checkpoint the dropdown shows (the one before the grid, or one the user picked while it
        ran: the grid's loads leave the dropdown alone)."""
        load = self.host.load_checkpoint
        target = self.host.selected_checkpoint() or before
        if load is not None and not same_checkpoint(self.host.checkpoint(), target):
            st.message = f"loading {checkpoint_label(target)} again"
            load(target)

    def _cells(
        self,
        job: Job,
        req: GridRequest,
        rows: list[Row],
        picture: layout.GridPicture,
        before: str,
        started: float,
    ) -> bool:
        """Render every cell, column by column (one load per column); True when stopped."""
        st = job.status
        generate = self.host.generate
        if generate is None or self.host.load_checkpoint is None:  # checked in request()
            raise TIError(self.available() or "no txt2img")
        for c, (title, cfg) in enumerate(req.columns):
            title = title or before
            problem = ""
            if not same_checkpoint(self.host.checkpoint(), title):
                st.message = f"loading {checkpoint_label(title)}"
                try:
                    self.host.load_checkpoint(title)
                except Exception as e:  # a checkpoint that cannot load spoils its column, not the grid
                    logger.exception("grid: %s cannot be loaded", title)
                    problem = f"{checkpoint_label(title)} did not load: {e}"
            kind = "" if problem else self._kind()
            status = self.host.embedding_status() if not problem else {}
            for r, row in enumerate(rows):
                if job.stop_event.is_set() or self.host.interrupted():
                    return True  # the job's state changes once the checkpoint is back and the grid written
                note = problem or self._unusable(row, kind, status)
                cell = layout.Cell(r, c, note=note)
                if not note:
                    size = int(KIND_RECIPES.get(kind, {}).get("resolution", 512))
                    what = Generation(
                        prompt=row.prompt, negative_prompt=req.negative_prompt, seed=row.seed, cfg_scale=cfg,
                        steps=req.steps, width=req.width or size, height=req.height or size, sampler=req.sampler,
                        embeddings={row.name: row.embedding} if row.temporary else {},
                        files={row.name: row.file} if row.temporary else {},
                    )  # fmt: skip
                    try:
                        cell.image, cell.infotext = generate(what)
                    except TIError as e:
                        cell.note = str(e)
                    if self.host.interrupted():  # the host decodes a half-denoised image then
                        cell.image, cell.note = None, "interrupted"
                    elif cell.image is None and not cell.note:
                        cell.note = "the web UI made no image"
                picture.cells[(r, c)] = cell
                st.step += 1
                elapsed = time.perf_counter() - started
                st.eta_seconds = round(elapsed / st.step * (st.total - st.step), 1)
                st.message = f"{st.step}/{st.total}: {row.label} on {picture.columns[c]}"
        return False

    def _kind(self) -> str:
        try:
            return self.host.build_parts().kind
        except TIError as e:
            logger.warning("grid: the loaded model's kind is unknown (%s)", e)
            return ""

    @staticmethod
    def _unusable(row: Row, kind: str, status: Mapping[str, str]) -> str:
        """Why the row's embedding cannot work on the loaded model ("" when it can)."""
        # the hosts read an SD3 file's CLIP-L and CLIP-G as SDXL (T5 unused)
        own = "sdxl" if row.embedding.kind == "sd3" else row.embedding.kind
        if kind and own != kind:
            have = KIND_LABELS.get(row.embedding.kind, row.embedding.kind).split(" (")[0]
            want = KIND_LABELS.get(kind, kind).split(" (")[0]
            return f"{have} embedding: not usable on this {want} checkpoint"
        if not row.temporary and status and status.get(row.name) != "loaded":
            if status.get(row.name) == "skipped":
                return "the web UI skipped this embedding on this checkpoint"
            return "the web UI has not loaded this embedding (is its file readable by the web UI?)"
        return ""
