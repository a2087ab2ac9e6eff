"""Per-VM copies of a template image that share nothing writable with it.

A reflink (FICLONE) costs a few metadata blocks and under a millisecond on XFS. Where the filesystem cannot, the
copy must stay sparse: templates are mostly holes, and shutil.copyfile or a plain copy_file_range loop
write those holes out as zeros (a 2 GiB image with 64 MiB of data becomes 2 GiB on disk). Never a hard link:
the VM would write straight into the template.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from collections.abc import Iterator
from typing import Literal

from worker.errors import FilesystemError, InvalidArgument, TemplateChanged

CloneMethod = Literal["reflink", "sparse-copy"]

#: _IOW(0x94, 9, int) from linux/fs.h; Python 3.11's fcntl module has no FICLONE.
_FICLONE = 0x40049409

#: "This pair of files cannot be reflinked": other filesystem, other mount, no reflink support, not an ioctl
#: this file knows. Anything else (ENOSPC, EIO, EPERM, ...) is a real failure and is raised.
_NO_REFLINK = frozenset({errno.EOPNOTSUPP, errno.ENOTSUP, errno.EXDEV, errno.EINVAL, errno.ENOTTY, errno.ENOSYS})

#: copy_file_range refusing the pair (cross-filesystem on Linux >= 5.19, old kernels, odd filesystems).
_NO_COPY_FILE_RANGE = frozenset({errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP})

#: Errnos of a copy that are about the destination; the rest are blamed on the source being read.
_DESTINATION_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EPERM, errno.ETXTBSY})

_COPY_BUF_SIZE = 1 << 20


def clone_fd(src_fd: int, dst_fd: int, *, src_path: str, dst_path: str) -> CloneMethod:
    """Make the new, empty file `dst_fd` an independent copy of `src_fd`: reflink if possible, else sparse.

    Neither fsyncs nor unlinks: the caller orders durability and cleans up after a failure. The paths only
    name the files in errors.
    """
    src_stat = _fstat(src_fd, path=src_path)
    if _fstat(dst_fd, path=dst_path).st_size != 0:
        # A sparse copy writes only the data extents; old bytes in a non-empty target would show through.
        raise InvalidArgument(field="destination", value=dst_path, reason="must be a new, empty file")
    if reflink(src_fd, dst_fd, dst_path=dst_path):
        return "reflink"

    _sparse_copy(src_fd, dst_fd, size=src_stat.st_size, src_path=src_path, dst_path=dst_path)
    if _identity(_fstat(src_fd, path=src_path)) != _identity(src_stat):
        # A reflink is atomic; a copy of a template that changed under it mixes two versions.
        raise TemplateChanged(src_path, "size/mtime/ctime changed while it was copied")
    return "sparse-copy"


def reflink(src_fd: int, dst_fd: int, *, dst_path: str) -> bool:
    """Make `dst_fd` share all of `src_fd`'s blocks (FICLONE): True when done, False when this pair cannot be
    reflinked (the caller copies instead); any other failure is raised."""
    try:
        fcntl.ioctl(dst_fd, _FICLONE, src_fd)
    except OSError as exc:
        if exc.errno not in _NO_REFLINK:
            raise FilesystemError.from_os(exc, op="reflink", path=dst_path) from exc
        return False
    return True


def _fstat(fd: int, *, path: str) -> os.stat_result:
    try:
        return os.fstat(fd)
    except OSError as exc:
        raise FilesystemError.from_os(exc, op="copy", path=path) from exc


def _identity(st: os.stat_result) -> tuple[int, int, int]:
    return (st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _sparse_copy(src_fd: int, dst_fd: int, *, size: int, src_path: str, dst_path: str) -> None:
    """Copy only the data extents, then set the size: the holes stay holes in the destination."""
    try:
        saved_offset = os.lseek(src_fd, 0, os.SEEK_CUR)
    except OSError as exc:
        raise FilesystemError.from_os(exc, op="copy", path=src_path) from exc
    use_copy_file_range = True
    buffer: memoryview | None = None
    try:
        for start, end in _data_extents(src_fd, size=size, src_path=src_path):
            offset = start
            if use_copy_file_range:
                offset = _copy_file_range(src_fd, dst_fd, start, end, src_path=src_path, dst_path=dst_path)
                use_copy_file_range = offset == end
            if offset < end:
                if buffer is None:
                    buffer = memoryview(bytearray(_COPY_BUF_SIZE))
                _copy_through(src_fd, dst_fd, offset, end, buffer, src_path=src_path, dst_path=dst_path)
    finally:
        # SEEK_DATA/SEEK_HOLE move the offset; the caller's descriptor should not notice. Cannot fail on a
        # file lseek just worked on, and a failure would not affect the copy.
        with contextlib.suppress(OSError):
            os.lseek(src_fd, saved_offset, os.SEEK_SET)
    try:
        os.ftruncate(dst_fd, size)
    except OSError as exc:
        raise FilesystemError.from_os(exc, op="copy", path=dst_path) from exc


def _data_extents(src_fd: int, *, size: int, src_path: str) -> Iterator[tuple[int, int]]:
    """[start, end) of each data extent below `size`, found with SEEK_DATA/SEEK_HOLE."""
    offset = 0
    while offset < size:
        try:
            start = os.lseek(src_fd, offset, os.SEEK_DATA)
            end = os.lseek(src_fd, start, os.SEEK_HOLE)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # nothing but a hole from offset to EOF
                return
            if exc.errno == errno.EINVAL:  # no SEEK_DATA here: everything left counts as data
                yield offset, size
                return
            raise FilesystemError.from_os(exc, op="copy", path=src_path) from exc
        if start >= size:
            return
        end = min(end, size)
        yield start, end
        offset = end


def _copy_file_range(src_fd: int, dst_fd: int, start: int, end: int, *, src_path: str, dst_path: str) -> int:
    """Copy in the kernel as far as it will go; return the offset reached (< end: continue by hand)."""
    offset = start
    while offset < end:
        try:
            copied = os.copy_file_range(src_fd, dst_fd, end - offset, offset, offset)
        except OSError as exc:
            if exc.errno in _NO_COPY_FILE_RANGE:
                return offset
            path = dst_path if exc.errno in _DESTINATION_ERRNOS else src_path
            raise FilesystemError.from_os(exc, op="copy", path=path) from exc
        if copied == 0:
            # Either the source shrank or the filesystem reports 0 instead of refusing (procfs-like);
            # the read/write path tells the two apart.
            return offset
        offset += copied
    return offset


def _copy_through(
    src_fd: int, dst_fd: int, start: int, end: int, buffer: memoryview, *, src_path: str, dst_path: str
) -> None:
    """pread/pwrite copy of [start, end) for pairs copy_file_range refuses."""
    offset = start
    while offset < end:
        want = min(len(buffer), end - offset)
        try:
            got = os.preadv(src_fd, [buffer[:want]], offset)
        except OSError as exc:
            raise FilesystemError.from_os(exc, op="copy", path=src_path) from exc
        if got == 0:
            raise TemplateChanged(src_path, f"file ended at byte {offset}, inside a data extent, while copied")
        written = 0
        while written < got:
            try:
                written += os.pwrite(dst_fd, buffer[written:got], offset + written)
            except OSError as exc:
                raise FilesystemError.from_os(exc, op="copy", path=dst_path) from exc
        offset += got
