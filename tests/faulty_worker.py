"""`celery -A tests.faulty_worker worker`: the real app, with clone copies failing with EIO a set number of
times (FAULT_EIO_COUNT, counted across pool processes in FAULT_DIR). Lets a test watch real retries."""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Any

from worker.celery import app
from worker.core import cloning
from worker.errors import FilesystemError

__all__ = ["app"]

_real_clone_fd = cloning.clone_fd


def _flaky_clone_fd(src: int, dst: int, **kw: Any) -> cloning.CloneMethod:
    counter = Path(os.environ["FAULT_DIR"]) / "eio-failures"
    failed = len(counter.read_text()) if counter.exists() else 0
    if failed < int(os.environ.get("FAULT_EIO_COUNT", "0")):
        with counter.open("a") as f:
            f.write("x")
        raise FilesystemError.from_os(OSError(errno.EIO, "Input/output error"), op="copy", path=kw["dst_path"])
    return _real_clone_fd(src, dst, **kw)


cloning.clone_fd = _flaky_clone_fd  # type: ignore[assignment]
