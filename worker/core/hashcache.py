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
from worker.core.fsops import OPEN_DIR, close, read_small_file
from worker.errors import FilesystemError

log = logging.getLogger(__name__)

_HEX64 = re.compile(r"[0-9a-f]{64}")
#: An entry is ~200 bytes of JSON; anything much bigger is not one of ours.
_ENTRY_LIMIT = 4096
_TMP_SUFFIX = ".tmp"


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
        """Persist an entry, best effort (not flushed: after a power cut an entry is whole, empty or absent,
        and anything but a whole one reads as a miss)."""
        with self._mutex:
            self._memory[key] = digest
        body = json.dumps({"key": asdict(key), "sha256": digest}, sort_keys=True).encode("ascii")
        tmp = f".{key.entry_name}.{os.getpid()}.{threading.get_ident()}{_TMP_SUFFIX}"
        try:
            self._dir.mkdir(parents=True, exist_ok=True)
            dir_fd = os.open(self._dir, OPEN_DIR)
        except OSError as exc:
            log.warning("could not persist hash cache entry %s: %s", key.entry_name, exc)
            return
        try:
            self._sweep_temp_files(dir_fd, prefix=f".{key.entry_name}.")
            try:
                fd = os.open(
                    tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644, dir_fd=dir_fd
                )
                try:
                    view = memoryview(body)
                    while view:
                        view = view[os.write(fd, view) :]
                finally:
                    close(fd)
                os.rename(tmp, key.entry_name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
            except OSError as exc:
                log.warning("could not persist hash cache entry %s: %s", key.entry_name, exc)
                with contextlib.suppress(OSError):
                    os.unlink(tmp, dir_fd=dir_fd)
                return
            self._prune(dir_fd, key)
        finally:
            close(dir_fd)

    def sweep_temp_files(self) -> None:
        """Delete temporary entries whose writer died before renaming them (a killed warm-up)."""
        try:
            dir_fd = os.open(self._dir, OPEN_DIR)
        except OSError:
            return
        try:
            self._sweep_temp_files(dir_fd, prefix=".")
        finally:
            close(dir_fd)

    @staticmethod
    def _sweep_temp_files(dir_fd: int, *, prefix: str) -> None:
        with contextlib.suppress(OSError):
            for name in os.listdir(dir_fd):
                if name.startswith(prefix) and name.endswith(_TMP_SUFFIX) and _writer_gone(name):
                    with contextlib.suppress(OSError):
                        os.unlink(name, dir_fd=dir_fd)

    def _read_entry(self, key: FileKey) -> str | None:
        """The entry's digest, None for anything but a small regular file holding a valid entry for `key`:
        a FIFO, a device, a symlink (to /dev/zero, say) or a huge file is a miss, read without blocking,
        without following links and with a size bound."""
        try:
            dir_fd = os.open(self._dir, OPEN_DIR)
        except OSError:
            return None
        try:
            raw = read_small_file(dir_fd, key.entry_name, limit=_ENTRY_LIMIT)
        finally:
            close(dir_fd)
        if raw is None:
            return None
        try:
            data = json.loads(raw.decode("ascii"))
        except ValueError:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
            return None
        if not isinstance(data, dict) or data.get("key") != asdict(key):
            return None
        digest = data.get("sha256")
        if isinstance(digest, str) and _HEX64.fullmatch(digest):
            return digest
        return None

    def _prune(self, dir_fd: int, key: FileKey) -> None:
        """Drop entries for older states of the same file, so a rotated template leaves no garbage."""
        with contextlib.suppress(OSError):
            for name in os.listdir(dir_fd):
                if name.startswith(key.file_prefix) and name != key.entry_name:
                    with contextlib.suppress(OSError):
                        os.unlink(name, dir_fd=dir_fd)


def _writer_gone(name: str) -> bool:
    """Whether the process named in a temp entry's name (`.<entry>.<pid>.<thread>.tmp`) is gone, or the name
    is not one of ours. A recycled pid keeps a temp file until that process is gone too: no harm."""
    parts = name[: -len(_TMP_SUFFIX)].rsplit(".", 2)
    if len(parts) != 3 or not parts[1].isdigit():
        return True
    pid = int(parts[1])
    if pid == os.getpid():
        return False  # maybe another thread of ours, writing right now
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False
    return False
