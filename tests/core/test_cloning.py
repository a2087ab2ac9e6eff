from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import tmpfs_mount, xfs_reflink_mount
from worker.core import cloning
from worker.core.cloning import CloneMethod, clone_fd
from worker.errors import FilesystemError, InvalidArgument, TemplateChanged

MiB = 1 << 20


@pytest.fixture
def xfs_dir(tmp_path: Path) -> Iterator[Path]:
    with xfs_reflink_mount(tmp_path) as mountpoint:
        yield mountpoint


@pytest.fixture
def tiny_tmpfs(tmp_path: Path) -> Iterator[Path]:
    with tmpfs_mount(tmp_path, size_mib=8) as mountpoint:
        yield mountpoint


@pytest.fixture
def roomy_tmpfs(tmp_path: Path) -> Iterator[Path]:
    with tmpfs_mount(tmp_path, size_mib=64) as mountpoint:
        yield mountpoint


def clone(src: Path, dst: Path) -> CloneMethod:
    """Clone the way the worker does: read-only source, a freshly created destination."""
    src_fd = os.open(src, os.O_RDONLY | os.O_CLOEXEC)
    try:
        dst_fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            return clone_fd(src_fd, dst_fd, src_path=str(src), dst_path=str(dst))
        finally:
            os.close(dst_fd)
    finally:
        os.close(src_fd)


def sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def data_map(path: Path) -> list[tuple[int, int]]:
    """[start, end) of the file's data extents, as SEEK_DATA/SEEK_HOLE report them."""
    extents: list[tuple[int, int]] = []
    fd = os.open(path, os.O_RDONLY)
    try:
        size, offset = os.fstat(fd).st_size, 0
        while offset < size:
            try:
                start = os.lseek(fd, offset, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno == errno.ENXIO:
                    break
                raise
            offset = os.lseek(fd, start, os.SEEK_HOLE)
            extents.append((start, offset))
    finally:
        os.close(fd)
    return extents


def assert_same_sparse_file(dst: Path, src: Path) -> None:
    """Same size, same holes, same bytes in every data extent: the same content, without reading holes."""
    assert dst.stat().st_size == src.stat().st_size
    extents = data_map(src)
    assert data_map(dst) == extents
    with src.open("rb") as a, dst.open("rb") as b:
        for start, end in extents:
            a.seek(start)
            b.seek(start)
            assert a.read(end - start) == b.read(end - start), f"bytes differ in [{start}, {end})"


def scattered_sparse_file(path: Path, size: int = 512 * MiB) -> Path:
    """Mostly hole, with a few MiB of data at the start, unaligned in the middle, and in the last byte."""
    assert size >= 8 * MiB, "the data extents below would not fit"
    with path.open("wb") as f:
        f.truncate(size)
        for offset, length in [(0, MiB), (size // 4 + 777, 2 * MiB), (size // 2 + 4096, 64 * 1024)]:
            f.seek(offset)
            f.write(os.urandom(length))
        f.seek(size - 1)
        f.write(b"\x01")
    return path


def filesystem_type(path: Path) -> str:
    return subprocess.run(
        ["stat", "-f", "-c", "%T", str(path)], capture_output=True, text=True, check=True
    ).stdout.strip()


@pytest.fixture
def ext4_dir(tmp_path: Path) -> Path:
    if filesystem_type(tmp_path) != "ext2/ext3":  # statfs names ext4 by its shared magic
        pytest.skip(f"tmp_path is on {filesystem_type(tmp_path)}, these tests describe ext4")
    return tmp_path


def test_clone_has_identical_bytes_and_is_a_sparse_copy_on_ext4(ext4_dir: Path) -> None:
    """On ext4 (no reflink) the clone is a "sparse-copy" with exactly the source's bytes."""
    src = ext4_dir / "rootfs.ext4"
    src.write_bytes(os.urandom(3 * MiB + 17))
    dst = ext4_dir / "clone.ext4"
    assert clone(src, dst) == "sparse-copy"
    assert dst.read_bytes() == src.read_bytes()


def test_sparse_source_stays_sparse(ext4_dir: Path) -> None:
    """A 512 MiB file with a few MiB of data clones with its size, bytes and holes, no more blocks."""
    src = scattered_sparse_file(ext4_dir / "rootfs.ext4")
    dst = ext4_dir / "clone.ext4"
    clone(src, dst)
    assert dst.stat().st_blocks <= src.stat().st_blocks
    assert_same_sparse_file(dst, src)


def test_trailing_hole_keeps_the_full_size(ext4_dir: Path) -> None:
    """A template that ends in a hole clones to the full apparent size, not to the end of its last data."""
    src = ext4_dir / "rootfs.ext4"
    with src.open("wb") as f:
        f.write(os.urandom(MiB))
        f.truncate(64 * MiB)
    dst = ext4_dir / "clone.ext4"
    clone(src, dst)
    assert dst.stat().st_size == 64 * MiB
    assert_same_sparse_file(dst, src)


@pytest.mark.parametrize("data", [b"", b"\x01"])
def test_empty_source_clones_to_empty_file(ext4_dir: Path, data: bytes) -> None:
    """An empty template gives an empty clone made by sparse copy, and a one-byte template gives that byte."""
    src = ext4_dir / "tiny.ext4"
    src.write_bytes(data)
    dst = ext4_dir / "clone.ext4"
    assert clone(src, dst) == "sparse-copy"
    assert dst.read_bytes() == data


def test_clone_is_independent_of_the_source(ext4_dir: Path) -> None:
    """The clone has the template's bytes, and writing into it leaves the template's bytes alone (never a link)."""
    src = ext4_dir / "rootfs.ext4"
    src.write_bytes(os.urandom(MiB))
    before = sha256(src)
    dst = ext4_dir / "clone.ext4"
    clone(src, dst)
    assert sha256(dst) == before
    with dst.open("r+b") as f:
        f.write(b"written by the VM")
    assert sha256(dst) != before
    assert sha256(src) == before
    assert src.stat().st_nlink == 1
    assert src.stat().st_ino != dst.stat().st_ino


def test_non_empty_destination_is_refused(ext4_dir: Path) -> None:
    """A destination that already has bytes is rejected and left as it was (old bytes would show in holes)."""
    src = scattered_sparse_file(ext4_dir / "rootfs.ext4", size=8 * MiB)
    dst = ext4_dir / "clone.ext4"
    dst.write_bytes(b"stale")
    src_fd, dst_fd = os.open(src, os.O_RDONLY), os.open(dst, os.O_WRONLY)
    try:
        with pytest.raises(InvalidArgument) as info:
            clone_fd(src_fd, dst_fd, src_path=str(src), dst_path=str(dst))
    finally:
        os.close(src_fd)
        os.close(dst_fd)
    assert dst.read_bytes() == b"stale"
    assert (info.value.field, info.value.value, info.value.reason) == (
        "destination",
        str(dst),
        "must be a new, empty file",
    )


def test_source_offset_is_restored(ext4_dir: Path) -> None:
    """The caller's source fd offset is where it was, though SEEK_DATA walked the file."""
    src = scattered_sparse_file(ext4_dir / "rootfs.ext4", size=8 * MiB)
    dst = ext4_dir / "clone.ext4"
    src_fd = os.open(src, os.O_RDONLY)
    dst_fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.lseek(src_fd, 4242, os.SEEK_SET)
        clone_fd(src_fd, dst_fd, src_path=str(src), dst_path=str(dst))
        assert os.lseek(src_fd, 0, os.SEEK_CUR) == 4242
    finally:
        os.close(src_fd)
        os.close(dst_fd)
    assert sha256(dst) == sha256(src)


def test_without_seek_data_the_copy_is_still_exact(ext4_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Where SEEK_DATA is unsupported (EINVAL) the whole file is copied as data, byte-exact."""
    src = scattered_sparse_file(ext4_dir / "rootfs.ext4", size=16 * MiB)
    real_lseek = os.lseek

    def lseek(fd: int, offset: int, whence: int) -> int:
        if whence in (os.SEEK_DATA, os.SEEK_HOLE):
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_lseek(fd, offset, whence)

    monkeypatch.setattr(os, "lseek", lseek)
    dst = ext4_dir / "clone.ext4"
    assert clone(src, dst) == "sparse-copy"
    monkeypatch.undo()
    assert dst.stat().st_size == src.stat().st_size
    assert sha256(dst) == sha256(src)


def test_without_copy_file_range_the_copy_is_exact_and_sparse(ext4_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """When copy_file_range refuses the pair (EXDEV), read/write copies the same bytes and holes."""
    src = scattered_sparse_file(ext4_dir / "rootfs.ext4", size=256 * MiB)

    def refuse(*args: int) -> int:
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(os, "copy_file_range", refuse)
    dst = ext4_dir / "clone.ext4"
    assert clone(src, dst) == "sparse-copy"
    assert dst.stat().st_blocks <= src.stat().st_blocks
    assert_same_sparse_file(dst, src)


def test_source_truncated_during_copy_raises_template_changed(ext4_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A template that shrinks while it is copied is a transient TemplateChanged, not a half-zero clone."""
    src = scattered_sparse_file(ext4_dir / "rootfs.ext4", size=256 * MiB)
    real_copy_file_range = os.copy_file_range

    def copy_then_truncate(src_fd: int, dst_fd: int, count: int, offset_src: int, offset_dst: int) -> int:
        copied = real_copy_file_range(src_fd, dst_fd, count, offset_src, offset_dst)
        os.truncate(src, 100 * MiB)
        return copied

    monkeypatch.setattr(os, "copy_file_range", copy_then_truncate)
    with pytest.raises(TemplateChanged) as info:
        clone(src, ext4_dir / "clone.ext4")
    assert info.value.path == str(src)
    assert info.value.transient


def test_reflink_on_xfs(xfs_dir: Path) -> None:
    """On XFS with reflink=1 the clone is a reflink with identical bytes, and writing it spares the source."""
    src = scattered_sparse_file(xfs_dir / "rootfs.ext4", size=64 * MiB)
    before = sha256(src)
    dst = xfs_dir / "clone.ext4"
    assert clone(src, dst) == "reflink"
    assert sha256(dst) == before
    with dst.open("r+b") as f:
        f.write(b"written by the VM")
        f.seek(16 * MiB + 777)
        f.write(b"and inside the second extent")
    assert sha256(src) == before
    assert sha256(dst) != before


def test_clone_across_filesystems_is_a_sparse_copy(tmp_path: Path, roomy_tmpfs: Path) -> None:
    """ext4 -> tmpfs (no reflink, no same-fs copy_file_range) still copies bytes and holes exactly."""
    src = scattered_sparse_file(tmp_path / "rootfs.ext4", size=512 * MiB)
    dst = roomy_tmpfs / "clone.ext4"
    assert clone(src, dst) == "sparse-copy"
    assert dst.stat().st_blocks <= src.stat().st_blocks
    assert_same_sparse_file(dst, src)


def test_full_destination_raises_transient_enospc(tmp_path: Path, tiny_tmpfs: Path) -> None:
    """16 MiB of data into an 8 MiB tmpfs is a transient FilesystemError(ENOSPC) naming the destination."""
    src = tmp_path / "rootfs.ext4"
    src.write_bytes(os.urandom(16 * MiB))
    dst = tiny_tmpfs / "clone.ext4"
    with pytest.raises(FilesystemError) as info:
        clone(src, dst)
    assert info.value.errno == errno.ENOSPC
    assert info.value.transient
    assert info.value.path == str(dst)


# ------------------------------------------------------- which copy path ran, and how each failure is reported


@dataclass
class CopyTrace:
    """Bytes each copy primitive moved and how often it was asked: which path a copy took, observed at the
    syscall boundary (the speed and disk use of a clone depend on it)."""

    reflinks: int = 0
    cfr_calls: int = 0
    cfr_bytes: int = 0
    read_bytes: int = 0
    written_bytes: int = 0


@pytest.fixture
def trace(monkeypatch: pytest.MonkeyPatch) -> CopyTrace:
    t = CopyTrace()
    real_ioctl, real_cfr, real_preadv, real_pwrite = fcntl.ioctl, os.copy_file_range, os.preadv, os.pwrite

    def ioctl(fd: int, request: int, arg: int = 0) -> Any:
        result = real_ioctl(fd, request, arg)
        t.reflinks += 1
        return result

    def copy_file_range(src: int, dst: int, count: int, offset_src: int, offset_dst: int) -> int:
        t.cfr_calls += 1
        copied = real_cfr(src, dst, count, offset_src, offset_dst)
        t.cfr_bytes += copied
        return copied

    def preadv(fd: int, buffers: list[memoryview], offset: int) -> int:
        got = real_preadv(fd, buffers, offset)
        t.read_bytes += got
        return got

    def pwrite(fd: int, data: memoryview, offset: int) -> int:
        written = real_pwrite(fd, data, offset)
        t.written_bytes += written
        return written

    monkeypatch.setattr(fcntl, "ioctl", ioctl)
    monkeypatch.setattr(os, "copy_file_range", copy_file_range)
    monkeypatch.setattr(os, "preadv", preadv)
    monkeypatch.setattr(os, "pwrite", pwrite)
    return t


def data_bytes(path: Path) -> int:
    return sum(end - start for start, end in data_map(path))


def test_sparse_copy_moves_every_extent_in_the_kernel(ext4_dir: Path, trace: CopyTrace) -> None:
    """On ext4 every data extent goes through copy_file_range, none through read/write, and no hole is copied."""
    src = scattered_sparse_file(ext4_dir / "rootfs.ext4", size=64 * MiB)
    assert len(data_map(src)) >= 3
    dst = ext4_dir / "clone.ext4"
    assert clone(src, dst) == "sparse-copy"
    assert trace.cfr_bytes == data_bytes(src)
    assert trace.cfr_calls == len(data_map(src))  # one call per extent of a few MiB: none wasted
    assert trace.read_bytes == trace.written_bytes == 0
    assert_same_sparse_file(dst, src)


def test_refused_copy_file_range_is_asked_once_then_read_write_copies(
    ext4_dir: Path, trace: CopyTrace, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When copy_file_range refuses the pair, it is not asked again for later extents: read/write copies them all."""
    src = scattered_sparse_file(ext4_dir / "rootfs.ext4", size=64 * MiB)
    calls = 0

    def refuse(*args: int) -> int:
        nonlocal calls
        calls += 1
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(os, "copy_file_range", refuse)
    dst = ext4_dir / "clone.ext4"
    assert clone(src, dst) == "sparse-copy"
    assert calls == 1
    assert trace.read_bytes == trace.written_bytes == data_bytes(src)
    assert_same_sparse_file(dst, src)


@pytest.mark.parametrize("code", ["EXDEV", "EINVAL", "ENOSYS", "EOPNOTSUPP"])
def test_every_refusal_of_copy_file_range_falls_back(
    ext4_dir: Path, trace: CopyTrace, monkeypatch: pytest.MonkeyPatch, code: str
) -> None:
    """Each errno meaning "this pair cannot" falls back to read/write; the copy is exact."""
    src = scattered_sparse_file(ext4_dir / "rootfs.ext4", size=16 * MiB)

    def refuse(*args: int) -> int:
        raise OSError(getattr(errno, code), code)

    monkeypatch.setattr(os, "copy_file_range", refuse)
    dst = ext4_dir / "clone.ext4"
    assert clone(src, dst) == "sparse-copy"
    assert trace.read_bytes == data_bytes(src)
    assert sha256(dst) == sha256(src)


def test_copy_file_range_reporting_zero_is_finished_by_read_write(
    ext4_dir: Path, trace: CopyTrace, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A filesystem whose copy_file_range copies nothing (returns 0, as procfs-like ones do) still gets a full copy."""
    src = scattered_sparse_file(ext4_dir / "rootfs.ext4", size=16 * MiB)
    monkeypatch.setattr(os, "copy_file_range", lambda *args: 0)
    dst = ext4_dir / "clone.ext4"
    assert clone(src, dst) == "sparse-copy"
    assert trace.read_bytes == trace.written_bytes == data_bytes(src)
    assert_same_sparse_file(dst, src)


def test_short_copies_and_writes_are_continued(ext4_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """copy_file_range and pwrite may move fewer bytes than asked: the copy goes on from where they stopped."""
    src = scattered_sparse_file(ext4_dir / "rootfs.ext4", size=16 * MiB)
    real_cfr, real_pwrite = os.copy_file_range, os.pwrite
    monkeypatch.setattr(os, "copy_file_range", lambda s, d, n, o1, o2: real_cfr(s, d, min(n, 300_000), o1, o2))
    dst = ext4_dir / "clone.ext4"
    clone(src, dst)
    assert_same_sparse_file(dst, src)

    calls = 0

    def refuse_once(s: int, d: int, n: int, o1: int, o2: int) -> int:
        nonlocal calls
        calls += 1
        if calls == 1:
            return real_cfr(s, d, min(n, 4096), o1, o2)  # a little, then "cannot": the rest by read/write
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(os, "copy_file_range", refuse_once)
    monkeypatch.setattr(os, "pwrite", lambda fd, data, offset: real_pwrite(fd, data[:1000], offset))
    dst2 = ext4_dir / "clone2.ext4"
    clone(src, dst2)
    assert_same_sparse_file(dst2, src)


def test_reflink_copies_no_bytes(xfs_dir: Path, trace: CopyTrace) -> None:
    """On XFS the clone is one FICLONE: no byte goes through copy_file_range or read/write."""
    src = scattered_sparse_file(xfs_dir / "rootfs.ext4", size=32 * MiB)
    dst = xfs_dir / "clone.ext4"
    assert clone(src, dst) == "reflink"
    assert trace.reflinks == 1
    assert trace.cfr_calls == trace.read_bytes == trace.written_bytes == 0
    assert sha256(dst) == sha256(src)


@pytest.mark.parametrize("code", ["EOPNOTSUPP", "EXDEV", "EINVAL", "ENOTTY", "ENOSYS"])
def test_a_pair_that_cannot_reflink_is_copied(ext4_dir: Path, monkeypatch: pytest.MonkeyPatch, code: str) -> None:
    """Each errno meaning "no reflink for this pair" falls back to the sparse copy."""

    def no_reflink(*args: Any) -> Any:
        raise OSError(getattr(errno, code), code)

    monkeypatch.setattr(fcntl, "ioctl", no_reflink)
    src = scattered_sparse_file(ext4_dir / "rootfs.ext4", size=8 * MiB)
    dst = ext4_dir / "clone.ext4"
    assert clone(src, dst) == "sparse-copy"
    assert sha256(dst) == sha256(src)


@pytest.mark.parametrize(("code", "transient"), [("EIO", True), ("EPERM", False)])
def test_a_failing_reflink_is_reported_not_hidden_by_a_copy(
    ext4_dir: Path, monkeypatch: pytest.MonkeyPatch, code: str, transient: bool
) -> None:
    """A reflink failing for a real reason (EIO, EPERM) is a FilesystemError on the destination, not a slow copy."""

    def failing(*args: Any) -> Any:
        raise OSError(getattr(errno, code), os.strerror(getattr(errno, code)))

    monkeypatch.setattr(fcntl, "ioctl", failing)
    src = scattered_sparse_file(ext4_dir / "rootfs.ext4", size=8 * MiB)
    dst = ext4_dir / "clone.ext4"
    with pytest.raises(FilesystemError) as info:
        clone(src, dst)
    assert (info.value.op, info.value.path, info.value.errno) == ("reflink", str(dst), getattr(errno, code))
    assert info.value.transient is transient
    assert dst.stat().st_size == 0


@pytest.mark.parametrize(("code", "blamed"), [("EIO", "src"), ("ENOSPC", "dst"), ("EDQUOT", "dst"), ("EFBIG", "dst")])
def test_copy_file_range_errors_name_the_file_at_fault(
    ext4_dir: Path, monkeypatch: pytest.MonkeyPatch, code: str, blamed: str
) -> None:
    """A read error names the template, a full or too-small destination names the clone."""
    src = scattered_sparse_file(ext4_dir / "rootfs.ext4", size=8 * MiB)
    dst = ext4_dir / "clone.ext4"

    def failing(*args: int) -> int:
        raise OSError(getattr(errno, code), os.strerror(getattr(errno, code)))

    monkeypatch.setattr(os, "copy_file_range", failing)
    with pytest.raises(FilesystemError) as info:
        clone(src, dst)
    expected = str(src) if blamed == "src" else str(dst)
    assert (info.value.op, info.value.path, info.value.errno) == ("copy", expected, getattr(errno, code))


@pytest.mark.parametrize("failing", ["preadv", "pwrite", "ftruncate"])
def test_read_write_path_errors_name_the_file_at_fault(
    ext4_dir: Path, monkeypatch: pytest.MonkeyPatch, failing: str
) -> None:
    """On the read/write path a failed read names the template; a failed write or resize names the clone."""
    src = scattered_sparse_file(ext4_dir / "rootfs.ext4", size=8 * MiB)
    dst = ext4_dir / "clone.ext4"

    def refuse(*args: int) -> int:
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    def broken(*args: Any) -> Any:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "copy_file_range", refuse)
    monkeypatch.setattr(os, failing, broken)
    with pytest.raises(FilesystemError) as info:
        clone(src, dst)
    expected = str(src) if failing == "preadv" else str(dst)
    assert (info.value.op, info.value.path, info.value.errno) == ("copy", expected, errno.EIO)
    assert info.value.transient


def test_seek_errors_name_the_template(ext4_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """SEEK_DATA failing for a real reason (EIO) is a FilesystemError on the template, not a guess at its layout."""
    src = scattered_sparse_file(ext4_dir / "rootfs.ext4", size=8 * MiB)
    real_lseek = os.lseek

    def lseek(fd: int, offset: int, whence: int) -> int:
        if whence == os.SEEK_DATA:
            raise OSError(errno.EIO, "Input/output error")
        return real_lseek(fd, offset, whence)

    monkeypatch.setattr(os, "lseek", lseek)
    with pytest.raises(FilesystemError) as info:
        clone(src, ext4_dir / "clone.ext4")
    assert (info.value.op, info.value.path, info.value.errno) == ("copy", str(src), errno.EIO)


@pytest.mark.parametrize("bad", ["src", "dst"])
def test_a_closed_descriptor_is_a_filesystem_error_naming_its_file(ext4_dir: Path, bad: str) -> None:
    """A descriptor that is not open (EBADF) is our FilesystemError naming that side's path, not an OSError."""
    src = ext4_dir / "rootfs.ext4"
    src.write_bytes(b"x")
    dst = ext4_dir / "clone.ext4"
    src_fd = os.open(src, os.O_RDONLY)
    dst_fd = os.open(dst, os.O_WRONLY | os.O_CREAT, 0o600)
    os.close(src_fd if bad == "src" else dst_fd)
    try:
        with pytest.raises(FilesystemError) as info:
            clone_fd(src_fd, dst_fd, src_path=str(src), dst_path=str(dst))
    finally:
        os.close(dst_fd if bad == "src" else src_fd)
    assert (info.value.op, info.value.path, info.value.errno) == (
        "copy",
        str(src if bad == "src" else dst),
        errno.EBADF,
    )


def test_source_vanishing_inside_an_extent_is_template_changed(ext4_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A template cut short after its extents were found ends the copy with TemplateChanged naming the byte."""
    src = scattered_sparse_file(ext4_dir / "rootfs.ext4", size=64 * MiB)
    real_cfr = os.copy_file_range
    cut = False

    def cut_then_copy(s: int, d: int, n: int, o1: int, o2: int) -> int:
        nonlocal cut
        if not cut:
            cut = True
            os.truncate(src, 100)  # inside the first extent, which copy_file_range is about to copy
        return real_cfr(s, d, n, o1, o2)

    monkeypatch.setattr(os, "copy_file_range", cut_then_copy)
    with pytest.raises(TemplateChanged) as info:
        clone(src, ext4_dir / "clone.ext4")
    assert info.value.path == str(src)
    assert info.value.detail == "file ended at byte 100, inside a data extent, while copied"
    assert info.value.transient


def test_source_vanishing_during_read_write_is_template_changed(
    ext4_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On the read/write path too, a template that ends early is TemplateChanged, never a clone padded with zeros."""
    src = scattered_sparse_file(ext4_dir / "rootfs.ext4", size=64 * MiB)
    real_preadv = os.preadv
    reads = 0

    def refuse(*args: int) -> int:
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    def read_then_cut(fd: int, buffers: list[memoryview], offset: int) -> int:
        nonlocal reads
        reads += 1
        got = real_preadv(fd, buffers, offset)
        if reads == 1:
            os.truncate(src, offset + got)  # the rest of the first extent (1 MiB, read in two buffers) is gone
        return got

    monkeypatch.setattr(os, "copy_file_range", refuse)
    monkeypatch.setattr(cloning, "_COPY_BUF_SIZE", 512 * 1024)
    monkeypatch.setattr(os, "preadv", read_then_cut)
    with pytest.raises(TemplateChanged) as info:
        clone(src, ext4_dir / "clone.ext4")
    assert info.value.detail == f"file ended at byte {512 * 1024}, inside a data extent, while copied"


def test_template_rewritten_in_place_during_copy_is_template_changed(
    ext4_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Same size, new bytes while copying: the copy mixes two versions, so it is refused (mtime/ctime moved)."""
    src = scattered_sparse_file(ext4_dir / "rootfs.ext4", size=16 * MiB)
    os.utime(src, ns=(0, 0))
    real_cfr = os.copy_file_range

    def copy_then_rewrite(s: int, d: int, n: int, o1: int, o2: int) -> int:
        copied = real_cfr(s, d, n, o1, o2)
        with src.open("r+b") as f:
            f.write(b"new")
        return copied

    monkeypatch.setattr(os, "copy_file_range", copy_then_rewrite)
    with pytest.raises(TemplateChanged) as info:
        clone(src, ext4_dir / "clone.ext4")
    assert info.value.detail == "size/mtime/ctime changed while it was copied"


def test_a_pipe_as_source_is_a_filesystem_error(tmp_path: Path) -> None:
    """A source that cannot seek (a pipe) is FilesystemError("copy") naming it, not a clone of nothing."""
    read_end, write_end = os.pipe()
    dst = tmp_path / "clone.ext4"
    dst_fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with pytest.raises(FilesystemError) as info:
            clone_fd(read_end, dst_fd, src_path="pipe", dst_path=str(dst))
    finally:
        for fd in (read_end, write_end, dst_fd):
            os.close(fd)
    assert (info.value.op, info.value.path, info.value.errno) == ("copy", "pipe", errno.ESPIPE)
