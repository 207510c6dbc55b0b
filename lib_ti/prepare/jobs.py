"""What the Prepare view and the REST API do: start a Prepare job (under the one job manager training
uses, so the two never overlap), and read and edit a folder's captions.

No gradio and no host imports: the host is the :class:`~lib_ti.hostinfo.HostServices` the service has.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from PIL import Image

from lib_ti.errors import TIError, short_repr
from lib_ti.hostinfo import HostServices
from lib_ti.prepare import caption_edit
from lib_ti.prepare.errors import PrepareError
from lib_ti.prepare.options import NO_CAPTIONER, WD_TAGGER, PrepareRequest, prepare_request
from lib_ti.prepare.pipeline import Captioner, PrepareHooks, check_folders, run_prepare
from lib_ti.prepare.tagger import WD_MODELS, TaggerDeps, WdTagger
from lib_ti.training.jobs import Job, JobManager
from lib_ti.training.options import TrainRequest
from lib_ti.training.recipes import KIND_RECIPES

logger = logging.getLogger(__name__)

#: the folder under the host's models folder where the WD taggers' files are kept
TAGGER_FOLDER = "ti-taggers"
#: the caption editor's operations (``POST /ti/v1/captions``'s ``op``) and the fields each needs
CAPTION_OPS: dict[str, tuple[str, ...]] = {
    "replace": ("find",),
    "remove_tag": ("tag",),
    "rename_tag": ("tag", "new_tag"),
    "sort_tags": (),
    "add_tags": ("tags",),
    "set": ("captions",),
    "undo": (),
}
#: captioners for people
CAPTIONER_LABELS = {
    NO_CAPTIONER: "none (keep the pictures' own captions)",
    WD_TAGGER: "WD tagger (ONNX; installs onnxruntime and fetches the model on first use)",
    "blip": "BLIP (the web UI's interrogator: a sentence)",
    "deepbooru": "DeepBooru (the web UI's interrogator: tags)",
}


class PrepareService:
    """Prepare jobs and caption edits, over the service's host and job manager."""

    def __init__(self, host: HostServices, jobs: JobManager) -> None:
        self.host = host
        self.jobs = jobs
        #: how the WD tagger fetches its files and installs onnxruntime (tests replace it)
        self.tagger_deps = TaggerDeps()

    # ------------------------------------------------------------------ what the host offers
    def captioners(self) -> list[str]:
        """The captioners this host can run: none, the WD tagger, then the host's interrogators."""
        return [NO_CAPTIONER, WD_TAGGER, *self.host.interrogators()]

    def captioner_note(self) -> str:
        """Which of the host's interrogators are missing, for the view ("" when it has both)."""
        missing = [n for n in ("blip", "deepbooru") if n not in self.host.interrogators()]
        if not missing:
            return ""
        names = " and ".join(n.upper() if n == "blip" else "DeepBooru" for n in missing)
        return f"{self.host.label} has no {names} interrogator; the WD tagger works everywhere."

    def upscalers(self) -> list[str]:
        """The host's upscalers a small picture may be enlarged with ("": Lanczos)."""
        try:
            return list(self.host.upscalers())
        except Exception:
            logger.exception("the host's upscaler list cannot be read")
            return []

    def options(self) -> dict[str, Any]:
        """What a client may choose: captioners, upscalers, tagger models, and every default."""
        return {
            "captioners": {name: CAPTIONER_LABELS.get(name, name) for name in self.captioners()},
            "captioner_note": self.captioner_note(),
            "upscalers": self.upscalers(),
            "tagger_models": list(WD_MODELS),
            "defaults": {
                k: v
                for k, v in asdict(PrepareRequest("", "")).items()
                if k not in ("source_dir", "output_dir")
            },
        }

    # ------------------------------------------------------------------ a run
    def resolution(self, kind: str | None) -> int:
        """The bucket resolution of a model kind's training recipe (SD1 512, SD2 768, SDXL 1024)."""
        return int(KIND_RECIPES.get(kind or "", {}).get("resolution", TrainRequest.resolution))

    def request(
        self, given: Mapping[str, Any] | PrepareRequest, loaded_kind: Callable[[], str]
    ) -> PrepareRequest:
        """A checked request, its resolution decided (0: the loaded model's); TIError naming a problem."""
        req = given if isinstance(given, PrepareRequest) else prepare_request(given)
        if req.captioner not in self.captioners():
            msg = f"captioner {short_repr(req.captioner)}: this web UI offers {', '.join(self.captioners())}"
            raise TIError(msg)
        if req.captioner == WD_TAGGER and req.tagger_model not in WD_MODELS:
            msg = f"tagger_model {short_repr(req.tagger_model)}: one of {', '.join(WD_MODELS)}"
            raise TIError(msg)
        if req.upscaler and req.upscaler not in self.upscalers():
            msg = f"upscaler {short_repr(req.upscaler)} is not one of this web UI's: {', '.join(self.upscalers()) or 'none'} (empty: Lanczos)"
            raise TIError(msg)
        if not req.resolution:
            try:
                kind = loaded_kind()
            except TIError as e:
                msg = f"choose a resolution: the loaded model's cannot be known ({e})"
                raise TIError(msg) from None
            req = replace(req, resolution=self.resolution(kind))
        check_folders(req)
        return req

    def start(
        self,
        given: Mapping[str, Any] | PrepareRequest,
        loaded_kind: Callable[[], str],
        *,
        task_id: str = "",
        background: bool = True,
    ) -> Job:
        """Start a Prepare job; BusyError at once while another job (a training run) is running."""
        req = self.request(given, loaded_kind)
        name = Path(req.output_dir.strip()).name or req.output_dir
        return self.jobs.submit(
            "prepare", name, lambda job: self._run(job, req, task_id), background=background
        )

    def _captioner(self, req: PrepareRequest, report: Callable[[str], None]) -> Captioner | None:
        if req.captioner == NO_CAPTIONER:
            return None
        if req.captioner == WD_TAGGER:
            args = req.tagger_args()
            models = str(Path(self.host.models_dir() or ".") / TAGGER_FOLDER)
            # loaded per run and let go with it: a CUDA session holds GPU memory the web UI needs
            tagger = WdTagger.load(models, args, self.tagger_deps, report)
            return lambda images: tagger.tag(images, args)
        interrogate = self.host.interrogate
        if interrogate is None:
            msg = f"{self.host.label} has no interrogator {req.captioner!r}"
            raise PrepareError(msg)
        name = req.captioner

        def run(images: list[Image.Image]) -> list[str]:
            try:
                return interrogate(name, images)
            except Exception as e:
                msg = f"the web UI's {name} interrogator failed ({type(e).__name__}: {e})"
                raise PrepareError(msg) from e

        return run

    def _run(self, job: Job, req: PrepareRequest, task_id: str) -> None:
        st = job.status
        clock: list[float] = []  # when the first picture was done: installs and downloads are not in the ETA

        def say(message: str) -> None:
            st.message = message
            self.host.progress_update(st.step, message)

        if task_id:
            self.host.progress_queued(task_id)
        self.host.progress_begin(f"Preparing {Path(req.output_dir).name}", 0, task_id)
        try:
            caption = self._captioner(req, say)

            def progress(done: int, total: int, text: str) -> None:
                if total != st.total:
                    st.total = total
                    self.host.progress_total(total)
                if not clock:
                    clock.extend([time.perf_counter(), done])
                elapsed, counted = time.perf_counter() - clock[0], done - clock[1]
                st.step = done
                st.eta_seconds = round(elapsed / counted * (total - done), 1) if counted > 0 else None
                st.message = text
                self.host.progress_update(done, text)

            upscale = None
            if req.upscaler and self.host.upscale is not None:
                host_upscale, name = self.host.upscale, req.upscaler

                def upscale(img: Image.Image, scale: float) -> Image.Image:
                    return host_upscale(img, name, scale)

            report = run_prepare(
                req,
                PrepareHooks(
                    progress=progress,
                    should_stop=lambda: job.stop_event.is_set() or self.host.interrupted(),
                    upscale=upscale,
                    caption=caption,
                    exclusive=self.host.exclusive,
                ),
            )
        finally:
            self.host.progress_end(task_id)
        st.report = asdict(report)
        st.file = report.output_dir
        st.message = report.summary()
        st.eta_seconds = 0.0
        if report.caption_error:
            st.state = "failed"
        elif report.stopped:
            st.state = "stopped"

    # ------------------------------------------------------------------ captions
    def captions(self, folder: str) -> dict[str, Any]:
        """The folder's images with their captions, and its tag frequency list."""
        entries = caption_edit.list_captions(folder)
        return {
            "folder": folder,
            "images": [asdict(e) for e in entries],
            "tags": [[tag, n] for tag, n in caption_edit.tag_frequency(entries)],
        }

    def _refuse_if_writing(self, folder: str) -> None:
        job = self.jobs.current
        if job is None or not job.status.running or job.status.kind != "prepare":
            return
        msg = f"a Prepare job (job {job.id}) is writing; edit the captions when it has finished"
        raise PrepareError(msg)

    def edit_captions(self, folder: str, op: str, **args: Any) -> dict[str, Any]:
        """One caption-editor operation (:data:`CAPTION_OPS`) on ``folder``; the result and the new list."""
        if op not in CAPTION_OPS:
            msg = f"unknown caption operation {short_repr(op)}; one of {', '.join(CAPTION_OPS)}"
            raise PrepareError(msg)
        missing = [name for name in CAPTION_OPS[op] if args.get(name) is None]
        if missing:
            msg = f"the caption operation {op} needs {' and '.join(missing)}"
            raise PrepareError(msg)
        self._refuse_if_writing(folder)
        if op == "replace":
            result = caption_edit.replace_text(
                folder, args["find"], args.get("replace", ""), regex=bool(args.get("regex"))
            )
        elif op == "remove_tag":
            result = caption_edit.remove_tag(folder, args["tag"])
        elif op == "rename_tag":
            result = caption_edit.rename_tag(folder, args["tag"], args["new_tag"])
        elif op == "sort_tags":
            result = caption_edit.sort_tags(folder)
        elif op == "add_tags":
            result = caption_edit.add_tags(folder, args["tags"], at_start=bool(args.get("at_start", True)))
        elif op == "set":
            result = caption_edit.set_captions(folder, dict(args["captions"]))
        else:
            result = caption_edit.undo(folder)
        return {**asdict(result), **self.captions(folder)}
