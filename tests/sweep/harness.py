"""A fault at every syscall: the way SQLite and xfstests test crash safety, with strace's fault injection.

For one registry call (an *operation*), the harness first records every file syscall the call makes, per
thread, with strace attached to a child that has already imported the core (tests.sweep.zygote). Then, for
each syscall name and each N up to the most calls of that name in one thread, it runs the call again from
the same starting state with strace making the Nth call of that name (in every thread: strace counts per
thread and per syscall) kill the process (SIGKILL), or fail with EIO, or fail with ENOSPC (on the syscalls that
allocate space: SPACE_SYSCALLS). After each point:

- whatever `rootfs.ext4` exists hashes to its stamp and to the template; the template is unchanged; no cache
  entry for the template's current key holds another hash;
- a failed call raised a RootfsError, never another exception, and a transient one (EIO and ENOSPC are);
- a fresh call of the same operation (in this process, no faults) succeeds and leaves the state the
  operation promises (`converged`), with no temp, partial, trash or stray lock file anywhere.

An operation is one entry of a table (OPERATIONS in tests/core/test_fault_sweep.py): the registry call by
name (tests.sweep.zygote.CALLS), how to prepare its starting state, and what a converged state looks like.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from worker.core.config import RootfsConfig
from worker.core.layout import (
    CACHE_DIR,
    CLONE_ROOTFS_FILE,
    CLONE_STAMP_FILE,
    LOCKS_DIR,
    STAMPS_DIR,
    TRASH_DIR,
    record_names,
)
from worker.core.registry import RootfsRegistry
from worker.errors import RootfsError

#: The syscalls a fault may hit: everything the core does to files and directories.
FILE_SYSCALLS = [
    "openat",
    "open",
    "close",
    "read",
    "pread64",
    "preadv",
    "preadv2",
    "readv",
    "write",
    "pwrite64",
    "pwritev",
    "writev",
    "fsync",
    "fdatasync",
    "newfstatat",
    "fstat",
    "lstat",
    "stat",
    "statx",
    "lseek",
    "rename",
    "renameat",
    "renameat2",
    "unlink",
    "unlinkat",
    "mkdir",
    "mkdirat",
    "rmdir",
    "ftruncate",
    "ioctl",
    "copy_file_range",
    "flock",
    "fcntl",
    "getdents64",
    "readlink",
    "readlinkat",
    "fadvise64",
    "fchmod",
    "utimensat",
    "access",
    "faccessat",
    "faccessat2",
    "link",
    "linkat",
    "symlinkat",
    "mincore",  # the hasher's residency check (worker.core.pagecache): failing, the window is read instead
]

FAULTS = {"kill": "signal=KILL", "eio": "error=EIO", "enospc": "error=ENOSPC"}

#: The syscalls that can fail with ENOSPC (or EDQUOT) on Linux: those that allocate blocks or inodes. A full
#: disk never fails a read, a stat, a lock or a close, so ENOSPC is tried only here (EIO and the kill are
#: tried everywhere); this keeps the sweep within its CI budget.
SPACE_SYSCALLS = frozenset(
    {
        "openat", "open", "write", "pwrite64", "pwritev", "writev", "fsync", "fdatasync", "rename", "renameat",
        "renameat2", "mkdir", "mkdirat", "ftruncate", "ioctl", "copy_file_range", "link", "linkat", "symlinkat",
    }
)  # fmt: skip


def applies(fault: str, syscall: str) -> bool:
    return fault != "enospc" or syscall in SPACE_SYSCALLS


_LINE = re.compile(r"^(\d+)\s+(\w+)\(")
POINT_TIMEOUT = 30.0


@dataclass
class Scene:
    """The directories of one sweep and the template in them."""

    template_dir: Path
    clones_dir: Path
    stack: str
    vm_id: str
    template: Path
    digest: str

    def registry(self) -> RootfsRegistry:
        """A fresh registry: what another worker process, with nothing in memory, sees."""
        return RootfsRegistry(RootfsConfig(self.template_dir, self.clones_dir))

    def template_state(self) -> tuple[int, int, int, int, int]:
        st = os.stat(self.template)
        return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)

    def reset(self) -> None:
        """An empty clones dir."""
        shutil.rmtree(self.clones_dir, ignore_errors=True)
        self.clones_dir.mkdir()


@dataclass(frozen=True)
class Operation:
    name: str
    #: A key of tests.sweep.zygote.CALLS and its arguments (a function of the scene).
    call: str
    args: Callable[[Scene], dict[str, Any]]
    #: Brings the scene to the state before the call (in this process).
    prepare: Callable[[Scene], None]
    #: Asserts the state after a successful call (AssertionError with a reason otherwise).
    converged: Callable[[Scene], None]
    #: The hashing strategy the call runs with (None: the machine's default).
    strategy: str | None = None
    #: The faults tried at every syscall (keys of FAULTS).
    faults: tuple[str, ...] = tuple(FAULTS)


@dataclass(frozen=True)
class Point:
    fault: str
    syscall: str
    nth: int

    def __str__(self) -> str:
        return f"{self.fault} at {self.syscall} #{self.nth}"


@dataclass
class Report:
    operation: str
    calls: dict[str, int] = field(default_factory=dict)
    points: int = 0
    outcomes: collections.Counter[str] = field(default_factory=collections.Counter)
    violations: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def summary(self) -> str:
        return (
            f"fault sweep {self.operation}: {self.points} points ({sum(self.calls.values())} file syscalls x "
            f"kill, EIO; ENOSPC where space is allocated) in {self.seconds:.1f} s; outcomes {dict(self.outcomes)}; "
            f"{len(self.violations)} violations"
        )


class Victim:
    """The zygote process (imports done once) and strace around each of its children."""

    def __init__(self, project_root: Path) -> None:
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "tests.sweep.zygote"],
            cwd=project_root,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONPATH": str(project_root)},
        )

    def close(self) -> None:
        assert self._proc.stdin is not None and self._proc.stdout is not None
        self._proc.stdin.close()
        try:
            self._proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        self._proc.stdout.close()

    def _send(self, message: dict[str, Any]) -> None:
        assert self._proc.stdin is not None
        self._proc.stdin.write(json.dumps(message) + "\n")
        self._proc.stdin.flush()

    def _receive(self) -> dict[str, Any]:
        assert self._proc.stdout is not None
        line = self._proc.stdout.readline()
        if not line:
            raise RuntimeError("the sweep's zygote died")
        result: dict[str, Any] = json.loads(line)
        return result

    def run(self, op: Operation, scene: Scene, strace_args: list[str]) -> dict[str, Any]:
        """One call of `op` in a fresh child, strace attached with `strace_args` before it starts."""
        self._send(
            {
                "call": op.call,
                "args": op.args(scene),
                "template_dir": str(scene.template_dir),
                "clones_dir": str(scene.clones_dir),
                "strategy": op.strategy,
            }
        )
        pid = self._receive()["pid"]
        tracer = subprocess.Popen(
            ["strace", "-f", *strace_args, "-p", str(pid)], stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True
        )
        try:
            assert tracer.stderr is not None
            attached = tracer.stderr.readline()
            if "attached" not in attached:
                raise RuntimeError(f"strace did not attach to {pid}: {attached}{tracer.stderr.read()}")
            os.kill(pid, signal.SIGUSR1)
            with _deadline(POINT_TIMEOUT, pid):
                result = self._receive()
            tracer.wait(timeout=POINT_TIMEOUT)
        finally:
            if tracer.poll() is None:
                tracer.kill()
                tracer.wait()
            if tracer.stderr is not None:
                tracer.stderr.close()
        return result

    def record(self, op: Operation, scene: Scene, out: Path) -> dict[str, int]:
        """The most calls of each file syscall in one thread of one clean run of `op`."""
        op.prepare(scene)
        result = self.run(op, scene, ["-o", str(out), "-e", f"trace={','.join(FILE_SYSCALLS)}"])
        if result["outcome"] != "ok":
            raise AssertionError(f"{op.name} fails without faults: {result}")
        per_thread: collections.Counter[tuple[str, str]] = collections.Counter()
        for line in out.read_text().splitlines():
            match = _LINE.match(line)
            if match:
                per_thread[(match.group(1), match.group(2))] += 1
        calls: dict[str, int] = {}
        for (_, name), count in per_thread.items():
            # strace prints a call newer than itself as syscall_0x1c3 (say) and cannot inject it by that
            # name: such a call is left out of the sweep (and said so by its absence from the counts).
            if not name.startswith("syscall_"):
                calls[name] = max(calls.get(name, 0), count)
        return dict(sorted(calls.items()))


@contextlib.contextmanager
def _deadline(seconds: float, pid: int) -> Iterator[None]:
    """Kill the child if a point hangs (a FIFO read, a lock never released): the hang is then reported."""

    def expire(_signum: int, _frame: object) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def check_invariants(scene: Scene, template_state: tuple[int, ...]) -> list[str]:
    """What must hold after any fault, before anything repairs it."""
    problems = []
    if scene.template_state() != template_state:
        problems.append("template changed (stat)")
    with contextlib.suppress(FileNotFoundError):
        for entry in os.scandir(scene.clones_dir):
            clone = Path(entry.path) / CLONE_ROOTFS_FILE
            if entry.name.startswith(".") or not os.path.lexists(clone):
                continue
            stamp_path = Path(entry.path) / CLONE_STAMP_FILE
            stamp = stamp_path.read_text().strip() if stamp_path.exists() else None
            digest = sha256_file(clone)
            if stamp != digest or digest != scene.digest:
                problems.append(f"{clone} exists with stamp {stamp}, bytes {digest[:12]}, template {scene.digest[:12]}")
    for source in (scene.clones_dir / CACHE_DIR / STAMPS_DIR).glob("*"):
        # Made unnamed, flushed, then linked: a named stamp source is always whole, whatever failed.
        if not source.is_file() or source.read_bytes() != source.name.encode():
            problems.append(f"stamp source {source.name[:12]} is not a file holding its name")
    key = scene.template_state()
    for entry_path in (scene.clones_dir / CACHE_DIR / "hashes").glob("*.json"):
        try:
            data = json.loads(entry_path.read_text())
            k = data["key"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        current = (k.get("dev"), k.get("ino"), k.get("size"), k.get("mtime_ns"), k.get("ctime_ns"))
        if current == key and data.get("sha256") != scene.digest:
            problems.append(f"cache entry {entry_path.name} holds {data.get('sha256')}, not {scene.digest}")
    return problems


def leftovers(scene: Scene) -> list[str]:
    """Temp, partial, trash files anywhere, lock files of VMs that do not exist, strangers in VM dirs."""
    return (
        _temp_files(scene.clones_dir)
        + _trash(scene.clones_dir)
        + _stray_locks(scene.clones_dir)
        + _strangers(scene.clones_dir)
    )


def _temp_files(clones: Path) -> list[str]:
    return [
        os.path.relpath(os.path.join(dirpath, name), clones)
        for dirpath, dirnames, filenames in os.walk(clones)
        for name in dirnames + filenames
        if name.endswith((".partial", ".tmp"))
    ]


def _trash(clones: Path) -> list[str]:
    trash = clones / TRASH_DIR
    if trash.exists() and any(trash.iterdir()):
        return [f".trash holds {sorted(p.name for p in trash.iterdir())}"]
    return []


def _stray_locks(clones: Path) -> list[str]:
    locks = clones / LOCKS_DIR
    if not locks.exists():
        return []
    return [
        f"lock file {lock.name} of a VM that does not exist"
        for lock in locks.iterdir()
        if lock.name != ".warm.lock" and not (clones / lock.name.removesuffix(".lock")).exists()
    ]


#: Everything a complete VM directory may hold (the seed's two files and our records).
VM_DIR_FILES = frozenset({CLONE_ROOTFS_FILE, CLONE_STAMP_FILE, *record_names()})


def _strangers(clones: Path) -> list[str]:
    found = []
    expected = VM_DIR_FILES
    with contextlib.suppress(FileNotFoundError):
        for entry in os.scandir(clones):
            if not entry.name.startswith("."):
                extra = {p.name for p in Path(entry.path).iterdir()} - expected
                if extra:
                    found.append(f"{entry.name} holds {sorted(extra)}")
    return found


def fresh_call(op: Operation, scene: Scene) -> dict[str, Any]:
    from tests.sweep.zygote import CALLS, outcome

    return outcome(lambda: CALLS[op.call](scene.registry(), op.args(scene)))


def sweep(victim: Victim, op: Operation, scene: Scene, workdir: Path, *, stride: int = 1) -> Report:
    """Every point of `op` (every `stride`th N of each syscall), checked as the module docstring says."""
    started = time.monotonic()
    report = Report(op.name)
    report.calls = victim.record(op, scene, workdir / f"{op.name}.strace")
    template_state = scene.template_state()
    points = [
        Point(fault, name, nth)
        for fault in op.faults
        for name, count in report.calls.items()
        if applies(fault, name)
        for nth in range(1, count + 1, stride)
    ]
    for point in points:
        op.prepare(scene)
        args = ["-o", "/dev/null", "-e", f"trace={point.syscall}"]
        args += ["-e", f"inject={point.syscall}:{FAULTS[point.fault]}:when={point.nth}"]
        result = victim.run(op, scene, args)
        report.points += 1
        report.outcomes[result["outcome"]] += 1
        problems = _judge(point, result)
        problems += check_invariants(scene, template_state)
        again = fresh_call(op, scene)
        if again["outcome"] != "ok":
            problems.append(f"the fresh call failed: {again}")
        else:
            try:
                op.converged(scene)
            except AssertionError as exc:
                problems.append(f"not converged: {exc}")
            problems += leftovers(scene)
        report.violations += [f"{op.name}, {point}: {p}" for p in problems]
    if sha256_file(scene.template) != scene.digest:
        report.violations.append(f"{op.name}: the template's bytes changed")
    report.seconds = time.monotonic() - started
    return report


def _judge(point: Point, result: dict[str, Any]) -> list[str]:
    kind = result["outcome"]
    if kind == "foreign-error":
        return [f"raised {result['type']}, not a RootfsError: {result['message']}"]
    if kind == "no-result":
        return [f"the call ended without a result: {result}"]
    if kind == "killed" and (point.fault != "kill" or result.get("signal") != signal.SIGKILL):
        return [f"killed by signal {result.get('signal')} (a hang past {POINT_TIMEOUT:g} s?)"]
    if kind == "rootfs-error" and point.fault != "kill" and not result["transient"]:
        return [f"{result['type']} is not transient, though {point.fault} may pass: {result['message']}"]
    return []


__all__ = ["FAULTS", "Operation", "Point", "Report", "RootfsError", "Scene", "Victim", "leftovers", "sweep"]
