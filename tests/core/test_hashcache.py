"""The shared template-hash cache: keyed by everything that moves when a file's bytes can have changed, a
damaged entry is a miss, one computation per file across processes, and it never stops a hash from being made."""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from tests.helpers import wait_until
from worker.core import locks
from worker.core.hashcache import FileKey, HashCache

KEY = FileKey(dev=2049, ino=1234, size=4096, mtime_ns=1_700_000_000_000_000_001, ctime_ns=1_700_000_000_000_000_002)
DIGEST = "ab" * 32
OTHER = "cd" * 32


def entries(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if p.is_file())


def test_file_key_is_device_inode_size_mtime_and_ctime(tmp_path: Path) -> None:
    """A file's key holds its device, inode, size and both timestamps in ns, and two files never share one."""
    a, b = tmp_path / "a", tmp_path / "b"
    a.write_bytes(b"12345")
    b.write_bytes(b"12345")
    st = os.stat(a)
    assert FileKey.of(st) == FileKey(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    assert FileKey.of(os.stat(a)) == FileKey.of(os.stat(a))
    assert FileKey.of(os.stat(a)) != FileKey.of(os.stat(b))


@pytest.mark.parametrize("changed", ["dev", "ino", "size", "mtime_ns", "ctime_ns"])
def test_every_key_field_matters(tmp_path: Path, changed: str) -> None:
    """A hash stored for one key is not served for a key that differs in any one field, by memory or by disk."""
    cache = HashCache(tmp_path / "hashes")
    cache.put(KEY, DIGEST)
    other = dataclasses.replace(KEY, **{changed: getattr(KEY, changed) + 1})
    assert cache.get(other) is None
    assert HashCache(tmp_path / "hashes").get(other) is None
    assert cache.get(KEY) == DIGEST
    assert HashCache(tmp_path / "hashes").get(KEY) == DIGEST


def test_entries_survive_the_process_and_older_states_are_pruned(tmp_path: Path) -> None:
    """A new state of a file replaces its old entry on disk; entries of other files (even inode 12 beside 1) stay."""
    directory = tmp_path / "hashes"
    cache = HashCache(directory)
    neighbour = dataclasses.replace(KEY, ino=KEY.ino * 10)  # 12340: its name starts with the same digits
    cache.put(neighbour, OTHER)
    cache.put(KEY, DIGEST)
    grown = dataclasses.replace(KEY, size=KEY.size + 1, ctime_ns=KEY.ctime_ns + 1)
    cache.put(grown, OTHER)
    fresh = HashCache(directory)
    assert fresh.get(grown) == OTHER
    assert fresh.get(neighbour) == OTHER
    assert fresh.get(KEY) is None
    assert len(entries(directory)) == 2
    assert not [p for p in directory.iterdir() if p.name.endswith(".tmp")]


def write_entry(directory: Path, body: str) -> Path:
    """Overwrite the one entry in `directory` with `body`."""
    (entry,) = [p for p in entries(directory) if p.suffix == ".json"]
    entry.write_text(body)
    return entry


def stored(key: FileKey, digest: object) -> dict[str, object]:
    return {"key": dataclasses.asdict(key), "sha256": digest}


@pytest.mark.parametrize(
    "damage",
    [
        "truncated",
        "not-a-dict",
        "not-json",
        "non-hex",
        "upper-case",
        "short",
        "long",
        "other-key",
        "no-key",
        "no-digest",
        "digest-not-a-string",
    ],
)
def test_damaged_entry_is_a_miss_and_is_rewritten(tmp_path: Path, damage: str) -> None:
    """Whatever is wrong with an entry, it is never served: the hash is computed again and the entry repaired."""
    directory = tmp_path / "hashes"
    HashCache(directory).put(KEY, DIGEST)
    good = json.dumps(stored(KEY, DIGEST))
    bodies = {
        "truncated": good[: len(good) // 2],
        "not-a-dict": json.dumps([stored(KEY, DIGEST)]),
        "not-json": "\x00\x01 garbage",
        "non-hex": json.dumps(stored(KEY, "zz" * 32)),
        "upper-case": json.dumps(stored(KEY, DIGEST.upper())),
        "short": json.dumps(stored(KEY, DIGEST[:-1])),
        "long": json.dumps(stored(KEY, DIGEST + "a")),
        "other-key": json.dumps(stored(dataclasses.replace(KEY, ino=KEY.ino + 1), DIGEST)),
        "no-key": json.dumps({"sha256": DIGEST}),
        "no-digest": json.dumps({"key": dataclasses.asdict(KEY)}),
        "digest-not-a-string": json.dumps(stored(KEY, 12)),
    }
    write_entry(directory, bodies[damage])
    cache = HashCache(directory)
    assert cache.get(KEY) is None
    computed: list[bool] = []

    def compute() -> str:
        computed.append(True)
        return OTHER

    assert cache.get_or_compute(KEY, compute) == (OTHER, True)
    assert computed == [True]
    assert HashCache(directory).get(KEY) == OTHER


def test_intact_entry_is_served_without_computing(tmp_path: Path) -> None:
    """An entry written by another process answers get_or_compute without calling compute."""
    directory = tmp_path / "hashes"
    HashCache(directory).put(KEY, DIGEST)

    def must_not_run() -> str:
        raise AssertionError("computed although the entry was intact")

    assert HashCache(directory).get_or_compute(KEY, must_not_run) == (DIGEST, False)


def test_a_caller_that_waited_for_the_computation_gets_it_as_not_computed(tmp_path: Path) -> None:
    """Two callers at once: the first computes (computed=True), the second waits for it and computes nothing."""
    directory = tmp_path / "hashes"
    release = threading.Event()
    results: dict[str, tuple[str, bool]] = {}
    computations: list[str] = []

    def slow() -> str:
        computations.append("first")
        assert release.wait(30)
        return DIGEST

    def second() -> str:
        computations.append("second")
        return OTHER

    first = threading.Thread(
        target=lambda: results.__setitem__("first", HashCache(directory).get_or_compute(KEY, slow))
    )
    first.start()
    wait_until(lambda: computations == ["first"], what="the first caller to start computing", timeout=20)
    waiter = threading.Thread(
        target=lambda: results.__setitem__("second", HashCache(directory).get_or_compute(KEY, second))
    )
    waiter.start()
    lock_file = directory / "locks" / f"{KEY.dev}-{KEY.ino}.lock"
    wait_until(lambda: _waiters(lock_file) == 1, what="the second caller to wait for the lock", timeout=20)
    release.set()
    first.join(30)
    waiter.join(30)
    assert results == {"first": (DIGEST, True), "second": (DIGEST, False)}
    assert computations == ["first"]


def _waiters(lock_file: Path) -> int:
    try:
        ino = lock_file.stat().st_ino
    except FileNotFoundError:
        return 0
    lines = Path("/proc/locks").read_text().splitlines()
    return sum(1 for line in lines if "->" in line.split() and line.split()[-3].endswith(f":{ino}"))


def test_unusable_cache_dir_still_gives_hashes(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Where the cache cannot be written (a file in the way) hashes are still computed and served, with a warning."""
    (tmp_path / "clones").write_text("not a directory")
    directory = tmp_path / "clones" / "hashes"
    cache = HashCache(directory)
    assert cache.directory == directory
    assert cache.get(KEY) is None
    assert cache.get_or_compute(KEY, lambda: DIGEST) == (DIGEST, True)
    lock = directory / "locks" / f"{KEY.dev}-{KEY.ino}.lock"
    assert caplog.messages == [
        f"hash cache {directory} not usable (lock {lock}: Not a directory (ENOTDIR)); hashing without it"
    ]
    caplog.clear()
    cache.put(KEY, OTHER)  # cannot persist: a warning, not an error, and memory still answers
    assert caplog.messages == [
        f"could not persist hash cache entry {KEY.entry_name}: [Errno 20] Not a directory: '{directory}'"
    ]
    assert cache.get(KEY) == OTHER
    assert HashCache(directory).get(KEY) is None


def test_a_hit_takes_no_lock(tmp_path: Path) -> None:
    """A cached hash is served at once even while another caller holds that file's lock (to hash a new state)."""
    directory = tmp_path / "hashes"
    HashCache(directory).put(KEY, DIGEST)
    answer: list[tuple[str, bool]] = []
    with locks.exclusive(directory / "locks" / f"{KEY.dev}-{KEY.ino}.lock"):
        reader = threading.Thread(target=lambda: answer.append(HashCache(directory).get_or_compute(KEY, lambda: OTHER)))
        reader.start()
        wait_until(lambda: bool(answer), what="the cached answer while the lock is held", timeout=20)
    reader.join(30)
    assert answer == [(DIGEST, False)]


def test_an_old_entry_that_cannot_be_pruned_does_not_fail_the_new_one(tmp_path: Path) -> None:
    """Pruning is best effort: an old entry that resists removal stays, and the new entry is stored and served."""
    directory = tmp_path / "hashes"
    cache = HashCache(directory)
    cache.put(KEY, DIGEST)
    (old,) = entries(directory)
    if subprocess.run(["chattr", "+i", str(old)], capture_output=True, check=False).returncode != 0:
        pytest.skip("chattr +i is not supported here")
    try:
        grown = dataclasses.replace(KEY, size=KEY.size + 1)
        cache.put(grown, OTHER)
        assert HashCache(directory).get(grown) == OTHER
        assert old.exists()
    finally:
        subprocess.run(["chattr", "-i", str(old)], check=True)


def test_a_hit_read_from_disk_is_remembered(tmp_path: Path) -> None:
    """An entry read once is served from memory afterwards, also once the file is gone; a miss is not remembered."""
    directory = tmp_path / "hashes"
    HashCache(directory).put(KEY, DIGEST)
    cache = HashCache(directory)
    other = dataclasses.replace(KEY, ino=KEY.ino + 1)
    assert cache.get(other) is None
    assert cache.get(KEY) == DIGEST
    for entry in entries(directory):
        entry.unlink()
    assert cache.get(KEY) == DIGEST
    HashCache(directory).put(other, OTHER)
    assert cache.get(other) == OTHER


def test_entries_are_stored_under_a_cache_dir_that_does_not_exist_yet(tmp_path: Path) -> None:
    """The first entry creates the cache directory and its parents."""
    directory = tmp_path / "clones" / ".cache" / "hashes"
    HashCache(directory).put(KEY, DIGEST)
    assert HashCache(directory).get(KEY) == DIGEST


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(done.stdout)


def test_sweep_removes_the_temp_files_of_dead_writers_and_strays_only(tmp_path: Path) -> None:
    """sweep_temp_files deletes temp entries whose writer is gone and temp-named strays not of our making; it keeps
    those of live writers (this process's other threads included), entries, and files that are not temp files."""
    directory = tmp_path / "hashes"
    cache = HashCache(directory)
    cache.put(KEY, DIGEST)
    name = KEY.entry_name
    dead = [f".{name}.{dead_pid()}.7.tmp", ".stray.notapid.1.tmp", ".stray.tmp", ".x.5.tmp"]
    alive = [f".{name}.{os.getpid()}.1.tmp", f".{name}.{os.getppid()}.2.tmp", "notdotted.1.1.tmp", f".{name}.1.1.tmpx"]
    for stray in dead + alive:
        (directory / stray).write_text("{")
    cache.sweep_temp_files()
    assert sorted(p.name for p in directory.iterdir() if p.is_file()) == sorted([name, *alive])
    assert HashCache(directory).get(KEY) == DIGEST
    HashCache(tmp_path / "missing").sweep_temp_files()  # no cache dir yet: nothing to sweep, no error
    assert not (tmp_path / "missing").exists()


#: A stand-in writer: records every signal it gets (whatever dispositions it inherited), says "ready", and
#: prints what it got once its stdin closes.
_SIGNAL_RECORDER = """
import signal, sys
got = []
for sig in (signal.SIGHUP, signal.SIGINT, signal.SIGQUIT, signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2):
    signal.signal(sig, lambda number, frame: got.append(number))
print("ready", flush=True)
sys.stdin.read()
print(sorted(got), flush=True)
"""


def test_sweep_never_signals_the_writer_it_asks_about(tmp_path: Path) -> None:
    """Asking whether a temp file's writer lives sends it no signal: a live writer keeps its file and runs on."""
    directory = tmp_path / "hashes"
    directory.mkdir()
    writer = subprocess.Popen(
        [sys.executable, "-c", _SIGNAL_RECORDER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert writer.stdout is not None and writer.stdout.readline().strip() == "ready"
        temp = directory / f".{KEY.entry_name}.{writer.pid}.1.tmp"
        temp.write_text("{")
        HashCache(directory).sweep_temp_files()
        assert temp.exists()
    finally:
        assert writer.stdin is not None and writer.stdout is not None
        writer.stdin.close()
        received = writer.stdout.read().strip()
        writer.wait()
        writer.stdout.close()
    assert received == "[]"


def test_a_writer_we_may_not_signal_is_taken_for_alive(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A temp file whose writer exists but may not be signalled (another user's process: EPERM) is kept."""
    directory = tmp_path / "hashes"
    directory.mkdir()
    temp = directory / f".{KEY.entry_name}.{dead_pid()}.1.tmp"
    temp.write_text("{")

    def not_permitted(pid: int, sig: int) -> None:
        raise PermissionError(errno.EPERM, "Operation not permitted")

    with monkeypatch.context() as patched:
        patched.setattr(os, "kill", not_permitted)
        HashCache(directory).sweep_temp_files()
    assert temp.exists()
    HashCache(directory).sweep_temp_files()
    assert not temp.exists()


def test_a_temp_file_that_cannot_be_removed_does_not_stop_the_sweep(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The sweep goes on past a dead writer's temp file it cannot remove: the others are still removed."""
    directory = tmp_path / "hashes"
    directory.mkdir()
    pid = dead_pid()
    for n in range(3):
        (directory / f".{KEY.entry_name}.{pid}.{n}.tmp").write_text("{")
    real_unlink = os.unlink
    refused: list[str] = []

    def unlink_all_but_the_first(name: str, *, dir_fd: int | None = None) -> None:
        if not refused:
            refused.append(name)
            raise PermissionError(errno.EPERM, "Operation not permitted", name)
        real_unlink(name, dir_fd=dir_fd)

    monkeypatch.setattr(os, "unlink", unlink_all_but_the_first)
    HashCache(directory).sweep_temp_files()
    assert [p.name for p in directory.iterdir()] == refused


def test_put_sweeps_the_dead_writers_temp_files_of_its_entry(tmp_path: Path) -> None:
    """Storing an entry removes what a killed writer of the same entry left, and keeps a live writer's file."""
    directory = tmp_path / "hashes"
    directory.mkdir()
    orphan = directory / f".{KEY.entry_name}.{dead_pid()}.1.tmp"
    live = directory / f".{KEY.entry_name}.{os.getppid()}.1.tmp"
    other = directory / f".{dataclasses.replace(KEY, ino=7).entry_name}.{dead_pid()}.1.tmp"  # another entry's
    for temp in (orphan, live, other):
        temp.write_text("{")
    HashCache(directory).put(KEY, DIGEST)
    assert not orphan.exists()
    assert live.exists() and other.exists()
    assert HashCache(directory).get(KEY) == DIGEST


def test_entries_are_readable_by_all_and_writable_by_their_owner(tmp_path: Path) -> None:
    """An entry is created 0644 (other workers' users may read it), whatever the umask allows."""
    directory = tmp_path / "hashes"
    old = os.umask(0)
    try:
        HashCache(directory).put(KEY, DIGEST)
    finally:
        os.umask(old)
    assert stat.S_IMODE((directory / KEY.entry_name).stat().st_mode) == 0o644


def temp_name(key: FileKey) -> str:
    """The name put() writes an entry under before renaming it (in this process and thread)."""
    return f".{key.entry_name}.{os.getpid()}.{threading.get_ident()}.tmp"


def test_a_symlink_at_the_temp_name_is_not_followed(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A symlink planted where put() writes its temp file is not followed: the file it points to is untouched,
    the entry is not stored (a warning says why), the planted link is cleared, and memory still answers."""
    directory = tmp_path / "hashes"
    directory.mkdir()
    target = tmp_path / "target"
    target.write_text("precious")
    (directory / temp_name(KEY)).symlink_to(target)
    cache = HashCache(directory)
    cache.put(KEY, DIGEST)
    assert target.read_text() == "precious"
    assert caplog.messages == [
        f"could not persist hash cache entry {KEY.entry_name}: [Errno 17] File exists: '{temp_name(KEY)}'"
    ]
    assert list(directory.iterdir()) == []
    assert cache.get(KEY) == DIGEST
    assert HashCache(directory).get(KEY) is None


@pytest.mark.parametrize("failing", ["open", "write"])
def test_an_entry_that_cannot_be_written_leaves_a_warning_and_no_temp_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, failing: str
) -> None:
    """A full disk while storing an entry (creating or writing its temp file) is a warning, not an error; no
    temp file is left behind, and memory still answers."""
    directory = tmp_path / "hashes"
    directory.mkdir()
    real_open = os.open

    def full_open(path: str, flags: int, mode: int = 0o777, *, dir_fd: int | None = None) -> int:
        if failing == "open" and str(path).endswith(".tmp"):
            raise OSError(errno.ENOSPC, "No space left on device", path)
        return real_open(path, flags, mode, dir_fd=dir_fd)

    def full_write(fd: int, data: bytes) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    cache = HashCache(directory)
    with monkeypatch.context() as patched:
        patched.setattr(os, "open", full_open)
        if failing == "write":
            patched.setattr(os, "write", full_write)
        cache.put(KEY, DIGEST)
    detail = f": '{temp_name(KEY)}'" if failing == "open" else ""
    assert caplog.messages == [
        f"could not persist hash cache entry {KEY.entry_name}: [Errno 28] No space left on device{detail}"
    ]
    assert list(directory.iterdir()) == []
    assert cache.get(KEY) == DIGEST
    assert HashCache(directory).get(KEY) is None
