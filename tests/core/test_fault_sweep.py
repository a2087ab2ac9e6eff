"""The fault sweep: SIGKILL, EIO and ENOSPC at every file syscall of every registry operation.

How a point is run and judged: tests/sweep/harness.py. Adding an operation (issue 11's reconcile and
start-up fix-up, say) is one entry in OPERATIONS (and its call in tests.sweep.zygote.CALLS).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import sha256_of, xfs_reflink_mount
from tests.sweep.harness import VM_DIR_FILES, Operation, Report, Scene, Victim, sweep
from worker.core.layout import CLONE_ROOTFS_FILE, CLONE_STAMP_FILE, OWNER_FILE
from worker.core.registry import RootfsRegistry
from worker.dev.templates import MIB, write_sparse

pytestmark = pytest.mark.slow

PROJECT_ROOT = Path(__file__).resolve().parents[2]
STACK = "base"
VM_ID = "vm-1"


def clone_args(scene: Scene) -> dict[str, str]:
    return {"vm_id": scene.vm_id, "stack": scene.stack}


def empty(scene: Scene) -> None:
    scene.reset()


def warm_cache(scene: Scene) -> None:
    scene.reset()
    scene.registry().warm()


def cloned(scene: Scene) -> None:
    scene.reset()
    scene.registry().clone_for_vm(scene.vm_id, scene.stack)


def has_clone(scene: Scene) -> None:
    vm_dir = scene.clones_dir / scene.vm_id
    names = {p.name for p in vm_dir.iterdir()} if vm_dir.is_dir() else set()
    assert names == VM_DIR_FILES, f"{vm_dir} holds {sorted(names)}"
    assert sha256_of(vm_dir / CLONE_ROOTFS_FILE) == scene.digest, "the clone's bytes are not the template's"
    assert (vm_dir / CLONE_STAMP_FILE).read_text() == scene.digest, "the stamp is not the template's hash"
    assert (vm_dir / OWNER_FILE).read_text() == scene.vm_id, "the owner record is not the vm id"


def vm_gone(scene: Scene) -> None:
    assert not os.path.lexists(scene.clones_dir / scene.vm_id), "the VM's directory is still there"


def hash_cached(scene: Scene) -> None:
    report = scene.registry().warm()
    assert report.already_warm == (scene.stack,), f"after a warm-up, a fresh warm-up did {report}"


def crashed_leftovers(scene: Scene) -> None:
    """A clone to keep, plus what crashed calls leave: a clone in the trash, a VM dir with only partials."""
    cloned(scene)
    (scene.clones_dir / ".trash" / "vm-9.0123abcd").mkdir(parents=True)
    (scene.clones_dir / ".trash" / "vm-9.0123abcd" / CLONE_ROOTFS_FILE).write_bytes(b"x" * 4096)
    half = scene.clones_dir / "vm-2"
    half.mkdir()
    (half / OWNER_FILE).write_text("vm-2")
    (half / (CLONE_ROOTFS_FILE + ".partial")).write_bytes(b"y" * 4096)
    day_ago = time.time() - 86400  # past any grace period a fix-up gives a clone that may still be running
    for path in (half / OWNER_FILE, half / (CLONE_ROOTFS_FILE + ".partial"), half):
        os.utime(path, (day_ago, day_ago))


def fixed_up(scene: Scene) -> None:
    has_clone(scene)
    assert not (scene.clones_dir / "vm-2").exists(), "the crashed clone's directory is still there"


#: One entry per operation: the call (tests.sweep.zygote.CALLS), its starting state, what success leaves.
OPERATIONS = {
    "clone-cold": Operation("clone-cold", "clone", clone_args, empty, has_clone, strategy="threaded"),
    "clone-cold-mapped": Operation("clone-cold-mapped", "clone", clone_args, empty, has_clone, strategy="mapped"),
    "clone-warm": Operation("clone-warm", "clone", clone_args, warm_cache, has_clone),
    "release": Operation("release", "release", clone_args, cloned, vm_gone),
    "warm": Operation("warm", "warm", lambda s: {}, empty, hash_cached, strategy="serial"),
    # Issue 11's lifecycle operations: skipped until RootfsRegistry has them.
    "reconcile": Operation("reconcile", "reconcile", lambda s: {"keep": []}, cloned, vm_gone),
    "fixup": Operation("fixup", "fixup", lambda s: {}, crashed_leftovers, fixed_up),
}
#: On the XFS loop mount, where the copy is a reflink.
XFS_OPERATIONS = {
    # Warm: the hash and the stamp source made beforehand, so the clone is the one-round-trip path alone.
    "clone-warm-reflink": Operation("clone-warm-reflink", "clone", clone_args, warm_cache, has_clone),
    # Cold: the clone also hashes and makes the stamp source (unnamed, flushed, linked) before it reflinks it.
    "clone-cold-reflink": Operation("clone-cold-reflink", "clone", clone_args, empty, has_clone, strategy="serial"),
}


def _strace_usable() -> str | None:
    """Why the sweep cannot run here, or None: strace must exist and be allowed to attach (ptrace)."""
    if shutil.which("strace") is None:
        return "strace is not installed (scripts/bootstrap.sh installs it)"
    probe = subprocess.run(
        ["strace", "-f", "-o", "/dev/null", "-e", "trace=getpid", sys.executable, "-c", "pass"],
        capture_output=True,
        text=True,
        check=False,
    )
    if probe.returncode != 0:
        return f"strace cannot trace here (ptrace not allowed?): {probe.stderr.strip()[-300:]}"
    return None


@pytest.fixture(scope="module")
def victim() -> Iterator[Victim]:
    reason = _strace_usable()
    if reason:
        pytest.skip(reason)
    v = Victim(PROJECT_ROOT)
    yield v
    v.close()


def make_scene(root: Path) -> Scene:
    template_dir, clones_dir = root / "templates", root / "clones"
    template = write_sparse(template_dir / STACK / "rootfs.ext4", size=8 * MIB, data=2 * MIB, chunks=2)
    clones_dir.mkdir(parents=True)
    return Scene(template_dir, clones_dir, STACK, VM_ID, template, sha256_of(template))


def _run(victim: Victim, op: Operation, scene: Scene, workdir: Path, capsys: pytest.CaptureFixture[str]) -> Report:
    report = sweep(victim, op, scene, workdir)
    with capsys.disabled():  # the sweep's size and time belong in every CI log, not only in failures'
        print(f"\n{report.summary()}\n  most calls per thread: {report.calls}")
    return report


@pytest.mark.parametrize("name", list(OPERATIONS))
def test_every_fault_point_keeps_the_promises(
    victim: Victim, tmp_path: Path, name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """At every file syscall of the operation, a kill, an EIO or an ENOSPC leaves a state that a fresh call
    repairs, no wrong clone, stamp or cached hash, and only RootfsErrors of the right transience."""
    method = {"clone": "clone_for_vm"}.get(OPERATIONS[name].call, OPERATIONS[name].call)
    if not hasattr(RootfsRegistry, method):
        pytest.skip(f"RootfsRegistry has no {method}() yet (issue 11)")
    report = _run(victim, OPERATIONS[name], make_scene(tmp_path), tmp_path, capsys)
    assert report.points > 0
    assert not report.violations, "\n".join(report.violations[:40])


@pytest.mark.parametrize("name", list(XFS_OPERATIONS))
def test_every_fault_point_keeps_the_promises_on_reflink(
    victim: Victim, tmp_path: Path, name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """The same sweep where the clone is a reflink (XFS loop mount)."""
    with xfs_reflink_mount(tmp_path, size_mib=300) as mount:
        report = _run(victim, XFS_OPERATIONS[name], make_scene(mount), tmp_path, capsys)
    assert report.points > 0
    assert not report.violations, "\n".join(report.violations[:40])
