"""Stamp sources (worker.core.stamps): one file per template hash holding it, trusted only when exactly that."""

from __future__ import annotations

import errno
import logging
import os
import stat
from pathlib import Path
from typing import Any

import pytest

from worker.core import stamps
from worker.core.stamps import StampSources

DIGEST = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
OTHER = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"


def read_fd(fd: int) -> bytes:
    try:
        return os.pread(fd, 4096, 0)
    finally:
        os.close(fd)


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_a_source_is_made_once_holding_its_own_name(tmp_path: Path) -> None:
    """The first open makes `<dir>/<digest>`, a read-only regular file of exactly the 64 digits; later opens
    reuse that file (same inode), and every fd handed out reads the digest."""
    sources = StampSources(tmp_path / "stamps")
    assert read_fd(_must(sources.open(DIGEST))) == DIGEST.encode()
    path = tmp_path / "stamps" / DIGEST
    st = path.lstat()
    assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o444 and st.st_size == 64
    assert path.read_bytes() == DIGEST.encode()
    assert read_fd(_must(sources.open(DIGEST))) == DIGEST.encode()
    assert read_fd(_must(StampSources(tmp_path / "stamps").open(DIGEST))) == DIGEST.encode()
    assert path.lstat().st_ino == st.st_ino
    assert sorted(os.listdir(tmp_path / "stamps")) == [DIGEST]


def test_a_source_is_on_disk_before_it_has_a_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The source is flushed while still unnamed (O_TMPFILE), then linked: no name ever leads to a source whose
    bytes a power cut could lose."""
    events: list[str] = []
    real_fsync, real_link = os.fsync, os.link

    def fsync(fd: int) -> None:
        events.append("fsync " + os.readlink(f"/proc/self/fd/{fd}").rsplit("/", 1)[-1][:7])
        real_fsync(fd)

    def link(src: Any, dst: Any, **kw: Any) -> None:
        events.append(f"link {dst}")
        real_link(src, dst, **kw)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "link", link)
    os.close(_must(StampSources(tmp_path / "stamps").open(DIGEST)))
    assert events[0].startswith("fsync #") and events[1:] == [f"link {DIGEST}"]  # "#<ino> (deleted)": unnamed


@pytest.mark.parametrize("damage", ["other bytes", "too long", "empty", "symlink to /dev/zero", "fifo"])
def test_a_damaged_source_is_replaced(tmp_path: Path, damage: str) -> None:
    """Whatever sits under the digest's name but is not exactly it is replaced by a true source, without
    blocking (a FIFO) or following a link (to /dev/zero); the fd handed out reads the digest."""
    directory = tmp_path / "stamps"
    directory.mkdir()
    path = directory / DIGEST
    if damage == "other bytes":
        path.write_text(OTHER)
    elif damage == "too long":
        path.write_text(DIGEST + "\n")
    elif damage == "empty":
        path.write_bytes(b"")
    elif damage == "symlink to /dev/zero":
        path.symlink_to("/dev/zero")
    else:
        os.mkfifo(path)
    assert read_fd(_must(StampSources(directory).open(DIGEST))) == DIGEST.encode()
    assert stat.S_ISREG(path.lstat().st_mode) and path.read_bytes() == DIGEST.encode()


def test_a_source_changed_in_place_after_it_was_opened_is_not_used(tmp_path: Path) -> None:
    """A source kept open is checked at every use: once its bytes changed under the same inode, a new source is
    made and handed out instead."""
    sources = StampSources(tmp_path / "stamps")
    os.close(_must(sources.open(DIGEST)))
    path = tmp_path / "stamps" / DIGEST
    path.chmod(0o644)
    path.write_text(OTHER)  # in place: same inode
    assert read_fd(_must(sources.open(DIGEST))) == DIGEST.encode()
    assert path.read_bytes() == DIGEST.encode()


def test_a_directory_in_the_way_means_no_source_and_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A directory under the digest's name cannot be replaced: no source (the clone writes its stamp instead),
    a warning naming it, and the directory untouched."""
    (tmp_path / "stamps" / DIGEST).mkdir(parents=True)
    with caplog.at_level(logging.WARNING, logger="worker.core.stamps"):
        assert StampSources(tmp_path / "stamps").open(DIGEST) is None
    assert (tmp_path / "stamps" / DIGEST).is_dir()
    assert any(DIGEST in message for message in caplog.messages)


def test_no_source_where_unnamed_files_cannot_be_made(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A filesystem without O_TMPFILE (or a read-only one) gives no source and leaves nothing behind; the same
    directory gives one once it can."""
    real = os.open

    def no_tmpfile(path: Any, flags: int, *args: Any, **kw: Any) -> int:
        if flags & os.O_TMPFILE == os.O_TMPFILE:
            raise OSError(errno.EOPNOTSUPP, "Operation not supported")
        return real(path, flags, *args, **kw)

    monkeypatch.setattr(os, "open", no_tmpfile)
    sources = StampSources(tmp_path / "stamps")
    assert sources.open(DIGEST) is None
    assert os.listdir(tmp_path / "stamps") == []
    monkeypatch.undo()
    assert read_fd(_must(sources.open(DIGEST))) == DIGEST.encode()


def test_only_a_digest_names_a_source(tmp_path: Path) -> None:
    """A name that is not 64 lowercase hex digits never becomes a file (no path can be smuggled in)."""
    sources = StampSources(tmp_path / "stamps")
    for bad in ("../../etc/passwd", DIGEST.upper(), DIGEST[:-1], DIGEST + "0", ""):
        assert sources.open(bad) is None
    assert not (tmp_path / "stamps").exists()
    assert sources.open(DIGEST) is not None


def test_prune_keeps_only_the_given_hashes(tmp_path: Path) -> None:
    """Pruning deletes every source (and stray entry) but those of the given hashes."""
    sources = StampSources(tmp_path / "stamps")
    for digest in (DIGEST, OTHER):
        os.close(_must(sources.open(digest)))
    (tmp_path / "stamps" / "stray").write_text("x")
    sources.prune({DIGEST})
    assert os.listdir(tmp_path / "stamps") == [DIGEST]
    StampSources(tmp_path / "missing").prune(set())  # nothing there: nothing to do, no error


def test_sources_kept_open_are_bounded(tmp_path: Path) -> None:
    """However many hashes a worker stamps, it keeps at most a few sources open (no fd leak), and each still
    hands out the right bytes."""
    sources = StampSources(tmp_path / "stamps")
    os.close(_must(sources.open(DIGEST)))
    before = open_fds()
    digests = [f"{n:064x}" for n in range(3 * stamps._KEEP_OPEN)]
    for digest in digests:
        assert read_fd(_must(sources.open(digest))) == digest.encode()
    assert open_fds() - before <= stamps._KEEP_OPEN
    assert read_fd(_must(sources.open(digests[0]))) == digests[0].encode()


def _must(fd: int | None) -> int:
    assert fd is not None, "no stamp source"
    return fd


def test_a_source_that_cannot_be_named_is_still_used(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without a way to name it (no /proc for linkat), the flushed, unnamed source is handed out all the same,
    once per process: the next open reuses it instead of flushing another."""
    flushes: list[int] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        flushes.append(fd)
        real_fsync(fd)

    def no_link(*_: Any, **__: Any) -> None:
        raise OSError(errno.ENOENT, "No such file or directory")

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "link", no_link)
    sources = StampSources(tmp_path / "stamps")
    assert read_fd(_must(sources.open(DIGEST))) == DIGEST.encode()
    assert read_fd(_must(sources.open(DIGEST))) == DIGEST.encode()
    assert len(flushes) == 1
    assert os.listdir(tmp_path / "stamps") == []
