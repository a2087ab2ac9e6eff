from __future__ import annotations

import errno
import fcntl
import functools
import hashlib
import os
import sys
import threading
from collections.abc import Callable
from itertools import pairwise
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from tests.helpers import evict, wait_until
from worker.core import hashing, lease, pagecache
from worker.core.hashing import hash_fd, hash_file
from worker.errors import FilesystemError, TemplateBusy, TemplateChanged

MiB = 1 << 20
BUF = hashing._BUF_SIZE
RING = hashing._BUF_SIZE * hashing._BUF_COUNT
EVERY = hashing._PROGRESS_EVERY


@pytest.fixture(autouse=True, params=["serial", "threaded", "mapped"])
def strategy(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every test here runs under each hashing strategy (hashing.default_strategy picks one per file and
    machine). Mapping needs a guard (the caller's read lease): under "mapped", hash_file takes a real lease
    and hash_fd gets a guard that never fires, so the tests that change the file under it still can."""
    chosen: str = request.param
    monkeypatch.setattr(hashing, "default_strategy", lambda **_: chosen)
    if chosen == "mapped":
        # A lease that is always granted and never breaks: a real one would make the tests' own truncations
        # wait for it to break (the lease's behaviour is tested below and in test_templates).
        monkeypatch.setattr(hashing, "lease", SimpleNamespace(take=lambda fd, path: True, check=lambda fd, path: None))
        module = sys.modules[__name__]
        monkeypatch.setattr(module, "hash_file", functools.partial(hashing.hash_file, leased=True))
        monkeypatch.setattr(module, "hash_fd", functools.partial(hashing.hash_fd, guard=lambda: None))
    return chosen


def sparse_file(path: Path, size: int, data: dict[int, bytes] | None = None) -> Path:
    """A file of `size` bytes that is a hole except for `data` (offset -> bytes)."""
    with path.open("wb") as f:
        f.truncate(size)
        for offset, chunk in (data or {}).items():
            f.seek(offset)
            f.write(chunk)
    return path


def reader_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "hash-reader"]


def writer_of(path: Path) -> tuple[threading.Thread, threading.Event]:
    """A thread (not started) that opens `path` for writing and closes it, and the event it sets once in."""
    opened = threading.Event()

    def write() -> None:
        os.close(os.open(path, os.O_WRONLY))
        opened.set()

    return threading.Thread(target=write, daemon=True), opened


def test_abc_vector(tmp_path: Path) -> None:
    """SHA-256("abc") is the FIPS 180-2 value."""
    path = tmp_path / "abc"
    path.write_bytes(b"abc")
    assert hash_file(path) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


def test_empty_file(tmp_path: Path) -> None:
    """An empty file hashes to SHA-256("") and reports (0, 0) as its only progress."""
    path = tmp_path / "empty"
    path.write_bytes(b"")
    calls: list[tuple[int, int]] = []
    digest = hash_file(path, progress=lambda done, total: calls.append((done, total)))
    assert digest == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    assert calls == [(0, 0)]


@pytest.mark.parametrize("layout", ["written", "hole"])
def test_ten_mib_of_zeros(tmp_path: Path, layout: str) -> None:
    """10 MiB of zeros has the known digest whether the zeros are on disk or a hole."""
    path = tmp_path / "zeros"
    if layout == "written":
        path.write_bytes(bytes(10 * MiB))
    else:
        sparse_file(path, 10 * MiB)
    assert hash_file(path) == "e5b844cc57f57094ea4585e235f36c78c1cd222262bb89d53c94dcb4d6b3e55d"


@pytest.mark.parametrize("size", [1, BUF - 1, BUF, BUF + 1, RING + 1, 3 * RING + 12345])
def test_matches_hashlib_at_buffer_boundaries(tmp_path: Path, size: int) -> None:
    """Sizes around the buffer and ring sizes hash exactly like hashlib over the same bytes."""
    data = os.urandom(size)
    path = tmp_path / "data"
    path.write_bytes(data)
    assert hash_file(path) == hashlib.sha256(data).hexdigest()


def test_missing_path_is_a_permanent_filesystem_error(tmp_path: Path) -> None:
    """A missing file raises FilesystemError(ENOENT) that names the path and is not worth retrying."""
    path = tmp_path / "no-such-template.ext4"
    with pytest.raises(FilesystemError) as info:
        hash_file(path)
    assert info.value.errno == errno.ENOENT
    assert info.value.op == "open for hashing"
    assert info.value.path == str(path)
    assert str(path) in str(info.value)
    assert not info.value.transient


def test_directory_is_refused(tmp_path: Path) -> None:
    """A directory fd is a FilesystemError(EISDIR), not the hash of nothing."""
    fd = os.open(tmp_path, os.O_RDONLY)
    try:
        with pytest.raises(FilesystemError) as info:
            hash_fd(fd, path=str(tmp_path))
    finally:
        os.close(fd)
    assert info.value.errno == errno.EISDIR


def _hash_while(path: Path, change: Callable[[int], None]) -> None:
    """Hash `path`, running change(fd) from the first intermediate progress report."""
    fd = os.open(path, os.O_RDWR)
    changed: list[bool] = []

    def progress(done: int, total: int) -> None:
        if not changed:
            changed.append(True)
            change(fd)

    try:
        hash_fd(fd, path=str(path), progress=progress)
    finally:
        os.close(fd)
    assert changed, "the file was too small to get an intermediate progress report"


def test_truncation_while_hashing_raises_template_changed(tmp_path: Path) -> None:
    """A file truncated mid-hash raises a transient TemplateChanged, and the reader thread is gone."""
    path = sparse_file(tmp_path / "t.ext4", EVERY + 2 * RING + 1, {EVERY: b"x" * MiB})
    with pytest.raises(TemplateChanged) as info:
        _hash_while(path, lambda fd: os.ftruncate(fd, EVERY // 2))
    assert info.value.path == str(path)
    assert info.value.transient
    assert reader_threads() == []


def test_growth_while_hashing_raises_template_changed(tmp_path: Path) -> None:
    """A file that grows mid-hash raises TemplateChanged: the digest covers no complete version."""
    path = sparse_file(tmp_path / "g.ext4", EVERY + 2 * RING, {0: b"y" * MiB})
    with pytest.raises(TemplateChanged):
        _hash_while(path, lambda fd: os.ftruncate(fd, 2 * EVERY))


def test_rewrite_in_place_while_hashing_raises_template_changed(tmp_path: Path) -> None:
    """Bytes rewritten mid-hash (same size) raise TemplateChanged through the mtime/ctime check."""
    path = sparse_file(tmp_path / "w.ext4", EVERY + 2 * RING, {0: b"z" * MiB})
    os.utime(path, ns=(0, 0))  # any write now moves mtime, whatever the timestamp granularity

    def rewrite(fd: int) -> None:
        os.pwrite(fd, b"changed", 0)

    with pytest.raises(TemplateChanged):
        _hash_while(path, rewrite)


def test_progress_is_monotonic_and_ends_at_total(tmp_path: Path) -> None:
    """Progress rises strictly, at most once per ~64 MiB, keeps the total, and ends at (total, total)."""
    size = 2 * EVERY + EVERY // 2 + 123
    path = sparse_file(tmp_path / "p.ext4", size, {size - 1: b"\x01"})
    calls: list[tuple[int, int]] = []
    hash_file(path, progress=lambda done, total: calls.append((done, total)))
    done = [d for d, _ in calls]
    assert all(total == size for _, total in calls)
    assert done == sorted(set(done))
    assert calls[-1] == (size, size)
    assert 2 <= len(calls) <= size // EVERY + 1
    assert all(b - a >= EVERY for a, b in pairwise([0, *done[:-1]]))


def test_fd_offset_is_untouched(tmp_path: Path) -> None:
    """hash_fd hashes from byte 0 whatever the fd offset is, and leaves that offset where it was."""
    data = os.urandom(3 * BUF + 5)
    path = tmp_path / "o"
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.lseek(fd, 4097, os.SEEK_SET)
        assert hash_fd(fd, path=str(path)) == hashlib.sha256(data).hexdigest()
        assert os.lseek(fd, 0, os.SEEK_CUR) == 4097
    finally:
        os.close(fd)


def test_progress_callback_error_propagates_and_stops_reader(tmp_path: Path) -> None:
    """An exception from the progress callback reaches the caller and leaves no reader thread behind."""
    path = sparse_file(tmp_path / "c.ext4", EVERY + 4 * RING)

    def progress(done: int, total: int) -> None:
        raise KeyError("stop")

    with pytest.raises(KeyError):
        hash_file(path, progress=progress)
    assert reader_threads() == []


def test_read_error_becomes_transient_filesystem_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An OSError while reading (EIO here) surfaces as FilesystemError(op="read") naming the path."""
    path = tmp_path / "e.ext4"
    path.write_bytes(os.urandom(3 * RING))  # data, not holes: holes are never read
    evict(path)  # not in the page cache: mapped or not, it is read (a mapping would turn EIO into SIGBUS)
    real_preadv = os.preadv
    calls = 0

    def failing_preadv(fd: int, buffers: list[memoryview], offset: int) -> int:
        nonlocal calls
        calls += 1
        if calls == 3:
            raise OSError(errno.EIO, "Input/output error")
        return real_preadv(fd, buffers, offset)

    monkeypatch.setattr(os, "preadv", failing_preadv)
    with pytest.raises(FilesystemError) as info:
        hash_file(path)
    assert (info.value.op, info.value.path, info.value.errno) == ("read", str(path), errno.EIO)
    assert info.value.transient
    assert reader_threads() == []


def test_sparse_file_hashes_as_its_bytes(tmp_path: Path) -> None:
    """Holes hashed from memory give the digest of the file's bytes: data at odd offsets and at the end."""
    size = 40 * hashing._BUF_SIZE + 12345
    data = {
        0: b"head",
        3 * hashing._BUF_SIZE + 17: os.urandom(70_000),
        20 * hashing._BUF_SIZE: b"mid" * 999,
        size - 5: b"tail!",
    }
    path = sparse_file(tmp_path / "s.ext4", size, data)
    assert hash_file(path) == hashlib.sha256(path.read_bytes()).hexdigest()


# ------------------------------------------------------------------------------ found by mutation testing


def bytes_read_by_this_process() -> int:
    """rchar from /proc/self/io: bytes every read-like syscall of this process (all threads) returned."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise AssertionError("no rchar in /proc/self/io")


def recorder(calls: list[tuple[int, int]]) -> Callable[[int, int], None]:
    return lambda done, total: calls.append((done, total))


def rewrite_start(fd: int) -> None:
    os.pwrite(fd, b"changed", 0)


def test_holes_are_not_read(tmp_path: Path) -> None:
    """A 256 MiB template with 2 MiB of data costs about 2 MiB of reads; the same bytes written out cost them all."""
    sparse = sparse_file(tmp_path / "sparse.ext4", 256 * MiB, {0: os.urandom(MiB), 100 * MiB + 5: os.urandom(MiB)})
    before = bytes_read_by_this_process()
    digest = hash_file(sparse)
    read_sparse = bytes_read_by_this_process() - before
    assert read_sparse < 4 * MiB, f"read {read_sparse} bytes of a file with 2 MiB of data"

    dense = tmp_path / "dense.ext4"
    with sparse.open("rb") as src, dense.open("wb") as dst:
        while chunk := src.read(8 * MiB):
            dst.write(chunk)
    before = bytes_read_by_this_process()
    assert hashing.hash_file(dense) == digest  # no lease, so read whatever the strategy: rchar counts it
    assert bytes_read_by_this_process() - before >= 256 * MiB


def test_only_the_data_is_read_never_a_byte_of_a_hole(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every byte read lies in the file's data; its holes (at the start, between the data, at the end) are not
    read at all, not even their first byte."""
    extents = [(2 * MiB, 8192), (4 * MiB + 4096, 4096)]
    path = sparse_file(tmp_path / "s.ext4", 6 * MiB, {offset: os.urandom(length) for offset, length in extents})
    expected = hashlib.sha256(path.read_bytes()).hexdigest()
    evict(path)  # else the mapped strategy maps it instead of reading it
    real_preadv = os.preadv
    read: list[tuple[int, int]] = []

    def recording_preadv(fd: int, buffers: list[memoryview], offset: int) -> int:
        got = real_preadv(fd, buffers, offset)
        read.append((offset, offset + got))
        return got

    monkeypatch.setattr(os, "preadv", recording_preadv)
    assert hash_file(path) == expected
    assert read, "nothing was read"
    outside = [(a, b) for a, b in read if not any(start <= a and b <= start + n for start, n in extents)]
    assert outside == []


def test_without_seek_data_everything_is_read_and_hashes_the_same(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where SEEK_DATA or SEEK_HOLE is unsupported the file is read whole, with the same digest."""
    data = {0: b"head", 5 * MiB + 3: os.urandom(1000), 9 * MiB: b"tail"}
    path = sparse_file(tmp_path / "s.ext4", 9 * MiB + 4, data)
    expected = hashlib.sha256(path.read_bytes()).hexdigest()
    real_lseek = os.lseek
    for unsupported in (os.SEEK_DATA, os.SEEK_HOLE):

        def lseek(fd: int, offset: int, whence: int, unsupported: int = unsupported) -> int:
            if whence == unsupported:
                raise OSError(errno.EINVAL, "Invalid argument")
            return real_lseek(fd, offset, whence)

        evict(path)  # else the mapped strategy hashes it in place, without a read
        with monkeypatch.context() as patched:
            patched.setattr(os, "lseek", lseek)
            before = bytes_read_by_this_process()
            assert hash_file(path) == expected
            assert bytes_read_by_this_process() - before >= 9 * MiB - MiB  # all but what precedes the first data


def test_progress_is_reported_every_64_mib(tmp_path: Path) -> None:
    """Progress comes at 64 MiB, 128 MiB, ..., then (total, total): for data read and for holes skipped alike."""
    hole = sparse_file(tmp_path / "hole.ext4", 3 * EVERY + 8 * MiB)
    dense = tmp_path / "dense.ext4"
    dense.write_bytes(os.urandom(MiB) * (2 * EVERY // MiB + 1))
    for path, marks in ((hole, 3), (dense, 2)):
        size = path.stat().st_size
        calls: list[tuple[int, int]] = []
        hash_file(path, progress=recorder(calls))
        assert calls == [*((k * EVERY, size) for k in range(1, marks + 1)), (size, size)]


def test_small_template_reports_only_its_end(tmp_path: Path) -> None:
    """A template under 64 MiB reports once, when done; exactly 64 MiB also reports only its end."""
    for size in (EVERY - 1, EVERY):
        path = sparse_file(tmp_path / "small.ext4", size, {0: b"x"})
        calls: list[tuple[int, int]] = []
        hash_file(path, progress=recorder(calls))
        assert calls == [(size, size)]


def test_change_while_hashing_says_what_changed(tmp_path: Path) -> None:
    """The TemplateChanged detail says how the file changed: cut short (at which byte), resized, or rewritten."""
    path = tmp_path / "t.ext4"
    path.write_bytes(os.urandom(8 * MiB))
    evict(path)  # read, not hashed in place: the truncation comes with the first read
    real_preadv = os.preadv
    cut: list[bool] = []

    def cut_then_read(fd: int, buffers: list[memoryview], offset: int) -> int:
        if not cut:
            cut.append(True)
            os.truncate(path, 1000)
        return real_preadv(fd, buffers, offset)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(os, "preadv", cut_then_read)
        with pytest.raises(TemplateChanged) as short:
            hash_file(path)
    assert short.value.detail == f"file ended at byte 1000 of {8 * MiB}"
    assert short.value.path == str(path)

    path = sparse_file(tmp_path / "g.ext4", EVERY + 2 * RING, {0: b"y" * MiB})
    with pytest.raises(TemplateChanged) as grown:
        _hash_while(path, lambda fd: os.ftruncate(fd, 2 * EVERY))
    assert grown.value.detail == f"size went from {EVERY + 2 * RING} to {2 * EVERY} bytes"
    assert str(grown.value) == (
        f"template {path} changed while being read (size went from {EVERY + 2 * RING} to {2 * EVERY} bytes);"
        " retry once it is stable"
    )

    path = sparse_file(tmp_path / "w.ext4", EVERY + 2 * RING, {0: b"z" * MiB})
    os.utime(path, ns=(0, 0))
    with pytest.raises(TemplateChanged) as rewritten:
        _hash_while(path, rewrite_start)
    assert rewritten.value.detail == "rewritten in place (mtime/ctime moved)"


def test_fifo_is_refused_not_hashed_as_empty(tmp_path: Path) -> None:
    """A FIFO (st_size 0) is a FilesystemError(EINVAL, "not a regular file"), not the empty digest."""
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    fd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    try:
        with pytest.raises(FilesystemError) as info:
            hash_fd(fd, path=str(fifo))
    finally:
        os.close(fd)
    assert (info.value.op, info.value.path, info.value.errno, info.value.strerror) == (
        "read",
        str(fifo),
        errno.EINVAL,
        "not a regular file",
    )


def test_closed_descriptor_is_a_filesystem_error(tmp_path: Path) -> None:
    """A descriptor that is not open is our FilesystemError(EBADF) naming the path, not a bare OSError."""
    path = tmp_path / "x"
    path.write_bytes(b"x")
    fd = os.open(path, os.O_RDONLY)
    os.close(fd)
    with pytest.raises(FilesystemError) as info:
        hash_fd(fd, path=str(path))
    assert (info.value.op, info.value.path, info.value.errno) == ("read", str(path), errno.EBADF)


def test_only_the_threaded_strategy_reads_in_a_daemon_thread(tmp_path: Path, strategy: str) -> None:
    """Mid-hash, the threaded strategy has its one reader thread running, named hash-reader and a daemon (a read
    stuck on a dead disk never keeps the worker from exiting); the others read in the calling thread. (The "no
    reader left behind" checks above look for that name.)"""
    path = sparse_file(tmp_path / "t.ext4", EVERY + 2 * RING, {EVERY: os.urandom(2 * RING)})
    seen: list[list[tuple[str, bool]]] = []

    def progress(done: int, total: int) -> None:
        if done < total:  # the reader cannot have finished: the ring is full of data not hashed yet
            seen.append([(t.name, t.daemon) for t in reader_threads()])

    hash_file(path, progress=progress)
    assert seen == [[("hash-reader", True)] if strategy == "threaded" else []]
    assert reader_threads() == []


@pytest.mark.parametrize("failing", ["lseek", "second fstat"])
def test_a_failing_seek_or_final_stat_is_a_filesystem_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failing: str
) -> None:
    """An EIO from the offset lookup before the hash, or from the stat after it, is FilesystemError(op="read")
    naming the file, like any other failing read."""
    path = tmp_path / "x"
    path.write_bytes(b"x")
    real_lseek, real_fstat = os.lseek, os.fstat
    stats: list[int] = []

    def lseek(fd: int, offset: int, whence: int) -> int:
        if failing == "lseek" and whence == os.SEEK_CUR:
            raise OSError(errno.EIO, "Input/output error")
        return real_lseek(fd, offset, whence)

    def fstat(fd: int) -> os.stat_result:
        stats.append(fd)
        if failing == "second fstat" and len(stats) == 2:
            raise OSError(errno.EIO, "Input/output error")
        return real_fstat(fd)

    monkeypatch.setattr(os, "lseek", lseek)
    monkeypatch.setattr(os, "fstat", fstat)
    with pytest.raises(FilesystemError) as info:
        hash_file(path)
    assert (info.value.op, info.value.path, info.value.errno) == ("read", str(path), errno.EIO)
    assert info.value.transient
    monkeypatch.undo()
    assert hash_file(path) == hashlib.sha256(b"x").hexdigest()


def test_unexpected_reader_error_reaches_the_caller_as_is(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A non-OSError inside the reader (a bug) is raised to the caller unchanged, and no reader is left behind."""
    path = tmp_path / "d"
    path.write_bytes(os.urandom(2 * BUF))
    evict(path)

    def broken(*args: object) -> int:
        raise ZeroDivisionError("reader bug")

    monkeypatch.setattr(os, "preadv", broken)
    with pytest.raises(ZeroDivisionError, match="reader bug"):
        hash_file(path)
    assert reader_threads() == []


def test_short_reads_are_continued(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """preadv may return fewer bytes than asked: the hash goes on from where it stopped and is still exact."""
    data = os.urandom(3 * BUF + 777)
    path = tmp_path / "short"
    path.write_bytes(data)
    real_preadv = os.preadv

    def at_most_1000(fd: int, buffers: list[memoryview], offset: int) -> int:
        return real_preadv(fd, [buffers[0][:1000]], offset)

    monkeypatch.setattr(os, "preadv", at_most_1000)
    assert hash_file(path) == hashlib.sha256(data).hexdigest()


# ------------------------------------------------------------------------------ the mapped strategy


def test_resident_windows_are_hashed_in_place_and_the_others_read(tmp_path: Path, strategy: str) -> None:
    """Under a lease, a file in the page cache is hashed without reading it; evicted, it is read, same digest."""
    path = tmp_path / "dense.ext4"
    data = os.urandom(48 * MiB)
    path.write_bytes(data)
    hash_file(path)  # whatever the strategy: now every page is in the page cache
    before = bytes_read_by_this_process()
    assert hashing.hash_file(path, leased=True) == hashlib.sha256(data).hexdigest()
    resident_reads = bytes_read_by_this_process() - before
    evict(path)
    before = bytes_read_by_this_process()
    assert hashing.hash_file(path, leased=True) == hashlib.sha256(data).hexdigest()
    evicted_reads = bytes_read_by_this_process() - before
    if strategy == "mapped":
        assert resident_reads < MiB, f"read {resident_reads} bytes of a file wholly in the page cache"
    else:  # the strategy was forced: every byte is read
        assert resident_reads >= len(data)
    # The first window at least is read; readahead may bring the next into the page cache, which may then be
    # mapped (a resident page needs no disk read, so it cannot fail with SIGBUS).
    assert evicted_reads >= hashing._WINDOW, "an evicted file was mapped (a disk error there would be SIGBUS)"


def test_unleased_file_is_never_mapped(tmp_path: Path) -> None:
    """Without a lease (no guard), even the mapped strategy reads every byte: nothing stops a truncation."""
    path = tmp_path / "dense.ext4"
    path.write_bytes(os.urandom(16 * MiB))
    hashing.hash_file(path)
    before = bytes_read_by_this_process()
    fd = os.open(path, os.O_RDONLY)
    try:
        hashing.hash_fd(fd, path=str(path), strategy="mapped")
    finally:
        os.close(fd)
    assert bytes_read_by_this_process() - before >= 16 * MiB


def test_a_writer_waits_for_one_window_not_the_whole_hash(tmp_path: Path) -> None:
    """A process that opens a leased file for writing mid-hash stops the hash (transient TemplateBusy) at the
    next window, and its open() returns as soon as the hash lets go, long before the hash would have ended."""
    size = 8 * EVERY  # ~0.5 GiB of holes: far more windows than the one the writer waits for
    path = sparse_file(tmp_path / "busy.ext4", size, {0: b"x"})
    fd = os.open(path, os.O_RDONLY)
    writer, opened = writer_of(path)
    reports: list[int] = []

    def progress(done: int, total: int) -> None:
        reports.append(done)
        if len(reports) == 1:
            writer.start()  # blocks in open() until our lease is gone
            wait_until(lambda: fcntl.fcntl(fd, fcntl.F_GETLEASE) != fcntl.F_RDLCK, what="the lease to start breaking")

    try:
        assert lease.take(fd, str(path))
        with pytest.raises(TemplateBusy) as info:
            hash_fd(fd, path=str(path), progress=progress, guard=functools.partial(lease.check, fd, str(path)))
        assert not opened.is_set(), "the writer got in while we still held the lease"
    finally:
        os.close(fd)
    writer.join(timeout=10)
    assert opened.is_set()
    assert info.value.transient
    assert len(reports) == 1, f"hashed on after the writer came: {reports}"


def test_when_residency_is_unknown_or_mapping_fails_the_file_is_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No libc to ask, a failing mmap or a failing mincore: the window is read instead, with the same digest."""
    path = tmp_path / "dense.ext4"
    data = os.urandom(8 * MiB)
    path.write_bytes(data)
    real: Any = pagecache._libc()
    assert real is not None

    class Failing:
        """libc whose mmap or mincore fails; munmap is the real one."""

        def __init__(self, broken: str) -> None:
            self.broken = broken
            self.munmap = real.munmap

        def mmap(self, *args: object) -> int | None:
            return pagecache._MAP_FAILED if self.broken == "mmap" else real.mmap(*args)

        def mincore(self, *args: object) -> int:
            return -1 if self.broken == "mincore" else int(real.mincore(*args))

    for broken in ("libc", "mmap", "mincore"):
        with monkeypatch.context() as patched:
            patched.setattr(pagecache, "_libc", lambda broken=broken: None if broken == "libc" else Failing(broken))
            before = bytes_read_by_this_process()
            assert hashing.hash_file(path, leased=True) == hashlib.sha256(data).hexdigest()
            assert bytes_read_by_this_process() - before >= len(data), f"with {broken} broken the file was not read"


def test_residency_follows_the_page_cache(tmp_path: Path) -> None:
    """A file just read is resident (and its view holds its bytes), the same file evicted is not, and an
    empty range or one past the end of the file never is."""
    path = tmp_path / "dense.ext4"
    data = os.urandom(4 * MiB)
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.pread(fd, 4 * MiB, 0)
        assert pagecache.resident(fd, 0, 4 * MiB)
        with pagecache.resident_view(fd, 4096 + 17, MiB) as view:
            assert view is not None and bytes(view) == data[4096 + 17 : MiB]
        assert not pagecache.resident(fd, 4 * MiB - 4096, 8192), "a page past the end of the file"
        evict(path)
        assert not pagecache.resident(fd, 0, 4 * MiB)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)  # no readahead: read exactly the first MiB
        os.pread(fd, MiB, 0)
        assert pagecache.resident(fd, 0, MiB)
        assert not pagecache.resident(fd, 0, 2 * MiB), "half the range is on disk only"
        assert not pagecache.resident(fd, 0, 0)
    finally:
        os.close(fd)


# ------------------------------------------------------------------------------ which strategy, and the guard

_REAL_DEFAULT_STRATEGY = hashing.default_strategy
#: Parametrizing a test by "strategy" overrides the autouse fixture: hashing chooses its strategy itself, and
#: hash_file takes real leases.
CHOSEN_BY_HASHING = pytest.mark.parametrize("strategy", ["chosen by hashing"])


def cached_file(path: Path, data: bytes) -> Path:
    """`data` written to `path` and read once, so every page of it is in the page cache."""
    path.write_bytes(data)
    with path.open("rb") as f:
        while f.read(8 * MiB):
            pass
    return path


@CHOSEN_BY_HASHING
def test_default_strategy_maps_a_leased_file_and_threads_only_with_three_cores(
    strategy: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A leased file is mapped; otherwise a reader thread runs where the process may use 3 cores or more, and one
    thread hashes with 2 or fewer, counting the cores of the machine where the allowed ones are unknown."""
    assert hashing.default_strategy is _REAL_DEFAULT_STRATEGY
    for cores, expected in ((1, "serial"), (2, "serial"), (3, "threaded"), (4, "threaded")):
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid, cores=cores: set(range(cores)))
        monkeypatch.setattr(os, "cpu_count", lambda: 64)
        assert hashing.default_strategy() == expected, cores
        assert hashing.default_strategy(leased=False) == expected, cores
        assert hashing.default_strategy(leased=True) == "mapped", cores

    def unknown(pid: int) -> set[int]:
        raise OSError(errno.ENOSYS, "Function not implemented")

    monkeypatch.setattr(os, "sched_getaffinity", unknown)
    for machine, expected in ((None, "serial"), (1, "serial"), (2, "serial"), (3, "threaded")):
        monkeypatch.setattr(os, "cpu_count", lambda machine=machine: machine)
        assert hashing.default_strategy() == expected, machine
    monkeypatch.delattr(os, "sched_getaffinity")  # not every platform has it
    assert hashing.default_strategy() == "threaded"
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    assert hashing.default_strategy() == "serial"


@CHOSEN_BY_HASHING
def test_a_leased_hash_maps_what_is_cached_and_an_unleased_one_reads_it(strategy: str, tmp_path: Path) -> None:
    """A file in the page cache is hashed without reading it when leased (hash_file(leased=True), or hash_fd given
    a guard) and read whole otherwise, with the same digest."""
    data = os.urandom(16 * MiB)
    path = cached_file(tmp_path / "dense.ext4", data)
    expected = hashlib.sha256(data).hexdigest()
    fd = os.open(path, os.O_RDONLY)
    try:
        runs: list[tuple[bool, Callable[[], str]]] = [
            (True, lambda: hashing.hash_file(path, leased=True)),
            (True, lambda: hashing.hash_fd(fd, path=str(path), guard=lambda: None)),
            (False, lambda: hashing.hash_file(path)),
            (False, lambda: hashing.hash_fd(fd, path=str(path))),
        ]
        for leased, run in runs:
            before = bytes_read_by_this_process()
            assert run() == expected
            reads = bytes_read_by_this_process() - before
            assert (reads < MiB) if leased else (reads >= len(data)), (leased, reads)
    finally:
        os.close(fd)


@CHOSEN_BY_HASHING
def test_a_leased_hash_file_refuses_a_file_being_written(strategy: str, tmp_path: Path) -> None:
    """hash_file(leased=True) of a file some process holds open for writing is a transient TemplateBusy naming
    it; unleased it is hashed, and leased again once the writer closed it."""
    data = os.urandom(MiB)
    path = cached_file(tmp_path / "dense.ext4", data)
    writer = os.open(path, os.O_WRONLY)
    try:
        with pytest.raises(TemplateBusy) as info:
            hashing.hash_file(path, leased=True)
        assert hashing.hash_file(path) == hashlib.sha256(data).hexdigest()
    finally:
        os.close(writer)
    assert hashing.hash_file(path, leased=True) == hashlib.sha256(data).hexdigest()
    assert (info.value.path, info.value.detail) == (str(path), "a process has it open for writing")
    assert info.value.transient


@CHOSEN_BY_HASHING
def test_a_writer_opening_the_file_stops_a_leased_hash_file(strategy: str, tmp_path: Path) -> None:
    """A process opening the file for writing during hash_file(leased=True) stops it with TemplateBusy naming the
    file, and gets in once the hash let go."""
    path = sparse_file(tmp_path / "busy.ext4", 4 * EVERY, {0: b"x"})
    writer, opened = writer_of(path)
    reports: list[int] = []

    def progress(done: int, total: int) -> None:
        reports.append(done)
        if len(reports) == 1:
            writer.start()  # blocks in open() until the lease is gone
            wait_until(lambda: lease_breaking(path), what="the lease to start breaking")

    with pytest.raises(TemplateBusy) as info:
        hashing.hash_file(path, progress=progress, leased=True)
    writer.join(timeout=10)
    assert opened.is_set()
    assert len(reports) == 1
    assert (info.value.path, info.value.detail) == (str(path), "a process opened it for writing while it was read")


def lease_breaking(path: Path) -> bool:
    """Whether /proc/locks lists a breaking lease on `path`'s inode (the kernel marks it BREAKING)."""
    ino = path.stat().st_ino
    return any(
        "LEASE" in line and "BREAKING" in line and line.split()[-3].endswith(f":{ino}")
        for line in Path("/proc/locks").read_text().splitlines()
    )


def test_the_guard_runs_before_every_window(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The caller's guard (the lease check) runs once per window hashed, holes included, the first before any
    byte is hashed: 3 calls for 2 windows and a byte, 2 where the first half window is a hole, none when empty."""
    window = 2 * MiB
    monkeypatch.setattr(hashing, "_WINDOW", window)  # 32 MiB in production: the same count on smaller files
    (tmp_path / "dense").write_bytes(bytes(2 * window + 1))  # written zeros: data, not a hole
    with (tmp_path / "holed").open("wb") as f:  # a hole, then data from the middle of the first window on
        f.seek(window // 2)
        f.write(bytes(2 * window - window // 2))
    (tmp_path / "one").write_bytes(b"\0")
    (tmp_path / "empty").write_bytes(b"")
    for name, size, calls in (("dense", 2 * window + 1, 3), ("holed", 2 * window, 2), ("one", 1, 1), ("empty", 0, 0)):
        path = tmp_path / name
        guarded: list[bool] = []
        fd = os.open(path, os.O_RDONLY)
        try:
            digest = hash_fd(fd, path=str(path), guard=functools.partial(guarded.append, True))
        finally:
            os.close(fd)
        assert digest == hashlib.sha256(bytes(size)).hexdigest(), name
        assert len(guarded) == calls, name


@CHOSEN_BY_HASHING
def test_data_starting_mid_page_is_hashed_in_place(
    strategy: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where a filesystem's blocks are smaller than a page, data may start mid-page after a hole: it is still
    hashed through a mapping (of the whole page), without a read, to the same digest."""
    data = bytes(5000) + os.urandom(8 * MiB)
    path = cached_file(tmp_path / "dense.ext4", data)
    real_lseek = os.lseek

    def lseek(fd: int, offset: int, whence: int) -> int:
        if whence == os.SEEK_DATA and offset == 0:
            return 1000  # a 1000-byte hole (the bytes are zeros), as on a filesystem with 1000-byte blocks
        return real_lseek(fd, offset, whence)

    monkeypatch.setattr(os, "lseek", lseek)
    before = bytes_read_by_this_process()
    assert hashing.hash_file(path, leased=True) == hashlib.sha256(data).hexdigest()
    assert bytes_read_by_this_process() - before < MiB
