"""SHA-256 of multi-GB template images at hashing speed, in constant memory.

Three strategies, the same digest and the same errors (default_strategy picks one; bench/hash_bench.py
measures each against `openssl speed` in one run):

- mapped: the bytes are hashed where they lie in the page cache, through a read-only mapping of one window
  at a time: no copy, so a single thread hashes at SHA-256's own speed. A mapping is dangerous twice over:
  a file truncated while mapped, or a page that fails to read from disk, turns the next access into SIGBUS,
  which kills the worker. So it is used only under a read lease (worker.core.lease: no process can open the
  file for writing, let alone truncate it, without first breaking the lease, which `guard` checks before
  every window), and only for windows wholly in the page cache and read in (worker.core.pagecache), which
  need no disk read. Every other window is read as in `serial`.
- serial: one thread, pread into a small buffer, hash it, repeat. The copy costs ~15-20% of a SHA-256
  with SHA-NI.
- threaded: a reader thread fills a ring of buffers while the calling thread hashes; preadv and large
  hashlib updates release the GIL, so the copy overlaps the hashing. Wins only given a spare core.

All skip holes (hashed from a zero buffer, never read) and raise TemplateChanged on a short read.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import os
import stat
import threading
from collections.abc import Callable
from queue import SimpleQueue
from typing import TYPE_CHECKING, Literal, NamedTuple

from worker.core import lease, pagecache
from worker.errors import FilesystemError, TemplateChanged

if TYPE_CHECKING:
    from hashlib import _Hash as Hash

#: Called with (bytes_done, bytes_total).
ProgressFn = Callable[[int, int], None]
#: Called before each window is hashed: raises (TemplateBusy) once a writer wants the file. Given only
#: while the caller holds a read lease on it, which is what makes mapping it safe.
GuardFn = Callable[[], None]

# Measured on a 1 GiB file in the page cache (2-core EPYC with SHA-NI): 1 MiB buffers reach the hashing
# ceiling (~2.1 GB/s); 128-256 KiB lose 6-10% to per-chunk overhead, 2-4 MiB gain nothing. Four of them
# let the reader run ahead while one buffer is being hashed, for 4 MiB of memory in all.
_BUF_SIZE = 1 << 20
_BUF_COUNT = 4
#: The one-thread loop's read size: small enough that the bytes just copied in are still in the core's L2
#: cache when they are hashed; hashlib.file_digest reads 256 KiB for the same reason. Measured on a 2-vCPU
#: Xeon, 25 rotating rounds over 256 MiB in the page cache (best / p90 GB/s): 256 KiB 1.00 / 0.65, 1 MiB
#: 0.90 / 0.57, 128 KiB 0.65 / 0.59, file_digest 0.99 / 0.70, the reader thread 0.85 / 0.58.
_SERIAL_BUF_SIZE = 256 << 10
_PROGRESS_EVERY = 64 << 20
#: The mapped strategy's window, and how often every strategy calls the guard: 32 MiB is ~25 ms of hashing,
#: so a writer waiting for our lease to break waits that long, not for the whole hash (a cold multi-GB
#: template takes seconds); the mapped pages (shared with the page cache, counted in RSS while mapped) add at
#: most 32 MiB to peak RSS, none of it memory of our own. Smaller windows cost speed: per window an mmap, a
#: residency check, the first touch of every page and an munmap. Measured on a 2-vCPU EPYC over 1 GiB in the
#: page cache (best of 3, GB/s): 8 MiB 1.31, 16 MiB 1.37, 32 MiB 1.39, 64 MiB 1.41; one 1 MiB buffer
#: hashed from memory 1.44 (the ceiling).
_WINDOW = 32 << 20


class _Chunk(NamedTuple):
    slot: int
    length: int


class _Zeros(NamedTuple):
    length: int


class _ShortRead(NamedTuple):
    offset: int


class _Failed(NamedTuple):
    error: BaseException


# None on the filled queue: the reader read the whole expected size.
_Message = _Chunk | _Zeros | _ShortRead | _Failed | None

#: Hashed in place of a hole's bytes, which are zeros by definition.
_ZEROS = memoryview(bytes(_BUF_SIZE))
#: A hole is announced in steps of this many bytes, so even a TB-sized hole is a few thousand messages.
_HOLE_STEP = 64 * _BUF_SIZE


def _identity(st: os.stat_result) -> tuple[int, int, int]:
    """What must not change between the start and the end of a read for its hash to mean anything."""
    return (st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _describe_change(before: tuple[int, int, int], after: tuple[int, int, int]) -> str:
    if before[0] != after[0]:
        return f"size went from {before[0]} to {after[0]} bytes"
    return "rewritten in place (mtime/ctime moved)"


def _read_ring(
    fd: int,
    size: int,
    views: list[memoryview],
    free: SimpleQueue[int | None],
    filled: SimpleQueue[_Message],
    stop: threading.Event,
) -> None:
    """Reader thread: every path out of here puts a final message, so the consumer never waits forever.

    Holes are not read: reading one makes the kernel fill page cache with zero pages at ~0.4 GB/s, five
    times slower than hashing, and evicts useful pages. They are sent as `_Zeros` and hashed from memory.
    """
    try:
        offset = 0
        region_end, in_hole = 0, False
        while offset < size:
            if stop.is_set():
                return
            if offset >= region_end:
                region_end, in_hole = _region_at(fd, offset, size)
            if in_hole:
                n = min(_HOLE_STEP, region_end - offset)
                filled.put(_Zeros(n))
                offset += n
                continue
            slot = free.get()
            if slot is None or stop.is_set():
                return
            view = views[slot]
            want = min(len(view), region_end - offset)
            got = 0
            while got < want:
                n = os.preadv(fd, [view[got:want]], offset + got)
                if n == 0:
                    filled.put(_ShortRead(offset + got))
                    return
                got += n
            filled.put(_Chunk(slot, got))
            offset += got
        filled.put(None)
    except BaseException as exc:  # noqa: BLE001 - handed to the consumer, which raises it
        filled.put(_Failed(exc))


def _region_at(fd: int, offset: int, size: int) -> tuple[int, bool]:
    """(end, is_hole) of the data extent or hole that starts at `offset`; all data where seeking is unknown."""
    try:
        data = os.lseek(fd, offset, os.SEEK_DATA)
    except OSError as exc:
        if exc.errno == errno.ENXIO:  # no data after offset: the rest is one hole
            return size, True
        return size, False  # SEEK_DATA unsupported here: read everything
    if data > offset:
        return min(data, size), True
    try:
        hole = os.lseek(fd, offset, os.SEEK_HOLE)
    except OSError:
        return size, False
    return max(min(hole, size), offset + 1), False


Strategy = Literal["serial", "threaded", "mapped"]

#: A reader thread pays off only with a core to spare for it: the copy out of the page cache (~20% of a
#: SHA-256 with SHA-NI) then overlaps the hashing. With two cores or fewer the two threads compete with each
#: other and with the rest of the host (measured on a 2-vCPU Xeon: 0.76x of `openssl speed` threaded, 0.84x
#: serial; docs/benchmarks.md shows both in every run).
THREADED_MIN_CPUS = 3


def default_strategy(*, leased: bool = False) -> Strategy:
    """Mapped for a leased file; else threads where this process may run on at least THREADED_MIN_CPUS
    cores, else one thread."""
    if leased:
        return "mapped"
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    return "threaded" if cpus >= THREADED_MIN_CPUS else "serial"


def hash_fd(
    fd: int,
    *,
    path: str,
    progress: ProgressFn | None = None,
    strategy: Strategy | None = None,
    guard: GuardFn | None = None,
) -> str:
    """Lowercase hex SHA-256 of the whole file behind `fd`, independent of (and not moving) its offset.

    Raises TemplateChanged when the file is truncated, grown or rewritten while it is read: such a hash
    describes no version of the file. `path` only names the file in errors. `guard` is given by a caller
    that holds a read lease on the file (it raises once the lease breaks) and is called before every
    window (every 32 MiB). `strategy` defaults to default_strategy(); all give the same digest and the same errors, and
    without a guard "mapped" reads instead (a mapping is safe only under the lease).
    """
    try:
        st = os.fstat(fd)
    except OSError as exc:
        raise FilesystemError.from_os(exc, op="read", path=path) from exc
    if not stat.S_ISREG(st.st_mode):
        # A pipe or device reports st_size 0 and would hash as empty; refuse rather than lie.
        code = errno.EISDIR if stat.S_ISDIR(st.st_mode) else errno.EINVAL
        raise FilesystemError(op="read", path=path, errno=code, strerror="not a regular file")
    before = _identity(st)
    size = st.st_size
    with contextlib.suppress(OSError):  # advisory: doubles kernel readahead for cold templates
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
    try:
        saved_offset = os.lseek(fd, 0, os.SEEK_CUR)  # SEEK_DATA/SEEK_HOLE move it; callers may rely on it
    except OSError as exc:
        raise FilesystemError.from_os(exc, op="read", path=path) from exc
    digest = hashlib.sha256()
    chosen = strategy or default_strategy(leased=guard is not None)
    check = _Guard(guard)
    try:
        if chosen == "threaded":
            _hash_threaded(fd, size, digest, path, progress, check)
        else:
            _hash_serial(fd, size, digest, path, progress, check, mapped=chosen == "mapped" and guard is not None)
    finally:
        with contextlib.suppress(OSError):
            os.lseek(fd, saved_offset, os.SEEK_SET)

    try:
        after = _identity(os.fstat(fd))
    except OSError as exc:
        raise FilesystemError.from_os(exc, op="read", path=path) from exc
    if after != before:
        raise TemplateChanged(path, _describe_change(before, after))
    if progress is not None:
        progress(size, size)
    return digest.hexdigest()


class _Progress:
    """Calls `progress` every _PROGRESS_EVERY bytes, never at the end (hash_fd reports the end itself)."""

    def __init__(self, progress: ProgressFn | None, size: int) -> None:
        self._progress = progress
        self._size = size
        self._next = _PROGRESS_EVERY

    def __call__(self, done: int) -> None:
        if self._progress is not None and self._next <= done < self._size:
            self._progress(done, self._size)
            self._next = done + _PROGRESS_EVERY


class _Guard:
    """Calls the caller's guard once per _WINDOW bytes hashed (holes included), and never without one."""

    def __init__(self, guard: GuardFn | None) -> None:
        self._guard = guard
        self._next = 0

    def __call__(self, done: int) -> None:
        if self._guard is not None and done >= self._next:
            self._guard()
            self._next = done + _WINDOW


def _hash_serial(
    fd: int, size: int, digest: Hash, path: str, progress: ProgressFn | None, guard: _Guard, *, mapped: bool
) -> None:
    """Window by window: holes hashed from memory, data hashed through a mapping where `mapped` allows it
    and the window is in the page cache, else read into one buffer and hashed, piece by piece. The plain
    read loop is the fastest where no mapping may be used and no core is free for a reader thread."""
    view = memoryview(bytearray(_SERIAL_BUF_SIZE))
    report = _Progress(progress, size)
    offset = 0
    region_end, in_hole = 0, False
    while offset < size:
        guard(offset)
        if offset >= region_end:
            region_end, in_hole = _region_at(fd, offset, size)
        end = min(region_end, offset - offset % _WINDOW + _WINDOW)
        if in_hole:
            while offset < end:
                n = min(_BUF_SIZE, end - offset)
                digest.update(_ZEROS[:n])
                offset += n
                report(offset)
            continue
        if mapped and _hash_mapped(fd, offset, end, digest):
            offset = end
            report(offset)
            continue
        while offset < end:
            want = min(len(view), end - offset)
            try:
                got = os.preadv(fd, [view[:want]], offset)
            except OSError as exc:
                raise FilesystemError.from_os(exc, op="read", path=path) from exc
            if got == 0:
                raise TemplateChanged(path, f"file ended at byte {offset} of {size}")
            digest.update(view[:got])
            offset += got
            report(offset)


def _hash_mapped(fd: int, start: int, end: int, digest: Hash) -> bool:
    """Hash bytes [start, end) through a mapping if they are all in the page cache and up to date; False
    (nothing hashed) if not, or if that cannot be known: the caller reads them instead, which raises what a
    read raises."""
    with pagecache.resident_view(fd, start, end) as view:
        if view is None:
            return False
        digest.update(view)
    return True


def _hash_threaded(fd: int, size: int, digest: Hash, path: str, progress: ProgressFn | None, guard: _Guard) -> None:
    """A reader thread fills a ring of buffers while this thread hashes: reads overlap hashing, given a
    free core."""
    views = [memoryview(bytearray(_BUF_SIZE)) for _ in range(_BUF_COUNT)]
    free: SimpleQueue[int | None] = SimpleQueue()
    filled: SimpleQueue[_Message] = SimpleQueue()
    for slot in range(_BUF_COUNT):
        free.put(slot)
    stop = threading.Event()
    reader = threading.Thread(
        target=_read_ring, args=(fd, size, views, free, filled, stop), name="hash-reader", daemon=True
    )
    report = _Progress(progress, size)
    done = 0
    reader.start()
    try:
        while (message := filled.get()) is not None:
            guard(done)
            if isinstance(message, _Failed):
                if isinstance(message.error, OSError):
                    raise FilesystemError.from_os(message.error, op="read", path=path) from message.error
                raise message.error
            if isinstance(message, _ShortRead):
                raise TemplateChanged(path, f"file ended at byte {message.offset} of {size}")
            if isinstance(message, _Zeros):
                for start in range(0, message.length, _BUF_SIZE):
                    digest.update(_ZEROS[: min(_BUF_SIZE, message.length - start)])
                    if stop.is_set():
                        break
            else:
                digest.update(views[message.slot][: message.length])
                free.put(message.slot)
            done += message.length
            report(done)
    finally:
        # Also on error (ours or the callback's): stop the reader and wake it if it waits for a buffer.
        stop.set()
        free.put(None)
        reader.join()


def hash_file(path: str | os.PathLike[str], *, progress: ProgressFn | None = None, leased: bool = False) -> str:
    """hash_fd on a fresh read-only descriptor; see hash_fd for the guarantees. `leased`: hash it the way
    templates are hashed, under a read lease where the kernel grants one (TemplateBusy while some process
    has it open for writing), which lets the page-cache-resident windows be hashed through a mapping."""
    name = os.fspath(path)
    try:
        fd = os.open(name, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise FilesystemError.from_os(exc, op="open for hashing", path=name) from exc
    try:
        guard = functools.partial(lease.check, fd, name) if leased and lease.take(fd, name) else None
        return hash_fd(fd, path=name, progress=progress, guard=guard)
    finally:
        with contextlib.suppress(OSError):
            os.close(fd)
