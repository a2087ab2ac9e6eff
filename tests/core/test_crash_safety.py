"""What issue 10 fixed, one behaviour per test: hostile cache entries, templates held open for writing,
releases that crashed, temp files of killed warm-ups, flushes in flight together, both hash strategies."""

from __future__ import annotations

import errno
import fcntl
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Env
from tests.helpers import MIB, record_fsyncs, sha256_of
from worker import TemplateBusy
from worker.core import cloning, durability, hashing
from worker.core.hashcache import FileKey
from worker.errors import FilesystemError, TemplateChanged


def entry_path(env: Env, template: Path) -> Path:
    return env.clones_dir / ".cache" / "hashes" / FileKey.of(os.stat(template)).entry_name


# ------------------------------------------------------------------------------------ hostile cache entries


@pytest.mark.parametrize("kind", ["fifo", "symlink-to-dev-zero", "huge-file", "directory"])
def test_odd_cache_entry_is_a_miss_not_a_hang(env: Env, kind: str) -> None:
    """A FIFO, a symlink to /dev/zero, a huge file or a directory where a cache entry belongs is a miss: the
    clone hashes the template itself, gets the right hash, and does not hang or run out of memory."""
    template = env.template("base", b"template-bytes" * 100)
    entry = entry_path(env, template)
    entry.parent.mkdir(parents=True)
    if kind == "fifo":
        os.mkfifo(entry)
    elif kind == "symlink-to-dev-zero":
        entry.symlink_to("/dev/zero")
    elif kind == "huge-file":
        with entry.open("wb") as f:
            f.truncate(1 << 30)
    else:
        entry.mkdir()
    rootfs = env.registry.clone_for_vm("vm-1", "base")
    assert rootfs.source_sha256 == sha256_of(template)
    assert sha256_of(rootfs.path) == sha256_of(template)


def test_valid_cache_entry_is_still_a_hit(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    """The positive case: a well-formed entry written by another process is used without hashing."""
    env.template("base", b"template-bytes" * 100)
    env.registry.warm()

    def no_hashing(*_: Any, **__: Any) -> str:
        raise AssertionError("hashed although the cache held the hash")

    monkeypatch.setattr(hashing, "hash_fd", no_hashing)
    assert env.registry_again().clone_for_vm("vm-1", "base").path.exists()


def test_killed_warm_up_temp_files_are_swept(env: Env) -> None:
    """A cache temp file whose writer is dead is deleted by the next warm-up; one of a live process stays."""
    template = env.template("base", b"abc")
    hashes = env.clones_dir / ".cache" / "hashes"
    hashes.mkdir(parents=True)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    name = FileKey.of(os.stat(template)).entry_name
    orphan = hashes / f".{name}.{int(dead.stdout)}.1.tmp"
    orphan.write_text("{")
    live = hashes / f".{name}.{os.getppid()}.1.tmp"
    live.write_text("{")
    env.registry.warm()
    assert not orphan.exists()
    assert live.exists()


# ------------------------------------------------------------------------------- templates being written


def test_template_open_for_writing_is_busy(env: Env) -> None:
    """While another process holds the template open for writing (an in-place `cp`), clone and hash refuse
    with a transient TemplateBusy and leave nothing; once it is closed, the clone works."""
    template = env.template("base", b"v1" * 1000)
    hold_open = "import sys; f = open(sys.argv[1], 'ab'); print('open', flush=True); sys.stdin.read()"
    writer = subprocess.Popen(
        [sys.executable, "-c", hold_open, str(template)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert writer.stdout is not None and writer.stdout.readline().strip() == "open"
        with pytest.raises(TemplateBusy) as info:
            env.registry.clone_for_vm("vm-1", "base")
        assert info.value.transient
        assert not (env.clones_dir / "vm-1").exists()
        with pytest.raises(TemplateBusy):
            env.registry.stack("base")
    finally:
        assert writer.stdin is not None and writer.stdout is not None
        writer.stdin.close()
        writer.wait()
        writer.stdout.close()
    assert sha256_of(env.registry.clone_for_vm("vm-1", "base").path) == sha256_of(template)


def test_writer_opening_during_the_copy_makes_the_clone_busy(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    """A writer that opens the template while it is being copied breaks the lease: the clone fails with
    TemplateBusy instead of stamping what it read, and the writer proceeds once we let go."""
    template = env.template("base", b"v1" * 1000)
    env.forget(template)
    real = cloning.clone_fd
    wrote = threading.Event()

    def write_in_place() -> None:
        with template.open("r+b") as f:  # blocks until the clone lets go of its lease
            f.write(b"v2")
        wrote.set()

    def copy_while_a_writer_opens(src: int, dst: int, **kw: Any) -> cloning.CloneMethod:
        threading.Thread(target=write_in_place, daemon=True).start()
        deadline = time.monotonic() + 10
        while fcntl.fcntl(src, fcntl.F_GETLEASE) == fcntl.F_RDLCK and time.monotonic() < deadline:
            time.sleep(0.005)
        return real(src, dst, **kw)

    env.registry.stack("base")  # hash cached: the writer arrives during the copy
    monkeypatch.setattr(cloning, "clone_fd", copy_while_a_writer_opens)
    with pytest.raises(TemplateBusy):
        env.registry.clone_for_vm("vm-1", "base")
    assert wrote.wait(10), "the writer stayed blocked after the clone gave up"
    assert not (env.clones_dir / "vm-1").exists()


def test_template_published_by_rename_is_never_busy(env: Env) -> None:
    """The safe way to publish (write beside, rename over) never makes a clone fail, and the next clone gets
    the new bytes."""
    template = env.template("base", b"v1" * 1000)
    env.forget(template)
    beside = template.with_name(".rootfs.ext4.new")
    with beside.open("wb") as f:
        f.write(b"v2" * 1000)
        assert env.registry.clone_for_vm("vm-1", "base").path.read_bytes() == b"v1" * 1000
    beside.rename(template)
    assert env.registry.clone_for_vm("vm-2", "base").path.read_bytes() == b"v2" * 1000


# ---------------------------------------------------------------------------------------- releases


def test_release_finishes_what_a_crashed_release_left_in_the_trash(env: Env) -> None:
    """A clone left in `.trash` by a release that died is deleted by the next release, even one that finds
    nothing to release."""
    env.template("base", b"abc")
    env.registry.clone_for_vm("vm-1", "base")
    trash = env.clones_dir / ".trash"
    trash.mkdir()
    (env.clones_dir / "vm-1").rename(trash / "vm-1.0123abcd")
    assert env.registry.release("vm-1") is False
    assert list(trash.iterdir()) == []


def test_failing_trash_sweep_does_not_fail_the_release(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    """When emptying the trash fails (EIO listing it), the release that removed the VM still reports it."""
    env.template("base", b"abc")
    env.registry.clone_for_vm("vm-1", "base")
    real = os.scandir

    def failing_scandir(path: Any = ".") -> Any:
        if str(path).endswith(".trash"):
            raise OSError(errno.EIO, "Input/output error")
        return real(path)

    monkeypatch.setattr(os, "scandir", failing_scandir)
    assert env.registry.release("vm-1") is True
    assert not (env.clones_dir / "vm-1").exists()
    monkeypatch.setattr(os, "scandir", real)
    assert env.registry.release("vm-1") is False
    assert list((env.clones_dir / ".trash").iterdir()) == []


# --------------------------------------------------------------------------------------- durability


def test_a_clone_into_a_crashed_clones_directory_flushes_no_record(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    """Cloning into a directory an interrupted clone left (records there, no disk) rewrites the records
    without flushing them (C11's directory flush covers them): the same four flushes as a fresh clone."""
    env.template("base", b"abc" * 1000)
    env.registry.stack("base")
    vm_dir = env.clones_dir / "vm-1"
    vm_dir.mkdir(parents=True)
    (vm_dir / ".vm-id").write_text("")  # a record a power cut emptied: no owner yet
    (vm_dir / ".clone.json").write_text('{"vm_id": "vm-1", "stack": "other", "created": 1}')
    (vm_dir / "rootfs.ext4.partial").write_bytes(b"half")
    flushed = record_fsyncs(monkeypatch)
    rootfs = env.registry.clone_for_vm("vm-1", "base")
    assert flushed == [
        str(vm_dir / "rootfs.ext4.sha256"),
        str(vm_dir / "rootfs.ext4.partial"),
        str(vm_dir),
        str(env.clones_dir),
    ]
    assert rootfs.path.read_bytes() == b"abc" * 1000
    assert (vm_dir / ".vm-id").read_text() == "vm-1"
    assert '"stack": "base"' in (vm_dir / ".clone.json").read_text()


def test_clone_flushes_in_two_ordered_pairs(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without reflink a clone flushes its stamp (named at once: nothing trusts a stamp without a clone) then
    its data (still a partial, so before the clone is named), then its VM directory then the clones dir: each
    pair ordered so that the first flush's journal commit covers the second (two disk round trips), and
    everything flushed before the clone is reported."""
    env.template("base", b"abc" * 1000)
    env.registry.stack("base")
    flushed = record_fsyncs(monkeypatch)
    rootfs = env.registry.clone_for_vm("vm-1", "base")
    vm_dir = env.clones_dir / "vm-1"
    assert flushed == [
        str(vm_dir / "rootfs.ext4.sha256"),
        str(vm_dir / "rootfs.ext4.partial"),
        str(vm_dir),
        str(env.clones_dir),
    ]
    assert rootfs.path.exists()


@pytest.mark.parametrize("concurrent", [False, True])
def test_failed_flush_raises_after_all_flushes_ended(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, concurrent: bool
) -> None:
    """fsync_together raises the failing target's error as a FilesystemError, once every flush is done."""
    a, b = tmp_path / "a", tmp_path / "b"
    fds = [os.open(p, os.O_WRONLY | os.O_CREAT) for p in (a, b)]
    done: list[int] = []
    real = os.fsync

    def fsync(fd: int) -> None:
        time.sleep(0.05)
        done.append(fd)
        if fd == fds[1]:
            raise OSError(errno.EIO, "Input/output error")
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    try:
        with pytest.raises(FilesystemError) as info:
            durability.fsync_together([(fds[0], a), (fds[1], b)], op="flush", concurrent=concurrent)
        assert info.value.path == str(b) and info.value.transient
        assert sorted(done) == sorted(fds)
    finally:
        for fd in fds:
            os.close(fd)


def open_files(tmp_path: Path, count: int) -> tuple[list[tuple[int, Path]], list[int]]:
    """`count` new files under tmp_path, open for writing: as fsync_together's targets, and their fds."""
    targets = [(os.open(tmp_path / f"f{i}", os.O_WRONLY | os.O_CREAT), tmp_path / f"f{i}") for i in range(count)]
    return targets, [fd for fd, _ in targets]


@pytest.mark.parametrize("concurrent", [False, True])
def test_concurrent_flushes_overlap_on_fsync_helper_threads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, concurrent: bool
) -> None:
    """With `concurrent`, a pair's flushes run at the same time, the second on a thread named fsync_N (as
    logs and thread dumps show it); without, both run in order on the caller's thread."""
    targets, fds = open_files(tmp_path, 2)
    meet = threading.Barrier(2, timeout=5)  # passed only by two flushes that are under way together
    seen: list[tuple[int, str]] = []
    real = os.fsync

    def fsync(fd: int) -> None:
        seen.append((fd, threading.current_thread().name))
        if concurrent:
            meet.wait()
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    me = threading.current_thread().name
    try:
        durability.fsync_together(targets, op="flush", concurrent=concurrent)
    finally:
        for fd in fds:
            os.close(fd)
    if not concurrent:
        assert seen == [(fds[0], me), (fds[1], me)]
    else:
        assert sorted(fd for fd, _ in seen) == fds
        assert dict(seen)[fds[0]] == me
        assert re.fullmatch(r"fsync_\d+", dict(seen)[fds[1]]), seen


def test_a_process_flushes_on_at_most_three_helpers_it_keeps(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Five files flushed at once use the caller and three helper threads, never more; the next group
    reuses those threads, and a new process (a forked Celery child) starts its own."""
    targets, fds = open_files(tmp_path, 5)
    me = threading.current_thread()
    started = threading.Event()
    used: dict[int, threading.Thread] = {}
    real = os.fsync

    def fsync(fd: int) -> None:
        if threading.current_thread() is me:
            started.set()  # every helper's flush was submitted before the caller's own: none has finished
        else:
            started.wait(5)
        used[fd] = threading.current_thread()
        real(fd)

    def group() -> set[threading.Thread]:
        used.clear()
        started.clear()
        durability.fsync_together(targets, op="flush", concurrent=True)
        assert sorted(used) == sorted(fds) and used[fds[0]] is me
        return {thread for fd, thread in used.items() if fd != fds[0]}

    monkeypatch.setattr(os, "fsync", fsync)
    try:
        parents = group()
        pid = os.getpid()
        monkeypatch.setattr(os, "getpid", lambda: pid + 1)  # as seen from a forked child
        first = group()
        assert len(first) == 3 and not first & parents
        assert all(re.fullmatch(r"fsync_\d+", thread.name) for thread in first)
        again = group()
        assert again <= first
    finally:
        for fd in fds:
            os.close(fd)


# ------------------------------------------------------------------------------------ hash strategies


@pytest.mark.parametrize("strategy", ["serial", "threaded"])
@pytest.mark.parametrize("layout", ["dense", "sparse", "hole-at-end"])
def test_both_hash_strategies_give_the_file_hash(tmp_path: Path, strategy: hashing.Strategy, layout: str) -> None:
    """Serial and threaded hashing agree with hashlib on dense files and files with holes."""
    path = tmp_path / "img"
    with path.open("wb") as f:
        if layout == "dense":
            f.write(os.urandom(3 * MIB + 17))
        else:
            f.truncate(9 * MIB + 5)
            f.seek(2 * MIB + 3)
            f.write(os.urandom(MIB))
            if layout == "sparse":
                f.seek(9 * MIB)
                f.write(b"tail!")
    fd = os.open(path, os.O_RDONLY)
    try:
        assert hashing.hash_fd(fd, path=str(path), strategy=strategy) == sha256_of(path)
    finally:
        os.close(fd)


@pytest.mark.parametrize("strategy", ["serial", "threaded"])
def test_both_hash_strategies_refuse_a_truncated_file(tmp_path: Path, strategy: hashing.Strategy) -> None:
    """A file truncated while hashed is a transient TemplateChanged under either strategy."""
    path = tmp_path / "img"
    path.write_bytes(os.urandom(200 * MIB // 2))
    fd = os.open(path, os.O_RDONLY)

    def truncate(done: int, total: int) -> None:
        os.truncate(path, MIB)

    try:
        with pytest.raises(TemplateChanged) as info:
            hashing.hash_fd(fd, path=str(path), strategy=strategy, progress=truncate)
        assert info.value.transient
    finally:
        os.close(fd)


def test_default_strategy_follows_the_cores_this_process_may_use(monkeypatch: pytest.MonkeyPatch) -> None:
    """Threads only with a core to spare for the reader: one thread on 1-2 cores, threads on 3 or more."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: {0, 1})
    assert hashing.default_strategy() == "serial"
    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: {0, 1, 2, 3})
    assert hashing.default_strategy() == "threaded"
