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


def refuse_tmpfile(monkeypatch: pytest.MonkeyPatch) -> None:
    """From now on, O_TMPFILE fails as on a filesystem without it (EOPNOTSUPP); every other open works."""
    real = os.open

    def no_tmpfile(path: Any, flags: int, *args: Any, **kw: Any) -> int:
        if flags & os.O_TMPFILE == os.O_TMPFILE:
            raise OSError(errno.EOPNOTSUPP, "Operation not supported")
        return real(path, flags, *args, **kw)

    monkeypatch.setattr(os, "open", no_tmpfile)


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
    refuse_tmpfile(monkeypatch)
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


def test_a_symlink_to_a_true_source_is_not_trusted(tmp_path: Path) -> None:
    """A symlink under the digest's name is replaced even when it leads to a file holding the digest: a link
    can be repointed at any time, so only a regular file of our own is shared into stamps."""
    directory = tmp_path / "stamps"
    directory.mkdir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.write_text(DIGEST)
    (directory / DIGEST).symlink_to(elsewhere)
    assert read_fd(_must(StampSources(directory).open(DIGEST))) == DIGEST.encode()
    assert stat.S_ISREG((directory / DIGEST).lstat().st_mode)
    assert elsewhere.read_text() == DIGEST


def test_sources_are_made_under_missing_parents(tmp_path: Path) -> None:
    """The stamps directory and any missing parent are made on first use."""
    directory = tmp_path / "a" / "b" / "stamps"
    assert read_fd(_must(StampSources(directory).open(DIGEST))) == DIGEST.encode()
    assert (directory / DIGEST).read_text() == DIGEST


def test_failures_are_logged_with_their_cause_and_leak_no_descriptor(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Each way of having no source logs what failed where and why (the clone then writes its stamp), and a
    source that could not be flushed is closed, not leaked."""
    directory = tmp_path / "stamps"
    caplog.set_level(logging.INFO, logger="worker.core.stamps")

    def fail(code: int) -> Any:
        def raiser(*_: Any, **__: Any) -> Any:
            raise OSError(code, os.strerror(code))

        return raiser

    monkeypatch.setattr(os, "fsync", fail(errno.EIO))
    before = open_fds()
    assert StampSources(directory).open(DIGEST) is None
    assert open_fds() == before
    assert caplog.messages[-1] == f"could not make the stamp source {DIGEST} in {directory}: [Errno 5] {os.strerror(5)}"
    monkeypatch.undo()

    monkeypatch.setattr(os, "write", lambda fd, data: 10)
    assert StampSources(directory).open(DIGEST) is None
    assert caplog.messages[-1] == f"could not make the stamp source {DIGEST} in {directory}: [Errno 5] short write"
    monkeypatch.undo()

    refuse_tmpfile(monkeypatch)
    assert StampSources(directory).open(DIGEST) is None
    assert caplog.messages[-1] == f"cannot make a stamp source in {directory}: [Errno 95] Operation not supported"
    monkeypatch.undo()

    monkeypatch.setattr(os, "link", fail(errno.ENOENT))
    assert read_fd(_must(StampSources(directory).open(DIGEST))) == DIGEST.encode()
    assert caplog.messages[-1] == (
        f"could not name the stamp source {DIGEST} in {directory}: [Errno 2] {os.strerror(errno.ENOENT)}"
    )
    monkeypatch.undo()

    (directory / DIGEST).mkdir()
    assert StampSources(directory).open(DIGEST) is None
    assert caplog.messages[-1].startswith(f"cannot replace {DIGEST} in {directory}: [Errno 21] ")


@pytest.mark.parametrize(
    ("where", "code"),
    [
        ("a dangling symlink on the way", errno.EEXIST),
        ("a file on the way", errno.ENOTDIR),
        ("no access", errno.EACCES),
    ],
)
def test_no_stamps_directory_means_no_source_and_a_warning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, where: str, code: int
) -> None:
    """A stamps directory that cannot be made (a dangling symlink where a parent belongs) or opened (a file on
    the way, no access) gives no source and one warning naming it and the errno."""
    directory = tmp_path / "stamps"
    if where == "a dangling symlink on the way":
        (tmp_path / "link").symlink_to(tmp_path / "nowhere")
        directory = tmp_path / "link" / "stamps"
    elif where == "a file on the way":
        (tmp_path / "blocker").write_text("x")
        directory = tmp_path / "blocker" / "stamps"
    else:
        directory.mkdir()
        real_open = os.open

        def refuse(path: Any, flags: int, *args: Any, **kw: Any) -> int:
            if str(path) == str(directory):
                raise OSError(errno.EACCES, os.strerror(errno.EACCES))
            return real_open(path, flags, *args, **kw)

        monkeypatch.setattr(os, "open", refuse)
    with caplog.at_level(logging.WARNING, logger="worker.core.stamps"):
        assert StampSources(directory).open(DIGEST) is None
    assert len(caplog.messages) == 1
    assert caplog.messages[0].startswith(f"no stamp sources at {directory}: [Errno {code}] {os.strerror(code)}")


def test_reusing_a_kept_source_opens_nothing_new(tmp_path: Path) -> None:
    """The same hash asked for again and again costs no new descriptor once the caller closes its own."""
    sources = StampSources(tmp_path / "stamps")
    os.close(_must(sources.open(DIGEST)))
    before = open_fds()
    for _ in range(3 * stamps._KEEP_OPEN):
        os.close(_must(sources.open(DIGEST)))
    assert open_fds() == before


def test_the_most_recent_sources_stay_open(tmp_path: Path) -> None:
    """Up to _KEEP_OPEN sources stay open: once the oldest of them is deleted by name, asking for it again
    still hands out its bytes without making it anew; one more than that and the oldest is made again."""
    sources = StampSources(tmp_path / "stamps")
    digests = [f"{n:064x}" for n in range(stamps._KEEP_OPEN + 1)]
    for digest in digests[: stamps._KEEP_OPEN]:
        os.close(_must(sources.open(digest)))
    (tmp_path / "stamps" / digests[0]).unlink()
    assert read_fd(_must(sources.open(digests[0]))) == digests[0].encode()
    assert not (tmp_path / "stamps" / digests[0]).exists()
    os.close(_must(sources.open(digests[-1])))  # evicts the least recently used: digests[1]
    (tmp_path / "stamps" / digests[1]).unlink()
    assert read_fd(_must(sources.open(digests[1]))) == digests[1].encode()
    assert (tmp_path / "stamps" / digests[1]).read_text() == digests[1]


def test_prune_skips_what_it_cannot_delete(tmp_path: Path) -> None:
    """A directory among the sources is left (and no error raised); the sources around it are pruned."""
    sources = StampSources(tmp_path / "stamps")
    for digest in (DIGEST, OTHER):
        os.close(_must(sources.open(digest)))
    (tmp_path / "stamps" / "subdir").mkdir()
    sources.prune(set())
    assert os.listdir(tmp_path / "stamps") == ["subdir"]


def test_an_unreadable_descriptor_holds_no_digest(tmp_path: Path) -> None:
    """A descriptor that cannot be read (a directory's) never passes for a source."""
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        assert stamps._holds(fd, DIGEST) is False
    finally:
        os.close(fd)
    path = tmp_path / "s"
    path.write_text(DIGEST)
    fd = os.open(path, os.O_RDONLY)
    try:
        assert stamps._holds(fd, DIGEST) is True
    finally:
        os.close(fd)


def test_a_stamps_directory_made_by_another_process_meanwhile_is_used(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two first users race to make the stamps directory: the one whose mkdir finds it made still gets a source."""
    directory = tmp_path / "stamps"
    real_open = os.open
    first = [True]

    def raced(path: Any, flags: int, *args: Any, **kw: Any) -> int:
        if str(path) == str(directory) and first[0]:
            first[0] = False
            directory.mkdir()  # the other process, between our open and our mkdir
            raise FileNotFoundError(errno.ENOENT, "No such file or directory")
        return real_open(path, flags, *args, **kw)

    monkeypatch.setattr(os, "open", raced)
    assert read_fd(_must(StampSources(directory).open(DIGEST))) == DIGEST.encode()
