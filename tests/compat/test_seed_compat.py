"""On-disk compatibility, both ways, between our registry and the ORIGINAL Rust seed.

The seed (tests/compat/seed_harness/src/rootfs.rs, a byte-identical copy) is built once per session into a
small CLI by tests/compat/build_seed.sh, offline, from Debian's packaged crates. Each test lets one side
write and the other side read the same template and clones directories.

Where the seed clones depends on the filesystems: `cp --reflink=always`, else a hard link to the template,
else a copy. So most tests keep templates and clones on two filesystems (templates on the /dev/shm tmpfs,
clones under tmp_path): the seed then makes a real, independent copy, the only kind of clone we adopt as is.
The one layout where the seed hard-links (both on one non-reflink filesystem) has a test of its own.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from worker import RootfsConfig, RootfsRegistry, StampMismatch, safe_vm_id

ROOT = Path(__file__).resolve().parents[2]
BUILD_SCRIPT = ROOT / "tests" / "compat" / "build_seed.sh"
#: build_seed.sh's exit status when there is no cargo on the machine.
NO_CARGO = 3
SHM = Path("/dev/shm")
MIB = 1024 * 1024
HEX64 = re.compile(rb"[0-9a-f]{64}")

#: (vm id, stack): one plain id, one the seed and we must both sanitise the same way, one empty image.
CLONES = [("vm-1", "base"), ("vm/7:sparse", "sparse"), ("VM_empty", "empty")]


@pytest.fixture(scope="session")
def seed_binary() -> Path:
    """The seed CLI, built (or found up to date) once per session."""
    try:
        done = subprocess.run([str(BUILD_SCRIPT)], capture_output=True, text=True, check=False, timeout=900)
    except FileNotFoundError as exc:
        pytest.fail(f"cannot run {BUILD_SCRIPT}: {exc}")
    if done.returncode == NO_CARGO:
        pytest.skip(f"the Rust seed cannot be built: {done.stderr.strip()}")
    if done.returncode != 0:
        pytest.fail(f"{BUILD_SCRIPT} failed ({done.returncode}):\n{done.stderr}")
    binary = Path(done.stdout.strip().splitlines()[-1])
    assert binary.is_file() and os.access(binary, os.X_OK), binary
    return binary


@dataclass
class World:
    """One template dir and one clones dir, driven by the seed CLI or by a fresh registry of ours."""

    binary: Path
    template_dir: Path
    clones_dir: Path

    def registry(self) -> RootfsRegistry:
        """A new registry per call, as another worker process would have."""
        return RootfsRegistry(RootfsConfig(self.template_dir, self.clones_dir))

    def seed(self, *args: str) -> subprocess.CompletedProcess[str]:
        env = {
            **os.environ,
            "MICROVM_ROOTFS_TEMPLATE_DIR": str(self.template_dir),
            "MICROVM_ROOTFS_CLONES_DIR": str(self.clones_dir),
        }
        return subprocess.run(
            [str(self.binary), *args], capture_output=True, text=True, env=env, check=False, timeout=60
        )

    def seed_ok(self, *args: str) -> Any:
        done = self.seed(*args)
        assert done.returncode == 0, f"seed {' '.join(args)} failed: {done.stderr.strip()}"
        return json.loads(done.stdout) if done.stdout.strip() else None

    def seed_clone(self, vm_id: str, stack: str) -> dict[str, str]:
        out: dict[str, str] = self.seed_ok("clone", vm_id, stack)
        return out

    def vm_dir(self, vm_id: str) -> Path:
        return self.clones_dir / safe_vm_id(vm_id)

    def populate(self) -> None:
        """A few stacks, one sparse and one empty, plus entries neither side counts as a stack."""
        write(self.template_dir / "base" / "rootfs.ext4", b"BASE-ROOTFS" * 1000)
        write(self.template_dir / "node-20" / "rootfs.ext4", b"NODE-20-ROOTFS")
        write(self.template_dir / "empty" / "rootfs.ext4", b"")
        write_sparse(self.template_dir / "sparse" / "rootfs.ext4", size=32 * MIB)
        (self.template_dir / "incomplete").mkdir()
        write(self.template_dir / "stray-file", b"not a stack")


def write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def write_sparse(path: Path, *, size: int) -> None:
    """`size` bytes, mostly holes, with 256 KiB of data at four places."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as f:
        f.truncate(size)
        for i in range(4):
            f.seek(i * (size // 4) + 4096)
            f.write(bytes([i + 1]) * (256 * 1024))
    assert path.stat().st_blocks * 512 < size // 2, "the sparse template is not sparse"


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def identity(path: Path) -> tuple[int, int, int, int, str]:
    """Device, inode, mtime, size and content hash: unchanged means nobody touched or replaced the file."""
    st = path.stat()
    return (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size, sha256_of(path))


@pytest.fixture
def world(seed_binary: Path, tmp_path: Path) -> Iterator[World]:
    """Templates on the /dev/shm tmpfs, clones under tmp_path: two filesystems, so the seed copies."""
    if not SHM.is_dir() or SHM.stat().st_dev == tmp_path.stat().st_dev:
        pytest.skip("needs /dev/shm on another filesystem than tmp_path, so that the seed cannot hard-link")
    with tempfile.TemporaryDirectory(dir=SHM, prefix="seed-compat-") as shm:
        w = World(seed_binary, Path(shm) / "templates", tmp_path / "clones")
        w.template_dir.mkdir()
        w.populate()
        yield w


@pytest.fixture
def same_fs(seed_binary: Path, tmp_path: Path) -> World:
    """Templates and clones both under tmp_path: one filesystem, where the seed may hard-link."""
    w = World(seed_binary, tmp_path / "templates", tmp_path / "clones")
    w.template_dir.mkdir()
    w.populate()
    return w


# ------------------------------------------------------------------------------------------------ stacks


def test_both_list_the_same_stacks(world: World) -> None:
    """Seed and registry list the same stacks with the same names, sizes and sha256 (the true ones)."""
    ours = [{"name": s.name, "size_bytes": s.size_bytes, "sha256": s.sha256} for s in world.registry().stacks()]
    theirs = world.seed_ok("stacks")
    assert ours == theirs
    assert [s["name"] for s in ours] == ["base", "empty", "node-20", "sparse"]
    for s in ours:
        template = world.template_dir / str(s["name"]) / "rootfs.ext4"
        assert s["size_bytes"] == template.stat().st_size
        assert s["sha256"] == sha256_of(template)


# ------------------------------------------------------------------------------------ seed -> registry


@pytest.mark.parametrize(("vm_id", "stack"), CLONES)
def test_seed_clone_is_adopted_untouched(world: World, vm_id: str, stack: str) -> None:
    """A clone the seed made is our idempotent answer: same path and source_sha256, same inode and bytes."""
    theirs = world.seed_clone(vm_id, stack)
    clone = Path(theirs["path"])
    stamp = world.vm_dir(vm_id) / "rootfs.ext4.sha256"
    assert clone.stat().st_nlink == 1, "on two filesystems the seed must have copied"
    before, stamp_before = identity(clone), stamp.read_bytes()

    ours = world.registry().clone_for_vm(vm_id, stack)

    assert ours.vm_id == theirs["vm_id"] == safe_vm_id(vm_id)
    assert ours.stack == theirs["stack"] == stack
    assert ours.path == clone == world.vm_dir(vm_id) / "rootfs.ext4"
    template_sha = sha256_of(world.template_dir / stack / "rootfs.ext4")
    assert ours.source_sha256 == theirs["source_sha256"] == template_sha
    assert identity(clone) == before, "the seed's clone was rewritten or replaced, not adopted"
    assert stamp.read_bytes() == stamp_before
    # Adopting it (we record the owner beside it) does not disturb the seed either.
    assert world.seed_clone(vm_id, stack) == theirs
    assert identity(clone) == before


def test_seed_clones_are_listed_as_foreign_with_their_stack(world: World) -> None:
    """Our inventory lists the seed's clones as `foreign`, their stack inferred from the stamp; adopting one
    makes it `complete` with our record, and the seed still takes it."""
    registry = world.registry()
    registry.stacks()  # warm: the inference reads the cache only
    for vm_id, stack in CLONES:
        world.seed_clone(vm_id, stack)
    listed = {c.dir: c for c in registry.clones()}
    assert {d: (c.state, c.stack, c.stale) for d, c in listed.items()} == {
        safe_vm_id(vm_id): ("foreign", stack, False) for vm_id, stack in CLONES
    }
    registry.clone_for_vm("vm-1", "base")
    adopted = {c.dir: c for c in registry.clones()}["vm-1"]
    assert (adopted.state, adopted.stack, adopted.vm_id) == ("complete", "base", "vm-1")
    assert adopted.created == listed["vm-1"].created  # the seed's stamp time, not the adoption's
    assert world.seed_clone("vm-1", "base")["source_sha256"] == adopted.source_sha256


# ------------------------------------------------------------------------------------ registry -> seed


@pytest.mark.parametrize(("vm_id", "stack"), CLONES)
def test_our_clone_is_accepted_by_the_seed(world: World, vm_id: str, stack: str) -> None:
    """The seed takes a clone we made as its idempotent answer; our stamp is 64 lowercase hex, no newline."""
    ours = world.registry().clone_for_vm(vm_id, stack)
    stamp = ours.path.parent / "rootfs.ext4.sha256"
    raw = stamp.read_bytes()
    assert HEX64.fullmatch(raw), f"stamp is not exactly 64 lowercase hex digits: {raw!r}"
    assert raw.decode() == ours.source_sha256
    before = identity(ours.path)

    theirs = world.seed_clone(vm_id, stack)

    assert theirs == {
        "vm_id": ours.vm_id,
        "stack": ours.stack,
        "path": str(ours.path),
        "source_sha256": ours.source_sha256,
    }
    assert identity(ours.path) == before
    assert stamp.read_bytes() == raw


def test_stamps_are_byte_identical_both_ways(world: World) -> None:
    """For one template, the stamp file we write has exactly the bytes of the one the seed writes."""
    world.seed_clone("by-seed", "base")
    world.registry().clone_for_vm("by-us", "base")
    seed_stamp = (world.vm_dir("by-seed") / "rootfs.ext4.sha256").read_bytes()
    our_stamp = (world.vm_dir("by-us") / "rootfs.ext4.sha256").read_bytes()
    assert our_stamp == seed_stamp
    assert HEX64.fullmatch(seed_stamp)


# ------------------------------------------------------------------------------------------- release


def test_seed_release_removes_our_clone(world: World) -> None:
    """The seed's release removes a clone directory we made, completely, and again is not an error."""
    ours = world.registry().clone_for_vm("vm/7:sparse", "sparse")
    vm_dir = ours.path.parent
    assert vm_dir.is_dir()

    world.seed_ok("release", "vm/7:sparse")
    assert not os.path.lexists(vm_dir)
    world.seed_ok("release", "vm/7:sparse")

    registry = world.registry()
    assert registry.release("vm/7:sparse") is False, "nothing left for us to release"
    assert not [p for p in world.clones_dir.iterdir() if not p.name.startswith(".")], "a clone dir is left"
    # And the slot is usable again by either side.
    assert registry.clone_for_vm("vm/7:sparse", "sparse").path == ours.path


def test_our_release_removes_a_seed_clone(world: World) -> None:
    """Our release removes a clone directory the seed made, completely, and again is not an error."""
    theirs = world.seed_clone("vm-1", "base")
    vm_dir = Path(theirs["path"]).parent

    assert world.registry().release("vm-1") is True
    assert not os.path.lexists(vm_dir)
    assert world.registry().release("vm-1") is False
    world.seed_ok("release", "vm-1")

    trash = world.clones_dir / ".trash"
    assert not trash.exists() or not list(trash.iterdir()), "the released clone was not deleted"
    assert not [p for p in world.clones_dir.iterdir() if not p.name.startswith(".")], "a clone dir is left"


# ------------------------------------------------------------------------------------- stamp mismatch


def test_changed_template_is_refused_by_both(world: World) -> None:
    """After the template changes, both refuse the seed's clone: the seed with its error, we StampMismatch."""
    theirs = world.seed_clone("vm-1", "base")
    clone = Path(theirs["path"])
    before = identity(clone)
    template = world.template_dir / "base" / "rootfs.ext4"
    template.write_bytes(b"BASE-ROOTFS-v2")
    new_sha = sha256_of(template)

    refused = world.seed("clone", "vm-1", "base")
    assert refused.returncode == 1
    assert "stamp mismatch" in refused.stderr

    with pytest.raises(StampMismatch) as caught:
        world.registry().clone_for_vm("vm-1", "base")
    err = caught.value
    assert (err.vm_id, err.stack) == ("vm-1", "base")
    assert err.stamp == theirs["source_sha256"]
    assert err.template_sha256 == new_sha
    # Same message as the seed's, which operators grep for.
    assert str(err) in refused.stderr
    assert identity(clone) == before, "a refused clone must be left as it was"


# ------------------------------------------------------------------------- one filesystem, no reflink


def test_seed_hard_link_on_one_filesystem_is_replaced_by_a_copy(same_fs: World) -> None:
    """Where the seed hard-links the template, we hand out a private copy at the same path, same stamp."""
    template = same_fs.template_dir / "base" / "rootfs.ext4"
    template_before = identity(template)
    theirs = same_fs.seed_clone("vm-1", "base")
    clone = Path(theirs["path"])
    if clone.stat().st_ino != template.stat().st_ino:
        pytest.skip("the seed did not hard-link here (reflink-capable filesystem): nothing to replace")

    ours = same_fs.registry().clone_for_vm("vm-1", "base")

    assert (ours.path, ours.source_sha256) == (clone, theirs["source_sha256"])
    assert clone.stat().st_ino != template.stat().st_ino, "the VM would write into the template"
    assert clone.stat().st_nlink == 1
    assert sha256_of(clone) == theirs["source_sha256"]
    assert identity(template) == template_before
    # The seed accepts the replacement as its own idempotent answer.
    assert same_fs.seed_clone("vm-1", "base") == theirs
