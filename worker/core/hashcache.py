"""A template-hash cache shared by every process on the host and kept across restarts.

An entry is keyed by what changes whenever a file's bytes can have changed (device, inode, size, mtime and
ctime in ns): `touch -d` restores an mtime but never a ctime. Entries are small JSON files written by
rename, so a reader sees a whole entry or none; a damaged entry is a miss, never a wrong hash. Computing a
missing hash is single-flight across processes: one flock per file, re-checked once held.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from worker.core import locks
from worker.errors import FilesystemError

log = logging.getLogger(__name__)

_HEX64 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class FileKey:
    dev: int
    ino: int
    size: int
    mtime_ns: int
    ctime_ns: int

    @classmethod
    def of(cls, st: os.stat_result) -> FileKey:
        return cls(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)

    @property
    def file_prefix(self) -> str:
        return f"{self.dev}-{self.ino}-"

    @property
    def entry_name(self) -> str:
        return f"{self.file_prefix}{self.size}-{self.mtime_ns}-{self.ctime_ns}.json"


class HashCache:
    """Memory in front, a directory of entries behind; safe to share between threads and processes."""

    def __init__(self, directory: Path) -> None:
        self._dir = directory
        self._memory: dict[FileKey, str] = {}
        self._mutex = threading.Lock()

    @property
    def directory(self) -> Path:
        return self._dir

    def get(self, key: FileKey) -> str | None:
        with self._mutex:
            hit = self._memory.get(key)
        if hit is not None:
            return hit
        digest = self._read_entry(key)
        if digest is not None:
            with self._mutex:
                self._memory[key] = digest
        return digest

    def get_or_compute(self, key: FileKey, compute: Callable[[], str]) -> tuple[str, bool]:
        """The digest for `key` and whether this call computed it; concurrent callers compute once."""
        hit = self.get(key)
        if hit is not None:
            return hit, False
        with contextlib.ExitStack() as held:
            try:
                held.enter_context(locks.exclusive(self._dir / "locks" / f"{key.dev}-{key.ino}.lock"))
            except FilesystemError as exc:
                # A read-only clones dir (an operator listing stacks) still gets answers, not shared ones.
                log.warning("hash cache %s not usable (%s); hashing without it", self._dir, exc)
                return compute(), True
            hit = self.get(key)
            if hit is not None:
                return hit, False
            digest = compute()
            self.put(key, digest)
            return digest, True
        raise AssertionError("unreachable")  # pragma: no cover

    def put(self, key: FileKey, digest: str) -> None:
        with self._mutex:
            self._memory[key] = digest
        body = json.dumps({"key": asdict(key), "sha256": digest}, sort_keys=True)
        tmp = self._dir / f".{key.entry_name}.{os.getpid()}.{threading.get_ident()}.tmp"
        try:
            self._dir.mkdir(parents=True, exist_ok=True)
            tmp.write_text(body, encoding="ascii")
            tmp.replace(self._dir / key.entry_name)
        except OSError as exc:
            log.warning("could not persist hash cache entry %s: %s", key.entry_name, exc)
            with contextlib.suppress(OSError):
                tmp.unlink()
            return
        self._prune(key)

    def _read_entry(self, key: FileKey) -> str | None:
        try:
            raw = (self._dir / key.entry_name).read_text(encoding="ascii")
            data = json.loads(raw)
        except (OSError, ValueError):
            return None
        if not isinstance(data, dict) or data.get("key") != asdict(key):
            return None
        digest = data.get("sha256")
        if isinstance(digest, str) and _HEX64.fullmatch(digest):
            return digest
        return None

    def _prune(self, key: FileKey) -> None:
        """Drop entries for older states of the same file, so a rotated template leaves no garbage."""
        with contextlib.suppress(OSError):
            for entry in os.scandir(self._dir):
                if entry.name.startswith(key.file_prefix) and entry.name != key.entry_name:
                    with contextlib.suppress(OSError):
                        os.unlink(entry.path)
