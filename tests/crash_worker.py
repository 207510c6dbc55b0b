"""A training run in a process of its own, for the crash tests:
``python -m tests.crash_worker ROOT NAME STEPS POINT_EVERY``.

Trains the embedding ``NAME`` of ``ROOT/embeddings`` on ``ROOT/data`` through the service with an
automatic resume point every ``POINT_EVERY`` steps (the ``ti_resume_every`` setting), logs in
``ROOT/logs``. The test kills it with SIGKILL mid-run.
"""

from __future__ import annotations

import sys
import threading
from pathlib import Path

from lib_ti.hostinfo import HostServices
from lib_ti.service import Service

from . import conftest  # noqa: F401  (torchvision's operators for open_clip)
from . import train_models as tm

#: the request both the killed run and the uninterrupted one get
REQUEST = {"template": "subject_filewords", "batch_size": 1, "grad_accum": 2, "resolution": 64,
           "validation_every": 40, "lr": "2e-2", "seed": 3}  # fmt: skip


def service(root: Path, point_every: int = 100) -> Service:
    parts = tm.make_parts("sd1")
    options = {"ti_resume_every": point_every}
    return Service(
        HostServices(
            embeddings_dir=lambda: str(root / "embeddings"),
            log_dir=lambda: str(root / "logs"),
            build_parts=lambda: parts,
            reload_embeddings=lambda: None,
            exclusive=threading.Lock,
            get_option=lambda key, default: options.get(key, default),
        )
    )


def main() -> None:
    root, name, steps, point_every = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    job = service(root, point_every).start_training(
        {"embedding": name, "dataset_dir": str(root / "data"), "steps": steps, **REQUEST}, background=False
    )
    print(job.status.state, job.status.step, flush=True)


if __name__ == "__main__":
    main()
