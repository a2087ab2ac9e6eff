"""Our own record of a clone, `.clone.json` beside the seed's two files: {vm_id, stack, created}.

The seed's layout says which bytes a clone holds (the stamp) but not which stack it was made from, nor
when: the inventory needs both (which stack, is it stale, how old is it, may reconcile take it). The record
is a hint, never a reason to fail: a missing, empty or damaged record reads as none, as for a clone the
seed made, and the inventory then infers what it can.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from worker.core import fsops
from worker.core.layout import CLONE_RECORD_FILE, CLONE_STAMP_FILE
from worker.errors import RootfsError


def read_record(dir_fd: int, vm_dir: Path) -> dict[str, Any] | None:
    """The VM directory's record, None when there is no usable one."""
    try:
        raw = fsops.read_text(dir_fd, CLONE_RECORD_FILE, vm_dir)
    except (RootfsError, UnicodeDecodeError):  # unreadable, or damaged into bytes that are not UTF-8
        return None
    return parse_record(raw)


def parse_record(raw: str | None) -> dict[str, Any] | None:
    if not raw:
        return None
    try:
        data = json.loads(raw)
    except ValueError:
        return None
    return data if isinstance(data, dict) else None


def write_record(dir_fd: int, vm_dir: Path, *, vm_id: str, stack: str, adopted: bool, fresh: bool = False) -> None:
    """Record the clone unless the record already says the same (not looked for in a `fresh` directory, one
    just made). For an adopted clone (one made before us, by the seed or an older worker) "created" is its
    stamp's mtime: both write the stamp right after the copy.

    Not flushed on its own (no fsync more on the clone path): after a power cut the record may come back
    empty, which reads as none.
    """
    record = None if fresh else read_record(dir_fd, vm_dir)
    if record is not None and record.get("vm_id") == vm_id and record.get("stack") == stack:
        return
    created = _stamp_mtime(dir_fd) if adopted else None
    body = {"vm_id": vm_id, "stack": stack, "created": created if created is not None else time.time()}
    data = json.dumps(body, sort_keys=True, ensure_ascii=False).encode("utf-8", "surrogatepass")
    if fresh:
        fsops.write_new(dir_fd, CLONE_RECORD_FILE, data, vm_dir)
    else:
        fsops.write_atomic(dir_fd, CLONE_RECORD_FILE, data, vm_dir, durable=False)


def _stamp_mtime(dir_fd: int) -> float | None:
    try:
        return os.stat(CLONE_STAMP_FILE, dir_fd=dir_fd, follow_symlinks=False).st_mtime
    except OSError:
        return None
