"""The seed's 20 tests, ported by name, then one test per defect of the seed that we fix."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import multiprocessing
import os
import stat
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Env
from tests.helpers import (
    MIB,
    evict,
    hold_open,
    record_fsyncs,
    sha256_of,
    tmpfs_mount,
    tree,
    wait_until,
    write_template,
    xfs_reflink_mount,
)
from worker import (
    FilesystemError,
    InsufficientSpace,
    InvalidStackName,
    InvalidVmId,
    RootfsConfig,
    RootfsError,
    RootfsRegistry,
    StackNotFound,
    StampMismatch,
    TemplateBusy,
    TemplateChanged,
    VmBusy,
    VmIdConflict,
    VmRootfs,
    safe_vm_id,
)
from worker.core import cloning, hashing, lease, locks
from worker.core.config import DEFAULT_CLONES_DIR, DEFAULT_TEMPLATE_DIR
from worker.core.space import Reserve

ABC = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
EMPTY = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"


def rewind_mtime(path: Path, secs: int) -> None:
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns - secs * 10**9))


class CountingHash:
    """Counts real reads of template bytes by wrapping the hashing engine."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls = 0
        real = hashing.hash_fd

        def counting(fd: int, **kw: Any) -> str:
            self.calls += 1
            return real(fd, **kw)

        monkeypatch.setattr(hashing, "hash_fd", counting)


# ------------------------------------------------------------------------------------------ seed's tests


def test_stacks_lists_all_subdirs_with_rootfs(env: Env) -> None:
    """Every directory with a rootfs.ext4 is a stack, sorted by name, with its size and own hash."""
    env.template("base", b"BASE-ROOTFS")
    env.template("node-20", b"NODE-20-ROOTFS")
    (env.template_dir / "incomplete").mkdir()
    stacks = env.registry.stacks()
    assert [s.name for s in stacks] == ["base", "node-20"]
    assert stacks[0].size_bytes == len(b"BASE-ROOTFS")
    assert stacks[0].sha256 != stacks[1].sha256


def test_stacks_returns_empty_when_template_dir_missing(tmp_path: Path) -> None:
    """A host with no template dir has no stacks, and that is not an error."""
    reg = RootfsRegistry(RootfsConfig(tmp_path / "does-not-exist", tmp_path / "clones"))
    assert reg.stacks() == []


def test_stack_by_name_returns_none_for_missing(env: Env) -> None:
    """stack() finds a present stack and answers None for an absent one."""
    env.template("base", b"x")
    assert env.registry.stack("base") is not None
    assert env.registry.stack("nope") is None


def test_new_bytes_under_a_restored_mtime_are_rehashed(env: Env) -> None:
    """New bytes under a restored mtime are still seen: the cache key includes ctime and size.

    (The seed's name for this test, test_hash_cache_skips_rehash_when_mtime_unchanged, said the opposite.)"""
    path = env.template("base", b"first-bytes")
    rewind_mtime(path, 5)
    first = env.registry.stack("base")
    assert first is not None
    mtime_before = path.stat().st_mtime_ns
    path.write_bytes(b"second-bytes-different-length")
    os.utime(path, ns=(mtime_before, mtime_before))
    env.forget(path)
    second = env.registry.stack("base")
    assert second is not None
    assert second.sha256 == sha256_of(path)
    assert second.sha256 != first.sha256


def test_hash_cache_skips_rehash_when_file_unchanged(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    """An unchanged template is read once, then served from the cache."""
    env.template("base", b"same-bytes")
    counter = CountingHash(monkeypatch)
    first = env.registry.stack("base")
    second = env.registry.stack("base")
    assert first == second
    assert counter.calls == 1


def test_hash_cache_invalidates_when_mtime_advances(env: Env) -> None:
    """Rewriting a template gives the new hash."""
    path = env.template("base", b"first")
    rewind_mtime(path, 5)
    first = env.registry.stack("base")
    env.template("base", b"second")
    second = env.registry.stack("base")
    assert first is not None and second is not None
    assert first.sha256 != second.sha256


def test_clone_creates_per_vm_copy_with_stamp(env: Env) -> None:
    """A clone is the template's bytes at <clones>/<vm>/rootfs.ext4 with the template's hash as stamp."""
    env.template("base", b"BASE-CONTENTS")
    info = env.registry.stack("base")
    assert info is not None
    rootfs = env.registry.clone_for_vm("vm-1", "base")
    assert rootfs.vm_id == "vm-1"
    assert rootfs.stack == "base"
    assert rootfs.path == env.clones_dir / "vm-1" / "rootfs.ext4"
    assert rootfs.source_sha256 == info.sha256
    assert rootfs.path.read_bytes() == b"BASE-CONTENTS"
    stamp = (env.clones_dir / "vm-1" / "rootfs.ext4.sha256").read_bytes()
    assert stamp == info.sha256.encode()  # 64 lowercase hex digits, no newline: as the seed writes it


def test_clone_is_idempotent_with_matching_stamp(env: Env) -> None:
    """Cloning the same VM twice returns the same clone, not a new copy."""
    env.template("base", b"abc")
    a = env.registry.clone_for_vm("vm-1", "base")
    ino = a.path.stat().st_ino
    b = env.registry.clone_for_vm("vm-1", "base")
    assert a == b
    assert b.path.stat().st_ino == ino


def test_clone_errors_when_stamp_mismatches_live_template(env: Env) -> None:
    """A clone stamped with other bytes is refused with a permanent stamp-mismatch error."""
    env.template("base", b"abc")
    env.registry.clone_for_vm("vm-1", "base")
    (env.clones_dir / "vm-1" / "rootfs.ext4.sha256").write_text("deadbeef" * 8)
    with pytest.raises(StampMismatch) as info:
        env.registry.clone_for_vm("vm-1", "base")
    assert "stamp mismatch" in str(info.value)
    assert not info.value.transient


def test_clone_errors_when_stack_missing(env: Env) -> None:
    """Cloning an unknown stack is a permanent error that creates no VM directory."""
    with pytest.raises(StackNotFound) as info:
        env.registry.clone_for_vm("vm-1", "ghost")
    assert not info.value.transient
    assert "ghost" in str(info.value) and str(env.template_dir) in str(info.value)
    assert not (env.clones_dir / "vm-1").exists()


def test_clone_fallback_works_on_non_reflink_filesystem(env: Env) -> None:
    """On ext4 (no reflink) the clone is still made, as a real copy."""
    env.template("base", b"fallback-must-succeed")
    rootfs = env.registry.clone_for_vm("vm-1", "base")
    assert rootfs.path.read_bytes() == b"fallback-must-succeed"


def test_clone_sanitises_vm_id_in_path(env: Env) -> None:
    """Characters outside [A-Za-z0-9_-] become '_' in the clone's directory name."""
    env.template("base", b"x")
    rootfs = env.registry.clone_for_vm("vm/with:weird*chars", "base")
    assert rootfs.vm_id == "vm_with_weird_chars"
    assert rootfs.path.is_relative_to(env.clones_dir / "vm_with_weird_chars")


def test_clone_rejects_empty_sanitised_id(env: Env) -> None:
    """An empty vm id is refused before anything is written."""
    with pytest.raises(InvalidVmId):
        env.registry.clone_for_vm("", "base")
    assert not env.clones_dir.exists()


def test_release_removes_per_vm_dir_and_is_idempotent(env: Env) -> None:
    """Release deletes the VM's directory; releasing again is fine."""
    env.template("base", b"x")
    env.registry.clone_for_vm("vm-1", "base")
    assert (env.clones_dir / "vm-1").exists()
    assert env.registry.release("vm-1") is True
    assert not (env.clones_dir / "vm-1").exists()
    assert env.registry.release("vm-1") is False
    assert tree(env.clones_dir) <= {".cache", ".cache/hashes", ".cache/hashes/locks", ".locks", ".trash"} | {
        p for p in tree(env.clones_dir) if p.startswith(".cache/")
    }


def test_hash_file_matches_standard_abc_test_vector(tmp_path: Path) -> None:
    """SHA-256 of 'abc' is the FIPS 180-2 vector."""
    path = tmp_path / "abc"
    path.write_bytes(b"abc")
    assert RootfsRegistry.hash_file(path) == ABC


def test_hash_file_handles_empty_input(tmp_path: Path) -> None:
    """SHA-256 of nothing is the known empty digest."""
    path = tmp_path / "empty"
    path.write_bytes(b"")
    assert RootfsRegistry.hash_file(path) == EMPTY


def test_hash_file_errors_on_missing_path() -> None:
    """Hashing a missing file is a permanent error naming the path."""
    with pytest.raises(FilesystemError) as info:
        RootfsRegistry.hash_file(Path("/nonexistent/path/to/nothing"))
    assert info.value.errno == errno.ENOENT and not info.value.transient
    assert "/nonexistent/path/to/nothing" in str(info.value)


def test_hash_file_handles_multi_chunk_input(tmp_path: Path) -> None:
    """10 MiB of zeros (several buffers) hash to the known digest."""
    path = tmp_path / "zeros"
    with path.open("wb") as f:
        f.truncate(10 * MIB)
    assert RootfsRegistry.hash_file(path) == "e5b844cc57f57094ea4585e235f36c78c1cd222262bb89d53c94dcb4d6b3e55d"


def test_safe_vm_id_matches_adapter_convention() -> None:
    """The sanitising map is the seed's, so both runtimes find the same directory."""
    assert safe_vm_id("vm-1") == "vm-1"
    assert safe_vm_id("vm_1") == "vm_1"
    assert safe_vm_id("VM1") == "VM1"
    assert safe_vm_id("vm/1:foo") == "vm_1_foo"
    assert safe_vm_id("a.b/c") == "a_b_c"
    assert safe_vm_id("vé") == "v_"  # one '_' per character, as Rust's chars()


def test_config_from_env_picks_up_overrides() -> None:
    """Both directories come from the environment mapping."""
    cfg = RootfsConfig.from_env(
        {"MICROVM_ROOTFS_TEMPLATE_DIR": "/tmp/mvm-test-templates", "MICROVM_ROOTFS_CLONES_DIR": "/tmp/mvm-test-clones"}
    )
    assert cfg.template_dir == Path("/tmp/mvm-test-templates")
    assert cfg.clones_dir == Path("/tmp/mvm-test-clones")


def test_config_default_paths_match_documented_constants() -> None:
    """With nothing set, the seed's default paths apply."""
    cfg = RootfsConfig.from_env({})
    assert cfg.template_dir == Path(DEFAULT_TEMPLATE_DIR) == Path("/var/lib/microvm/rootfs-templates")
    assert cfg.clones_dir == Path(DEFAULT_CLONES_DIR) == Path("/var/lib/microvm/rootfs")
    assert RootfsConfig() == cfg


# ------------------------------------------------------------------------------- the seed's defects


def test_clone_is_never_a_hard_link_to_the_template(env: Env) -> None:
    """On ext4 the clone is its own inode: a guest writing to it leaves the template intact."""
    template = env.template("base", b"pristine" * 1000)
    rootfs = env.registry.clone_for_vm("vm-1", "base")
    assert rootfs.path.stat().st_ino != template.stat().st_ino
    assert rootfs.path.stat().st_nlink == 1
    with rootfs.path.open("r+b") as f:
        f.write(b"GUEST WRITE")
    assert template.read_bytes() == b"pristine" * 1000


def test_seed_hard_link_clone_is_replaced_by_a_real_copy(env: Env) -> None:
    """A clone the seed made as a hard link to the template is never handed out as is."""
    template = env.template("base", b"shared-inode")
    info = env.registry.stack("base")
    assert info is not None
    vm_dir = env.clones_dir / "vm-1"
    vm_dir.mkdir(parents=True)
    os.link(template, vm_dir / "rootfs.ext4")
    (vm_dir / "rootfs.ext4.sha256").write_text(info.sha256)
    rootfs = env.registry.clone_for_vm("vm-1", "base")
    assert rootfs.path.stat().st_ino != template.stat().st_ino
    assert rootfs.path.read_bytes() == b"shared-inode"


@pytest.mark.slow  # a 2 GiB template (the marker: "or large files")
def test_sparse_template_clones_without_allocating_holes(env: Env) -> None:
    """A 2 GiB image with 64 MiB of data clones with no more blocks than the template."""
    template = env.sparse_template("big", size=2048 * MIB, data_mib=64)
    rootfs = env.registry.clone_for_vm("vm-1", "big")
    src, dst = template.stat(), rootfs.path.stat()
    assert dst.st_size == src.st_size
    assert dst.st_blocks <= src.st_blocks
    assert sha256_of(rootfs.path) == rootfs.source_sha256


def test_interrupted_seed_clone_without_stamp_is_redone(env: Env) -> None:
    """A rootfs.ext4 with no stamp (the seed killed mid-copy) is rebuilt, not an error forever."""
    env.template("base", b"complete-template-bytes")
    vm_dir = env.clones_dir / "vm-1"
    vm_dir.mkdir(parents=True)
    (vm_dir / "rootfs.ext4").write_bytes(b"compl")
    rootfs = env.registry.clone_for_vm("vm-1", "base")
    assert rootfs.path.read_bytes() == b"complete-template-bytes"
    assert (vm_dir / "rootfs.ext4.sha256").read_text() == rootfs.source_sha256


def _clone_in_child(template_dir: str, clones_dir: str) -> None:
    RootfsRegistry(RootfsConfig(Path(template_dir), Path(clones_dir))).clone_for_vm("vm-1", "big")


@pytest.mark.slow  # starts worker processes (the project's rule for the fast tier)
def test_clone_killed_mid_copy_leaves_no_complete_looking_file(env: Env) -> None:
    """kill -9 during the copy leaves no rootfs.ext4; the next call cleans up and completes."""
    block = os.urandom(MIB)
    path = env.template_dir / "big" / "rootfs.ext4"
    path.parent.mkdir()
    with path.open("wb") as f:
        for _ in range(768):
            f.write(block)
    env.expected[path] = sha256_of(path)
    assert env.registry.stack("big") is not None  # warm the shared cache: the child goes straight to copying
    ctx = multiprocessing.get_context("spawn")
    child = ctx.Process(target=_clone_in_child, args=(str(env.template_dir), str(env.clones_dir)))
    child.start()
    partial = env.clones_dir / "vm-1" / "rootfs.ext4.partial"
    wait_until(lambda: partial.exists() or not child.is_alive(), timeout=60, what="the copy to start", poll=0.0005)
    assert child.pid is not None
    os.kill(child.pid, 9)
    child.join()
    if child.exitcode != -9:
        pytest.skip("the child finished its copy before it could be killed")
    assert not (env.clones_dir / "vm-1" / "rootfs.ext4").exists()
    rootfs = env.registry.clone_for_vm("vm-1", "big")
    assert sha256_of(rootfs.path) == env.expected[path]
    assert sorted(p.name for p in (env.clones_dir / "vm-1").iterdir()) == [
        ".clone.json",
        ".vm-id",
        "rootfs.ext4",
        "rootfs.ext4.sha256",
    ]


def _clone_and_report(args: tuple[str, str, str]) -> tuple[str, str, int]:
    template_dir, clones_dir, vm_id = args
    reg = RootfsRegistry(RootfsConfig(Path(template_dir), Path(clones_dir)))
    r = reg.clone_for_vm(vm_id, "base")
    return str(r.path), r.source_sha256, r.path.stat().st_ino


@pytest.mark.slow  # starts worker processes (the project's rule for the fast tier)
def test_duplicate_concurrent_clones_converge_to_one(env: Env) -> None:
    """Ten processes cloning one VM at once get one clone and ten identical answers."""
    env.sparse_template("base", size=256 * MIB, data_mib=32)
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(10) as pool:
        results = pool.map(_clone_and_report, [(str(env.template_dir), str(env.clones_dir), "vm-1")] * 10)
    assert len(set(results)) == 1
    assert results[0][2] == (env.clones_dir / "vm-1" / "rootfs.ext4").stat().st_ino


def _hash_and_report(args: tuple[str, str]) -> bool:
    template_dir, clones_dir = args
    reg = RootfsRegistry(RootfsConfig(Path(template_dir), Path(clones_dir)))
    hashed = []
    reg.stack("base", progress=lambda *_: hashed.append(1))
    return bool(hashed)


@pytest.mark.slow  # starts worker processes (the project's rule for the fast tier)
def test_concurrent_cold_hashes_read_the_template_once(env: Env) -> None:
    """Four processes asking for one cold template's hash at once make one of them hash it."""
    env.sparse_template("base", size=512 * MIB, data_mib=16)
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(4) as pool:
        hashed = pool.map(_hash_and_report, [(str(env.template_dir), str(env.clones_dir))] * 4)
    assert sorted(hashed) == [False, False, False, True]


def test_hash_cache_is_shared_across_registries_and_restarts(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    """A hash computed by one registry (a warm-up in another process) serves a fresh one without reading."""
    env.template("base", b"warm-me")
    report = env.registry.warm()
    assert report.hashed == ("base",)
    counter = CountingHash(monkeypatch)
    again = env.registry_again()
    assert again.warm().already_warm == ("base",)
    again.clone_for_vm("vm-1", "base")
    assert counter.calls == 0


@pytest.mark.parametrize("damage", ["cut short", "other digest, not hex", "other file's key"])
def test_damaged_cache_entry_is_a_miss_not_a_wrong_hash(env: Env, damage: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A cache entry that was cut short or tampered with is ignored and the template is hashed again."""
    path = env.template("base", b"bytes")
    assert env.registry.stack("base") is not None
    found = list((env.clones_dir / ".cache" / "hashes").glob("*.json"))
    assert len(found) == 1, "no cache entry to damage"
    body = json.loads(found[0].read_text())
    if damage == "cut short":
        found[0].write_text('{"key": {}, "sha25')
    elif damage == "other digest, not hex":
        found[0].write_text(json.dumps({**body, "sha256": "g" * 64}))
    else:
        found[0].write_text(json.dumps({**body, "key": {**body["key"], "ino": body["key"]["ino"] + 1}}))
    counter = CountingHash(monkeypatch)
    info = env.registry_again().stack("base")
    assert info is not None and info.sha256 == sha256_of(path)
    assert counter.calls == 1


def test_same_size_rewrite_under_a_restored_mtime_is_rehashed(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    """Bytes rewritten in place, same size, mtime put back (as `touch -d` does): the ctime in the key sees it."""
    path = env.template("base", b"version-1")
    rewind_mtime(path, 5)
    first = env.registry.stack("base")
    counter = CountingHash(monkeypatch)
    assert env.registry.stack("base") == first
    assert counter.calls == 0
    st = path.stat()
    with path.open("r+b") as f:
        f.write(b"version-2")
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    env.forget(path)
    assert path.stat().st_size == st.st_size and path.stat().st_mtime_ns == st.st_mtime_ns
    for registry in (env.registry, env.registry_again()):
        second = registry.stack("base")
        assert second is not None and first is not None
        assert second.sha256 == sha256_of(path) != first.sha256


def test_template_changing_during_clone_fails_transient_and_leaves_nothing(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """If the template's metadata changes while it is copied (chmod moves its ctime), the clone fails
    (retryable) and nothing is left; a writer is caught earlier, by the lease (test_crash_safety.py)."""
    path = env.template("base", b"version-1" * 100)
    real = cloning.clone_fd

    def operator_changes_template(src: int, dst: int, **kw: Any) -> cloning.CloneMethod:
        os.chmod(path, 0o600)
        return real(src, dst, **kw)

    monkeypatch.setattr(cloning, "clone_fd", operator_changes_template)
    with pytest.raises(TemplateChanged) as info:
        env.registry.clone_for_vm("vm-1", "base")
    assert info.value.transient
    assert not (env.clones_dir / "vm-1").exists()
    monkeypatch.setattr(cloning, "clone_fd", real)
    assert env.registry.clone_for_vm("vm-1", "base").path.read_bytes() == b"version-1" * 100


def test_copy_failure_leaves_nothing_behind(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    """A copy that fails (disk full) removes the partial clone and the VM's directory."""
    env.template("base", b"x" * 4096)

    def disk_full(src: int, dst: int, **kw: Any) -> cloning.CloneMethod:
        os.write(dst, b"partial")
        raise FilesystemError.from_os(OSError(errno.ENOSPC, "No space left on device"), op="copy", path="d")

    monkeypatch.setattr(cloning, "clone_fd", disk_full)
    with pytest.raises(FilesystemError) as info:
        env.registry.clone_for_vm("vm-1", "base")
    assert info.value.transient
    assert not (env.clones_dir / "vm-1").exists()
    assert not (env.clones_dir / ".locks" / "vm-1.lock").exists()


@pytest.mark.parametrize("name", ["", ".", "..", "a/b", "../../x", "../templates/base", "x\0y", "a" * 256, "\udc80"])
def test_invalid_stack_names_are_refused_before_any_access(env: Env, name: str) -> None:
    """A stack name that is not one plain path component is a permanent error and nothing is touched."""
    outside = env.root / "outside" / "rootfs.ext4"
    outside.parent.mkdir(exist_ok=True)
    outside.write_bytes(b"not a template")
    with pytest.raises(InvalidStackName) as info:
        env.registry.clone_for_vm("vm-1", name)
    assert not info.value.transient
    with pytest.raises(InvalidStackName):
        env.registry.stack(name)
    assert not env.clones_dir.exists()


def test_symlinked_template_outside_the_template_dir_is_not_followed(env: Env) -> None:
    """A template that is a symlink out of the template dir is not a stack: not listed, not cloned."""
    outside = env.root / "outside" / "secret.img"
    outside.parent.mkdir()
    outside.write_bytes(b"host secrets")
    (env.template_dir / "evil").mkdir()
    (env.template_dir / "evil" / "rootfs.ext4").symlink_to(outside)
    env.template("base", b"fine")
    (env.template_dir / "alias").symlink_to(env.template_dir / "base")
    assert [s.name for s in env.registry.stacks()] == ["alias", "base"]
    assert env.registry.stack("evil") is None
    with pytest.raises(StackNotFound):
        env.registry.clone_for_vm("vm-1", "evil")


def test_fifo_as_template_is_not_a_stack(env: Env) -> None:
    """A FIFO where a template should be is skipped instead of hanging the worker."""
    (env.template_dir / "pipe").mkdir()
    os.mkfifo(env.template_dir / "pipe" / "rootfs.ext4")
    assert env.registry.stacks() == []
    assert env.registry.stack("pipe") is None


def test_two_vm_ids_for_one_directory_never_share_a_disk(env: Env) -> None:
    """vm/1 and vm:1 both map to vm_1: the second is refused and cannot release the first's disk."""
    env.template("base", b"x")
    first = env.registry.clone_for_vm("vm/1", "base")
    with pytest.raises(VmIdConflict) as info:
        env.registry.clone_for_vm("vm:1", "base")
    assert (info.value.vm_id, info.value.safe_id, info.value.owner) == ("vm:1", "vm_1", "vm/1")
    assert not info.value.transient
    with pytest.raises(VmIdConflict):
        env.registry.release("vm:1")
    assert first.path.exists()
    assert env.registry.release("vm/1") is True


def test_symlink_in_place_of_a_vm_dir_is_not_followed(env: Env) -> None:
    """A symlink planted where a VM's directory belongs never leads a clone outside the clones dir."""
    env.template("base", b"x")
    target = env.root / "outside"
    target.mkdir()
    env.clones_dir.mkdir()
    (env.clones_dir / "vm-1").symlink_to(target)
    with pytest.raises(FilesystemError) as info:
        env.registry.clone_for_vm("vm-1", "base")
    assert (info.value.op, info.value.path, info.value.errno) == (
        "open clone dir",
        str(env.clones_dir / "vm-1"),
        errno.ENOTDIR,  # O_DIRECTORY | O_NOFOLLOW on a symlink
    )
    with pytest.raises(FilesystemError):
        env.registry.release("vm-1")
    assert list(target.iterdir()) == []
    assert (env.clones_dir / "vm-1").is_symlink()


def test_error_round_trips_through_its_args() -> None:
    """Every error rebuilds from its args (as Celery's JSON backend does) with the same type and message."""
    errors: list[RootfsError] = [
        StackNotFound("ghost", "/t"),
        StampMismatch("vm-1", "base", "a" * 64, "b" * 64),
        VmIdConflict("vm:1", "vm_1", "vm/1"),
        TemplateChanged("/t/base/rootfs.ext4", "size 1 -> 2"),
        FilesystemError("copy", "/c/vm-1/rootfs.ext4.partial", errno.ENOSPC, "No space left on device"),
        InvalidStackName("stack", "'..'", "is a relative directory reference"),
    ]
    for err in errors:
        again = type(err)(*err.args)
        assert str(again) == str(err) and again.transient == err.transient
    assert [e.transient for e in errors] == [False, False, False, True, True, False]
    assert "ENOSPC" in str(errors[4]) and "/c/vm-1/rootfs.ext4.partial" in str(errors[4])


def test_empty_owner_record_left_by_a_power_cut_reads_as_none(env: Env) -> None:
    """An owner record that came back empty after a crash does not lock its own VM out."""
    env.template("base", b"x")
    first = env.registry.clone_for_vm("vm-1", "base")
    (env.clones_dir / "vm-1" / ".vm-id").write_bytes(b"")
    assert env.registry.clone_for_vm("vm-1", "base") == first
    assert (env.clones_dir / "vm-1" / ".vm-id").read_text() == "vm-1"


def _release(args: tuple[str, str, str]) -> bool:
    template_dir, clones_dir, vm_id = args
    return RootfsRegistry(RootfsConfig(Path(template_dir), Path(clones_dir))).release(vm_id)


@pytest.mark.slow  # starts worker processes (the project's rule for the fast tier)
def test_concurrent_releases_delete_everything(env: Env) -> None:
    """Twenty VMs released by eight processes at once: every clone is gone and the trash is empty."""
    env.sparse_template("base", size=64 * MIB, data_mib=4)
    for i in range(20):
        env.registry.clone_for_vm(f"vm-{i}", "base")
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(8) as pool:
        released = pool.map(_release, [(str(env.template_dir), str(env.clones_dir), f"vm-{i}") for i in range(20)])
    assert released == [True] * 20
    assert sorted(p.name for p in env.clones_dir.iterdir()) == [".cache", ".locks", ".trash"]
    assert list((env.clones_dir / ".trash").iterdir()) == []
    assert list((env.clones_dir / ".locks").iterdir()) == []


def test_clone_reports_how_it_was_made(env: Env) -> None:
    """The first clone says `copy` (no reflink on this tmp dir) or `reflink`; the same call again, `existing`."""
    env.template("base", os.urandom(64 * 1024))
    first = env.registry.clone_for_vm("vm-1", "base")
    assert first.method in ("copy", "reflink") and first.to_dict()["method"] == first.method
    assert env.registry.clone_for_vm("vm-1", "base").method == "existing"


def test_hash_work_counts_hits_misses_bytes_and_failed_attempts(env: Env) -> None:
    """The registry's running HashWork: one miss with the template's bytes, then hits; a clone that fails
    after hashing still counts its hash (metrics must not lose it)."""
    env.template("base", b"x" * 5000)
    env.template("other", b"y" * 3000)
    env.registry.clone_for_vm("vm-1", "base")
    env.registry.clone_for_vm("vm-2", "base")
    work = env.registry.hash_work
    assert (work.hits, work.misses, work.bytes) == (1, 1, 5000) and work.seconds > 0
    (env.clones_dir / "vm-3").mkdir()
    (env.clones_dir / "vm-3" / "rootfs.ext4").write_bytes(b"not a clone of other")
    (env.clones_dir / "vm-3" / "rootfs.ext4.sha256").write_text("0" * 64)
    with pytest.raises(StampMismatch):
        env.registry.clone_for_vm("vm-3", "other")
    after = env.registry.hash_work - work
    assert (after.hits, after.misses, after.bytes) == (0, 1, 3000)


# ------------------------------------------------------------------ found by mutation testing (issue 14)


def test_vm_id_with_surrounding_whitespace_owns_its_clone(env: Env) -> None:
    """ "vm-1 " clones, clones again and releases; "vm-1\\t" (same directory, vm-1_) is refused its disk."""
    env.template("base", b"x")
    first = env.registry.clone_for_vm("vm-1 ", "base")
    assert env.registry.clone_for_vm("vm-1 ", "base") == first
    with pytest.raises(VmIdConflict) as info:
        env.registry.clone_for_vm("vm-1\t", "base")
    assert info.value.owner == "vm-1 "
    assert env.registry.release("vm-1 ") is True
    assert not first.path.exists()


def test_symlink_planted_as_a_vms_rootfs_is_replaced_not_followed(env: Env) -> None:
    """A rootfs.ext4 that is a symlink (to a host file) is never handed out nor written through: a real clone
    replaces it and the target is untouched; a real clone in its place is kept as it is."""
    env.template("base", b"template")
    info = env.registry.stack("base")
    assert info is not None
    secret = env.root / "outside" / "host-disk.img"
    secret.parent.mkdir()
    secret.write_bytes(b"host data")
    vm_dir = env.clones_dir / "vm-1"
    vm_dir.mkdir(parents=True)
    (vm_dir / "rootfs.ext4").symlink_to(secret)
    (vm_dir / "rootfs.ext4.sha256").write_text(info.sha256)
    rootfs = env.registry.clone_for_vm("vm-1", "base")
    assert not rootfs.path.is_symlink() and stat.S_ISREG(rootfs.path.lstat().st_mode)
    assert rootfs.path.read_bytes() == b"template"
    assert secret.read_bytes() == b"host data"
    ino = rootfs.path.stat().st_ino
    assert env.registry.clone_for_vm("vm-1", "base") == rootfs
    assert rootfs.path.stat().st_ino == ino
    assert env.registry.release("vm-1") is True
    assert secret.read_bytes() == b"host data"


@pytest.mark.parametrize(("template_mode", "clone_mode"), [(0o644, 0o644), (0o444, 0o644), (0o640, 0o640)])
def test_clone_keeps_the_templates_permissions_and_is_writable_by_its_owner(
    env: Env, template_mode: int, clone_mode: int
) -> None:
    """The clone has the template's permission bits, plus read/write for its owner (the VM writes to it)."""
    path = env.template("base", b"x" * 100)
    path.chmod(template_mode)
    old_umask = os.umask(0o022)
    try:
        rootfs = env.registry.clone_for_vm("vm-1", "base")
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(rootfs.path.stat().st_mode) == clone_mode


def test_two_warm_ups_at_once_one_works_the_other_says_busy(env: Env) -> None:
    """A warm-up that starts while another runs returns at once as busy, hashing nothing; afterwards one runs."""
    env.template("a", b"a-bytes")
    env.template("b", b"b-bytes")
    during: list[object] = []

    def start_another(stack: str, done: int, total: int) -> None:
        if not during:
            during.append(env.registry_again().warm())

    first = env.registry.warm(progress=start_another)
    assert first.hashed == ("a", "b") and not first.busy
    (second,) = during
    assert second == type(first)(busy=True)
    assert second.to_dict()["busy"] is True and second.to_dict()["hashed"] == []
    third = env.registry_again().warm()
    assert not third.busy and third.already_warm == ("a", "b") and third.hashed == ()


def test_warm_up_reports_a_failing_stack_and_hashes_the_others(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    """A stack whose template cannot be read (EIO) is reported in `failed` with its error; the others are hashed,
    and the next warm-up hashes it once it reads again."""
    env.template("a-good", b"good")
    bad = env.template("b-bad", b"bad" * 1000)
    env.template("c-good", b"also good")
    evict(bad)  # read, not hashed through a mapping, so the read can fail
    real_preadv = os.preadv

    def failing_for_bad(fd: int, buffers: list[memoryview], offset: int) -> int:
        if os.readlink(f"/proc/self/fd/{fd}") == str(bad):
            raise OSError(errno.EIO, "Input/output error")
        return real_preadv(fd, buffers, offset)

    monkeypatch.setattr(os, "preadv", failing_for_bad)
    report = env.registry.warm()
    monkeypatch.undo()
    assert report.hashed == ("a-good", "c-good")
    assert report.failed == {"b-bad": f"FilesystemError: read {bad}: Input/output error (EIO)"}
    assert report.bytes_hashed == len(b"good") + len(b"also good")
    again = env.registry.warm()
    assert again.hashed == ("b-bad",) and again.already_warm == ("a-good", "c-good") and again.failed == {}
    assert again.bytes_hashed == bad.stat().st_size


def test_warm_up_skips_what_is_not_a_stack(env: Env) -> None:
    """Directories without a template and FIFOs are neither hashed nor failures, and the stacks after them are
    still warmed; the report's time is the warm-up's own."""
    (env.template_dir / "a-empty").mkdir()
    (env.template_dir / "b-pipe").mkdir()
    os.mkfifo(env.template_dir / "b-pipe" / "rootfs.ext4")
    env.template("c-base", b"x")
    started = time.monotonic()
    report = env.registry.warm()
    elapsed = time.monotonic() - started
    assert report.hashed == ("c-base",) and report.failed == {} and not report.busy
    assert 0 <= report.seconds <= elapsed


def test_warm_up_on_a_missing_template_dir_is_empty(tmp_path: Path) -> None:
    """A host with no template dir warms nothing and reports no failure."""
    report = RootfsRegistry(RootfsConfig(tmp_path / "none", tmp_path / "clones")).warm()
    assert (report.hashed, report.already_warm, report.failed, report.busy) == ((), (), {}, False)


def test_progress_reports_the_stack_being_hashed(env: Env) -> None:
    """stacks() and clone_for_vm() report (stack, done, total) while a cold template hashes, nothing when warm."""
    env.template("base", b"x" * 1000)
    seen: list[tuple[str, int, int]] = []
    env.registry.clone_for_vm("vm-1", "base", progress=lambda *a: seen.append(a))
    assert seen == [("base", 1000, 1000)]
    seen.clear()
    env.registry.stacks(progress=lambda *a: seen.append(a))
    env.registry.stack("base", progress=lambda *a: seen.append(a))
    assert seen == []


@contextlib.contextmanager
def immutable(path: Path) -> Iterator[None]:
    """chattr +i: even root can then create, rename or remove nothing in it: a real refusal from the filesystem."""
    if subprocess.run(["chattr", "+i", str(path)], capture_output=True, check=False).returncode != 0:
        pytest.skip("chattr +i is not supported here")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", str(path)], check=True)


def test_clone_dir_that_cannot_be_created_is_reported_and_nothing_is_made(env: Env) -> None:
    """A clones dir that refuses a new VM directory gives FilesystemError("create clone dir") naming it."""
    env.template("base", b"x")
    env.registry.clone_for_vm("vm-0", "base")
    with immutable(env.clones_dir), pytest.raises(FilesystemError) as info:
        env.registry.clone_for_vm("vm-1", "base")
    assert (info.value.op, info.value.path, info.value.errno) == (
        "create clone dir",
        str(env.clones_dir / "vm-1"),
        errno.EPERM,
    )
    assert not (env.clones_dir / "vm-1").exists()
    assert env.registry.clone_for_vm("vm-1", "base").path.read_bytes() == b"x"


def test_clone_file_that_cannot_be_created_is_reported(env: Env) -> None:
    """A VM directory that refuses the partial clone gives FilesystemError("create clone") naming the partial."""
    env.template("base", b"x")
    vm_dir = env.clones_dir / "vm-1"
    vm_dir.mkdir(parents=True)
    (vm_dir / ".vm-id").write_text("vm-1")
    (vm_dir / ".clone.json").write_text(json.dumps({"vm_id": "vm-1", "stack": "base", "created": 1.0}))
    with immutable(vm_dir), pytest.raises(FilesystemError) as info:
        env.registry.clone_for_vm("vm-1", "base")
    assert (info.value.op, info.value.path) == ("create clone", str(vm_dir / "rootfs.ext4.partial"))
    assert sorted(p.name for p in vm_dir.iterdir()) == [".clone.json", ".vm-id"]


def test_release_that_cannot_move_the_clone_is_reported_and_keeps_it(env: Env) -> None:
    """A clones dir that refuses the move to the trash gives FilesystemError("remove clone dir"); the clone stays."""
    env.template("base", b"x")
    rootfs = env.registry.clone_for_vm("vm-1", "base")
    with immutable(env.clones_dir), pytest.raises(FilesystemError) as info:
        env.registry.release("vm-1")
    assert (info.value.op, info.value.path, info.value.errno) == (
        "remove clone dir",
        str(env.clones_dir / "vm-1"),
        errno.EPERM,
    )
    assert rootfs.path.read_bytes() == b"x"
    assert env.registry.release("vm-1") is True


@pytest.mark.parametrize("step", ["flush", "rename"])
def test_a_failing_final_step_is_reported_and_leaves_no_clone(
    env: Env, monkeypatch: pytest.MonkeyPatch, step: str
) -> None:
    """fsync or the final rename failing (EIO) is a transient FilesystemError naming the step and the partial
    clone; neither a clone nor a stamp is left, and the next attempt succeeds."""
    env.template("base", b"x" * 4096)
    real_fsync, real_rename = os.fsync, os.rename

    def fsync(fd: int) -> None:
        if stat.S_ISREG(os.fstat(fd).st_mode) and os.fstat(fd).st_size == 4096:
            raise OSError(errno.EIO, "Input/output error")
        real_fsync(fd)

    def rename(src: Any, dst: Any, **kw: Any) -> None:
        if src == "rootfs.ext4.partial":
            raise OSError(errno.EIO, "Input/output error")
        real_rename(src, dst, **kw)

    monkeypatch.setattr(os, "fsync" if step == "flush" else "rename", fsync if step == "flush" else rename)
    with pytest.raises(FilesystemError) as info:
        env.registry.clone_for_vm("vm-1", "base")
    vm_dir = env.clones_dir / "vm-1"
    # The flush names the partial it flushes; the rename names the clone it would create.
    named = "rootfs.ext4.partial" if step == "flush" else "rootfs.ext4"
    assert (info.value.op, info.value.path, info.value.errno) == (f"{step} clone", str(vm_dir / named), errno.EIO)
    assert info.value.transient
    assert not vm_dir.exists()
    monkeypatch.undo()
    assert env.registry.clone_for_vm("vm-1", "base").path.read_bytes() == b"x" * 4096


@pytest.mark.parametrize("cleanup_failure", ["foreign file", "immutable owner record"])
def test_the_original_error_wins_when_cleanup_also_fails(
    env: Env, monkeypatch: pytest.MonkeyPatch, cleanup_failure: str
) -> None:
    """A failed copy is reported as itself even when its cleanup cannot finish; no clone is left either way."""
    env.template("base", b"x" * 4096)
    vm_dir = env.clones_dir / "vm-1"
    vm_dir.mkdir(parents=True)
    (vm_dir / ".vm-id").write_text("vm-1")

    def disk_full(src: int, dst: int, **kw: Any) -> cloning.CloneMethod:
        raise FilesystemError.from_os(OSError(errno.ENOSPC, "No space left on device"), op="copy", path="d")

    monkeypatch.setattr(cloning, "clone_fd", disk_full)
    if cleanup_failure == "foreign file":
        (vm_dir / "console.log").write_text("left by someone else")  # the directory cannot be removed
        with pytest.raises(FilesystemError) as info:
            env.registry.clone_for_vm("vm-1", "base")
    else:
        with immutable(vm_dir / ".vm-id"), pytest.raises(FilesystemError) as info:
            env.registry.clone_for_vm("vm-1", "base")
    assert info.value.errno == errno.ENOSPC
    assert not (vm_dir / "rootfs.ext4").exists() and not (vm_dir / "rootfs.ext4.partial").exists()


def test_release_also_empties_what_crashed_releases_left_in_the_trash(env: Env) -> None:
    """Clones a crashed release left in .trash are deleted by the next release."""
    env.template("base", b"x")
    env.registry.clone_for_vm("vm-1", "base")
    leftover = env.clones_dir / ".trash" / "vm-0.0123abcd"
    (leftover / "sub").mkdir(parents=True)
    (leftover / "sub" / "rootfs.ext4").write_bytes(b"old")
    assert env.registry.release("vm-1") is True
    assert list((env.clones_dir / ".trash").iterdir()) == []


def test_release_refused_for_another_vm_id_names_both(env: Env) -> None:
    """Releasing vm:1 where vm/1 owns vm_1 is a VmIdConflict with the caller's id, the directory and the owner."""
    env.template("base", b"x")
    env.registry.clone_for_vm("vm/1", "base")
    with pytest.raises(VmIdConflict) as info:
        env.registry.release("vm:1")
    assert (info.value.vm_id, info.value.safe_id, info.value.owner) == ("vm:1", "vm_1", "vm/1")
    assert str(info.value) == "vm id 'vm:1' maps to clone directory 'vm_1', which belongs to vm id 'vm/1'"


def test_cold_stacks_report_hash_progress(env: Env) -> None:
    """Listing stacks whose hashes are cold reports each one's hashing, once; listing again reports nothing."""
    env.template("a", b"a" * 10)
    env.template("b", b"b" * 20)
    seen: list[tuple[str, int, int]] = []
    env.registry.stacks(progress=lambda *a: seen.append(a))
    assert seen == [("a", 10, 10), ("b", 20, 20)]
    seen.clear()
    env.registry.stacks(progress=lambda *a: seen.append(a))
    assert seen == []


def test_replacing_a_bad_clone_is_logged(env: Env, caplog: pytest.LogCaptureFixture) -> None:
    """Removing an interrupted or shared clone leaves a warning naming the VM directory; a clone logs its method."""
    env.template("base", b"complete")
    vm_dir = env.clones_dir / "vm-1"
    vm_dir.mkdir(parents=True)
    (vm_dir / "rootfs.ext4").write_bytes(b"comp")
    caplog.set_level(logging.INFO, logger="worker.core.registry")
    env.registry.clone_for_vm("vm-1", "base")
    messages = [r.getMessage() for r in caplog.records]
    assert f"removing incomplete or shared clone in {vm_dir}" in messages
    template = env.template_dir / "base" / "rootfs.ext4"
    assert f"cloned {template} to {vm_dir / 'rootfs.ext4'} by sparse-copy" in messages


@pytest.mark.parametrize("first_failing", [1, 2])
def test_a_clone_that_cannot_be_examined_is_reported(
    env: Env, monkeypatch: pytest.MonkeyPatch, first_failing: int
) -> None:
    """Examining an existing clone failing (EIO), from the leftover sweep on or only after it, is FilesystemError
    ("stat clone") naming it, and the clone is left alone."""
    env.template("base", b"x")
    rootfs = env.registry.clone_for_vm("vm-1", "base")
    real_stat = os.stat
    calls = 0

    def stat_(path: Any, *args: Any, **kw: Any) -> os.stat_result:
        nonlocal calls
        if path == "rootfs.ext4" and kw.get("dir_fd") is not None:
            calls += 1
            if calls >= first_failing:
                raise OSError(errno.EIO, "Input/output error")
        return real_stat(path, *args, **kw)

    monkeypatch.setattr(os, "stat", stat_)
    with pytest.raises(FilesystemError) as info:
        env.registry.clone_for_vm("vm-1", "base")
    assert (info.value.op, info.value.path, info.value.errno) == ("stat clone", str(rootfs.path), errno.EIO)
    monkeypatch.undo()
    assert rootfs.path.read_bytes() == b"x"


def test_leftovers_beside_an_interrupted_clone_all_go(env: Env) -> None:
    """An interrupted clone (no stamp) with stray partials, one of them a directory: all removed, one clean clone."""
    env.template("base", b"complete")
    vm_dir = env.clones_dir / "vm-1"
    vm_dir.mkdir(parents=True)
    (vm_dir / "rootfs.ext4").write_bytes(b"comp")
    (vm_dir / ".vm-id.partial").write_text("vm-1")
    (vm_dir / "rootfs.ext4.sha256.partial").mkdir()
    (vm_dir / "rootfs.ext4.sha256.partial" / "junk").write_text("x")
    rootfs = env.registry.clone_for_vm("vm-1", "base")
    assert rootfs.path.read_bytes() == b"complete"
    assert sorted(p.name for p in vm_dir.iterdir()) == [".clone.json", ".vm-id", "rootfs.ext4", "rootfs.ext4.sha256"]


def test_a_stamp_that_cannot_be_read_is_reported(env: Env) -> None:
    """A directory where a clone's stamp belongs is FilesystemError("read") naming it; the clone is left alone."""
    env.template("base", b"x")
    rootfs = env.registry.clone_for_vm("vm-1", "base")
    stamp = env.clones_dir / "vm-1" / "rootfs.ext4.sha256"
    stamp.unlink()
    stamp.mkdir()
    with pytest.raises(FilesystemError) as info:
        env.registry.clone_for_vm("vm-1", "base")
    assert (info.value.op, info.value.path, info.value.errno) == ("read", str(stamp), errno.EISDIR)
    assert rootfs.path.read_bytes() == b"x"


def test_one_stack_reports_its_hash_progress(env: Env) -> None:
    """stack() reports the hashing of a cold template, and nothing once it is warm."""
    env.template("base", b"y" * 30)
    seen: list[tuple[str, int, int]] = []
    env.registry.stack("base", progress=lambda *a: seen.append(a))
    assert seen == [("base", 30, 30)]
    env.registry.stack("base", progress=lambda *a: seen.append(a))
    assert seen == [("base", 30, 30)]


def test_a_read_error_inside_the_copy_names_the_template(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    """A template that fails to read (EIO) while it is copied is FilesystemError("copy") naming the template,
    not the clone, and no clone is left. (Changing the template under a clone is issue 10's read lease.)"""
    path = env.template("base", os.urandom(2 * MIB))

    def unreadable(*args: int) -> int:
        raise OSError(errno.EIO, "Input/output error")

    assert env.registry.stack("base") is not None
    monkeypatch.setattr(os, "copy_file_range", unreadable)
    with pytest.raises(FilesystemError) as info:
        env.registry.clone_for_vm("vm-1", "base")
    assert (info.value.op, info.value.path, info.value.errno) == ("copy", str(path), errno.EIO)
    assert not (env.clones_dir / "vm-1").exists()


def test_a_full_clones_filesystem_names_the_partial_clone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A clones filesystem that fills up during the copy (another writer takes the room the space check saw)
    fails with a transient ENOSPC naming the partial clone, and leaves nothing behind."""
    template_dir = tmp_path / "templates"
    write_template(template_dir, "base", os.urandom(4 * MIB))
    with tmpfs_mount(tmp_path, size_mib=8) as clones_dir:
        registry = RootfsRegistry(RootfsConfig(template_dir, clones_dir))
        real_pwrite = os.pwrite
        filler = clones_dir / "filler"

        def someone_fills_the_disk(fd: int, data: Any, offset: int) -> int:
            if not filler.exists():
                with filler.open("wb") as f, contextlib.suppress(OSError):
                    f.write(bytes(8 * MIB))
            return real_pwrite(fd, data, offset)

        monkeypatch.setattr(os, "pwrite", someone_fills_the_disk)
        with pytest.raises(FilesystemError) as info:
            registry.clone_for_vm("vm-1", "base")
        monkeypatch.undo()
        assert (info.value.path, info.value.errno) == (str(clones_dir / "vm-1" / "rootfs.ext4.partial"), errno.ENOSPC)
        assert info.value.transient
        assert not (clones_dir / "vm-1").exists()
        filler.unlink()


def test_a_failing_clone_rename_is_reported_and_cleanup_failures_do_not_hide_it(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Naming the clone failing (EIO) is FilesystemError("rename clone") naming it, even when removing the
    leftovers fails too; no clone is left, and the call after succeeds."""
    env.template("base", b"x" * 4096)
    real_rename, real_unlink = os.rename, os.unlink

    def rename(src: Any, dst: Any, **kw: Any) -> None:
        if src == "rootfs.ext4.partial":
            raise OSError(errno.EIO, "Input/output error")
        real_rename(src, dst, **kw)

    def unlink(path: Any, **kw: Any) -> None:
        if kw.get("dir_fd") is not None and str(path).startswith("rootfs.ext4"):
            raise OSError(errno.EIO, "Input/output error")
        real_unlink(path, **kw)

    monkeypatch.setattr(os, "rename", rename)
    monkeypatch.setattr(os, "unlink", unlink)
    with pytest.raises(FilesystemError) as info:
        env.registry.clone_for_vm("vm-1", "base")
    vm_dir = env.clones_dir / "vm-1"
    assert (info.value.op, info.value.path, info.value.errno) == (
        "rename clone",
        str(vm_dir / "rootfs.ext4"),
        errno.EIO,
    )
    assert not (vm_dir / "rootfs.ext4").exists()
    monkeypatch.undo()
    assert env.registry.clone_for_vm("vm-1", "base").path.read_bytes() == b"x" * 4096


def test_an_unreadable_owner_record_is_reported(env: Env) -> None:
    """A directory where the owner record belongs is FilesystemError("read") naming it, for clone and release."""
    env.template("base", b"x")
    env.registry.clone_for_vm("vm-1", "base")
    owner = env.clones_dir / "vm-1" / ".vm-id"
    owner.unlink()
    owner.mkdir()
    for call in (lambda: env.registry.clone_for_vm("vm-1", "base"), lambda: env.registry.release("vm-1")):
        with pytest.raises(FilesystemError) as info:
            call()
        assert (info.value.op, info.value.path, info.value.errno) == ("read", str(owner), errno.EISDIR)
    assert (env.clones_dir / "vm-1" / "rootfs.ext4").read_bytes() == b"x"


def test_vm_id_with_a_lone_surrogate_is_recorded_and_released(env: Env) -> None:
    """A vm id JSON can carry but UTF-8 cannot encode ("vm-\\udc80") still owns, re-finds and releases its clone."""
    env.template("base", b"x")
    rootfs = env.registry.clone_for_vm("vm-\udc80", "base")
    assert rootfs.vm_id == "vm-_"
    assert (env.clones_dir / "vm-_" / ".vm-id").read_bytes() == "vm-\udc80".encode("utf-8", "surrogatepass")
    assert env.registry.clone_for_vm("vm-\udc80", "base") == rootfs
    with pytest.raises(VmIdConflict):
        env.registry.clone_for_vm("vm-\udc81", "base")
    assert env.registry.release("vm-\udc80") is True


def test_an_owner_record_that_cannot_be_written_is_reported(env: Env) -> None:
    """A VM directory that refuses the owner record is FilesystemError("write") naming it; nothing is cloned."""
    env.template("base", b"x")
    vm_dir = env.clones_dir / "vm-1"
    vm_dir.mkdir(parents=True)
    with immutable(vm_dir), pytest.raises(FilesystemError) as info:
        env.registry.clone_for_vm("vm-1", "base")
    assert (info.value.op, info.value.path, info.value.errno) == ("write", str(vm_dir / ".vm-id"), errno.EPERM)
    assert list(vm_dir.iterdir()) == []


def test_an_empty_stamp_is_a_mismatch_showing_no_stamp(env: Env) -> None:
    """A clone whose stamp came back empty is refused as a mismatch with an empty stamp, never reused blindly."""
    env.template("base", b"x")
    rootfs = env.registry.clone_for_vm("vm-1", "base")
    (env.clones_dir / "vm-1" / "rootfs.ext4.sha256").write_bytes(b"")
    with pytest.raises(StampMismatch) as info:
        env.registry.clone_for_vm("vm-1", "base")
    assert (info.value.stamp, info.value.template_sha256) == ("", rootfs.source_sha256)


def test_a_template_read_error_while_hashing_names_the_template(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    """A template that fails to read (EIO) while its hash is computed is FilesystemError("read") naming it."""
    path = env.template("base", os.urandom(3 * MIB))
    evict(path)  # read, not hashed through a mapping, so the read can fail

    def broken(*args: Any) -> int:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "preadv", broken)
    with pytest.raises(FilesystemError) as info:
        env.registry.stack("base")
    assert (info.value.op, info.value.path, info.value.errno) == ("read", str(path), errno.EIO)


def test_a_clone_on_a_reflink_filesystem_says_reflink(tmp_path: Path) -> None:
    """Templates and clones on one XFS (reflink=1): the clone is made by reflink, and says so."""
    with xfs_reflink_mount(tmp_path) as mountpoint:
        write_template(mountpoint / "templates", "base", os.urandom(MIB))
        registry = RootfsRegistry(RootfsConfig(mountpoint / "templates", mountpoint / "clones"))
        rootfs = registry.clone_for_vm("vm-1", "base")
        assert rootfs.method == "reflink"
        assert sha256_of(rootfs.path) == rootfs.source_sha256


# ------------------------------------------------------------------ failures and options the re-measure found


def _fd_path(fd: int) -> str:
    return os.readlink(f"/proc/self/fd/{fd}")


def _eio(*_: Any, **__: Any) -> Any:
    raise OSError(errno.EIO, "Input/output error")


def _refuse_dir_open(monkeypatch: pytest.MonkeyPatch, target: Path) -> None:
    """Make opening the directory `target` fail (EMFILE), and nothing else."""
    real = os.open

    def fake(path: Any, flags: int, *args: Any, **kw: Any) -> int:
        if kw.get("dir_fd") is None and os.fspath(path) == str(target) and flags & os.O_DIRECTORY:
            raise OSError(errno.EMFILE, "Too many open files")
        return real(path, flags, *args, **kw)

    monkeypatch.setattr(os, "open", fake)


def _fail_fsync_of(monkeypatch: pytest.MonkeyPatch, target: Path) -> None:
    real = os.fsync

    def fsync(fd: int) -> None:
        if _fd_path(fd) == str(target):
            _eio()
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)


@pytest.mark.parametrize("failing", ["flush vm dir", "flush clones dir", "open clones dir", "and the stamp stays"])
def test_a_failing_last_step_of_a_clone_is_reported_and_removes_the_named_clone(
    env: Env, monkeypatch: pytest.MonkeyPatch, failing: str
) -> None:
    """The directory flushes after the renames failing (EIO, or the clones dir cannot be opened) is a FilesystemError
    naming the step and the directory; the clone already in place goes (its stamp too when it can), and the next
    attempt succeeds."""
    env.template("base", b"x" * 4096)
    vm_dir = env.clones_dir / "vm-1"
    if failing == "open clones dir":
        _refuse_dir_open(monkeypatch, env.clones_dir)
        expected = ("flush clones dir", str(env.clones_dir), errno.EMFILE)
    else:
        target = env.clones_dir if failing == "flush clones dir" else vm_dir
        _fail_fsync_of(monkeypatch, target)
        expected = ("flush clone dir", str(target), errno.EIO)
    if failing == "and the stamp stays":
        real_unlink = os.unlink

        def unlink(path: Any, **kw: Any) -> None:
            if path == "rootfs.ext4.sha256" and kw.get("dir_fd") is not None:
                _eio()
            real_unlink(path, **kw)

        monkeypatch.setattr(os, "unlink", unlink)
    with pytest.raises(FilesystemError) as info:
        env.registry.clone_for_vm("vm-1", "base")
    assert (info.value.op, info.value.path, info.value.errno) == expected
    assert not (vm_dir / "rootfs.ext4").exists()
    assert (vm_dir / "rootfs.ext4.sha256").exists() is (failing == "and the stamp stays")
    assert vm_dir.exists() is (failing == "and the stamp stays")
    monkeypatch.undo()
    assert env.registry.clone_for_vm("vm-1", "base").path.read_bytes() == b"x" * 4096


def test_a_clone_record_that_cannot_be_written_is_reported(env: Env) -> None:
    """A directory in the way of the clone's record (.clone.json) is FilesystemError("write") naming the record;
    the failed call leaves no VM directory (the obstacle goes with it), and the next call succeeds."""
    env.template("base", b"x")
    vm_dir = env.clones_dir / "vm-1"
    (vm_dir / ".clone.json").mkdir(parents=True)
    (vm_dir / ".clone.json" / "inside").write_text("x")
    with pytest.raises(FilesystemError) as info:
        env.registry.clone_for_vm("vm-1", "base")
    assert (info.value.op, info.value.path, info.value.errno) == ("write", str(vm_dir / ".clone.json"), errno.EISDIR)
    assert not vm_dir.exists()
    assert env.registry.clone_for_vm("vm-1", "base").path.read_bytes() == b"x"


def test_a_clone_found_in_place_is_flushed_before_it_is_reported(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    """Asking again for a clone that exists flushes its directory, its disk, its stamp and the clones dir."""
    env.template("base", b"abc" * 1000)
    rootfs = env.registry.clone_for_vm("vm-1", "base")
    flushed = record_fsyncs(monkeypatch)
    assert env.registry.clone_for_vm("vm-1", "base") == VmRootfs(
        "vm-1", "base", rootfs.path, rootfs.source_sha256, "existing"
    )
    vm_dir = env.clones_dir / "vm-1"
    assert flushed == [
        str(vm_dir),
        str(vm_dir / "rootfs.ext4"),
        str(vm_dir / "rootfs.ext4.sha256"),
        str(env.clones_dir),
    ]


@pytest.mark.parametrize("failing", ["open disk", "open clones dir", "flush vm dir"])
def test_a_clone_found_in_place_that_cannot_be_flushed_is_reported_and_kept(
    env: Env, monkeypatch: pytest.MonkeyPatch, failing: str
) -> None:
    """A clone in place whose files cannot be opened or flushed is FilesystemError naming the step and the file;
    the clone is kept as it was, and the next call reports it."""
    env.template("base", b"x" * 4096)
    rootfs = env.registry.clone_for_vm("vm-1", "base")
    vm_dir = env.clones_dir / "vm-1"
    if failing == "open disk":
        real = os.open

        def fake(path: Any, flags: int, *args: Any, **kw: Any) -> int:
            if path == "rootfs.ext4" and kw.get("dir_fd") is not None:
                _eio()
            return real(path, flags, *args, **kw)

        monkeypatch.setattr(os, "open", fake)
        expected = ("flush clone", str(vm_dir / "rootfs.ext4"), errno.EIO)
    elif failing == "open clones dir":
        _refuse_dir_open(monkeypatch, env.clones_dir)
        expected = ("flush clones dir", str(env.clones_dir), errno.EMFILE)
    else:
        _fail_fsync_of(monkeypatch, vm_dir)
        expected = ("flush clone", str(vm_dir), errno.EIO)
    with pytest.raises(FilesystemError) as info:
        env.registry.clone_for_vm("vm-1", "base")
    assert (info.value.op, info.value.path, info.value.errno) == expected
    monkeypatch.undo()
    assert rootfs.path.read_bytes() == b"x" * 4096
    assert env.registry.clone_for_vm("vm-1", "base").method == "existing"


def test_a_clone_in_place_is_returned_even_with_no_room_for_another(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    """With a reserve no copy can meet, a clone already in place is still returned; a new one is refused with
    InsufficientSpace; and a clone that cannot be examined is reported as such, not as a lack of space."""
    env.template("base", b"x" * 4096)
    rootfs = env.registry.clone_for_vm("vm-1", "base")
    full = RootfsRegistry(RootfsConfig(env.template_dir, env.clones_dir, min_free=Reserve(percent=100.0)))
    assert full.clone_for_vm("vm-1", "base").path == rootfs.path
    with pytest.raises(InsufficientSpace):
        full.clone_for_vm("vm-2", "base")
    assert not (env.clones_dir / "vm-2").exists()
    (env.clones_dir / "vm-3").mkdir()  # a VM directory without a disk needs the room all the same
    with pytest.raises(InsufficientSpace):
        full.clone_for_vm("vm-3", "base")
    real = os.stat
    seen = 0

    def stat_once(path: Any, *args: Any, **kw: Any) -> os.stat_result:
        nonlocal seen
        if path == "rootfs.ext4" and kw.get("dir_fd") is not None:
            seen += 1
            if seen > 1:  # the leftover sweep sees the clone; every later look fails
                _eio()
        return real(path, *args, **kw)

    monkeypatch.setattr(os, "stat", stat_once)
    with pytest.raises(FilesystemError) as info:
        full.clone_for_vm("vm-1", "base")
    assert (info.value.op, info.value.path, info.value.errno) == ("stat clone", str(rootfs.path), errno.EIO)


def test_release_flushes_both_directories_of_its_rename(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    """A release is on disk when it returns: the clones dir and the trash are flushed after the rename."""
    env.template("base", b"abc")
    env.registry.clone_for_vm("vm-1", "base")
    flushed = record_fsyncs(monkeypatch)
    assert env.registry.release("vm-1") is True
    assert flushed == [str(env.clones_dir), str(env.clones_dir / ".trash")]


@pytest.mark.parametrize("failing", ["open clones dir", "open trash", "flush trash"])
def test_a_release_whose_rename_cannot_be_flushed_is_reported(
    env: Env, monkeypatch: pytest.MonkeyPatch, failing: str
) -> None:
    """After the rename into the trash, a directory that cannot be opened or flushed is FilesystemError("flush clones
    dir") naming it: the release is not known to be on disk (the clone is gone from the clones dir all the same)."""
    env.template("base", b"abc")
    env.registry.clone_for_vm("vm-1", "base")
    trash = env.clones_dir / ".trash"
    if failing == "open clones dir":
        _refuse_dir_open(monkeypatch, env.clones_dir)
        expected = (str(env.clones_dir), errno.EMFILE)
    elif failing == "open trash":
        _refuse_dir_open(monkeypatch, trash)
        expected = (str(trash), errno.EMFILE)
    else:
        _fail_fsync_of(monkeypatch, trash)
        expected = (str(trash), errno.EIO)
    with pytest.raises(FilesystemError) as info:
        env.registry.release("vm-1")
    assert (info.value.op, info.value.path, info.value.errno) == ("flush clones dir", *expected)
    assert not (env.clones_dir / "vm-1").exists()
    assert env.registry.release("vm-1") is False


def test_a_release_left_in_the_trash_carries_the_vms_name(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    """When the trash cannot be emptied, what the release left there is named after the VM it came from."""
    env.template("base", b"abc")
    env.registry.clone_for_vm("vm 1", "base")
    monkeypatch.setattr(os, "scandir", _eio)
    assert env.registry.release("vm 1") is True
    monkeypatch.undo()
    [left] = (env.clones_dir / ".trash").iterdir()
    assert left.name.startswith("vm_1.") and (left / "rootfs.ext4").read_bytes() == b"abc"
    env.registry.empty_trash()
    assert list((env.clones_dir / ".trash").iterdir()) == []


def test_a_trash_that_cannot_be_listed_is_logged_by_name(env: Env, caplog: pytest.LogCaptureFixture) -> None:
    """empty_trash never raises: a .trash it cannot list (a file there) is a warning naming it and the error."""
    trash = env.clones_dir / ".trash"
    env.clones_dir.mkdir()
    trash.write_text("not a directory")
    with caplog.at_level(logging.WARNING, logger="worker.core.registry"):
        env.registry.empty_trash()
    assert [r.getMessage() for r in caplog.records] == [
        f"could not list {trash} to empty it: [Errno 20] Not a directory: '{trash}'"
    ]
    trash.unlink()
    (trash / "vm-1.0123").mkdir(parents=True)
    env.registry.empty_trash()
    assert list(trash.iterdir()) == []


def test_release_waits_for_the_vms_lock_unless_told_not_to(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    """While another operation holds the VM's lock, release(wait=False) raises VmBusy with the id as sent; a plain
    release waits for the lock and then releases."""
    env.template("base", b"abc")
    env.registry.clone_for_vm("vm 1", "base")
    lock = env.clones_dir / ".locks" / f"{safe_vm_id('vm 1')}.lock"
    asked: list[int] = []
    real_flock = fcntl.flock

    def flock(fd: int, operation: int) -> None:
        asked.append(operation)
        real_flock(fd, operation)

    outcome: list[object] = []

    def release() -> None:
        try:
            outcome.append(env.registry.release("vm 1"))
        except RootfsError as exc:
            outcome.append(exc)

    with locks.exclusive(lock):
        with pytest.raises(VmBusy) as info:
            env.registry.release("vm 1", wait=False)
        assert info.value.vm_id == "vm 1"
        monkeypatch.setattr(fcntl, "flock", flock)
        waiter = threading.Thread(target=release)
        waiter.start()
        wait_until(lambda: asked, what="the release to ask for the lock", timeout=10)
    waiter.join(timeout=30)
    assert outcome == [True]
    assert not (env.clones_dir / "vm_1").exists()


def test_release_recheck_sees_the_vms_directory_and_can_spare_it(env: Env) -> None:
    """recheck(dir_fd, vm_dir) runs under the lock with the VM's directory; raising there keeps the clone."""
    env.template("base", b"abc")
    env.registry.clone_for_vm("vm-1", "base")
    vm_dir = env.clones_dir / "vm-1"
    seen: list[tuple[str, Path]] = []

    def spare(dir_fd: int, path: Path) -> None:
        seen.append((_fd_path(dir_fd), path))
        raise VmBusy("vm-1")

    with pytest.raises(VmBusy):
        env.registry.release("vm-1", recheck=spare)
    assert seen == [(str(vm_dir), vm_dir)]
    assert (vm_dir / "rootfs.ext4").read_bytes() == b"abc"
    assert env.registry.release("vm-1", recheck=lambda fd, path: None) is True
    assert not vm_dir.exists()


def test_a_disk_that_cannot_be_checked_for_use_is_reported_and_kept(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    """A release that cannot open the disk to see whether a VM holds it is FilesystemError naming the disk."""
    env.template("base", b"abc")
    rootfs = env.registry.clone_for_vm("vm-1", "base")
    real = os.open

    def fake(path: Any, flags: int, *args: Any, **kw: Any) -> int:
        if path == "rootfs.ext4" and kw.get("dir_fd") is not None:
            _eio()
        return real(path, flags, *args, **kw)

    monkeypatch.setattr(os, "open", fake)
    with pytest.raises(FilesystemError) as info:
        env.registry.release("vm-1")
    assert (info.value.op, info.value.path, info.value.errno) == ("check clone in use", str(rootfs.path), errno.EIO)
    monkeypatch.undo()
    assert rootfs.path.read_bytes() == b"abc"
    assert env.registry.release("vm-1") is True


def test_hash_file_refuses_a_file_open_for_writing(tmp_path: Path) -> None:
    """hash_file reads the way templates are read: a file some process holds open for writing is TemplateBusy,
    and once it is closed its hash comes back."""
    path = tmp_path / "rootfs.ext4"
    path.write_bytes(b"abc")
    with hold_open(path, "rw"), pytest.raises(TemplateBusy):
        RootfsRegistry.hash_file(path)
    assert RootfsRegistry.hash_file(path) == ABC


def test_cached_stacks_leaves_out_a_stack_that_cannot_be_opened(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    """The cache-only listing answers for the stacks it can open (warm: the hash, cold: None) and skips the rest."""
    env.template("warm", b"abc")
    env.template("cold", b"x")
    env.template("broken", b"y")
    env.registry.stack("warm")
    real = os.open

    def fake(path: Any, flags: int, *args: Any, **kw: Any) -> int:
        if os.fspath(path).endswith("/broken/rootfs.ext4"):
            _eio()
        return real(path, flags, *args, **kw)

    monkeypatch.setattr(os, "open", fake)
    assert env.registry.cached_stacks() == {"warm": ABC, "cold": None}


def test_clones_lists_holders_unless_asked_not_to(env: Env) -> None:
    """clones() names the processes holding a disk; clones(pids=False) still says in use but skips the /proc scan."""
    env.template("base", b"abc")
    rootfs = env.registry.clone_for_vm("vm-1", "base")
    with hold_open(rootfs.path, "rw") as holder:
        [full] = env.registry.clones()
        [quick] = env.registry.clones(pids=False)
    assert (full.in_use, full.pids) == (True, (holder.pid,))
    assert (quick.in_use, quick.pids) == (True, ())


def test_reconcile_judges_age_at_the_given_time(env: Env) -> None:
    """A fresh clone is too young now, and old enough for a reconcile told it is an hour later."""
    env.template("base", b"abc")
    env.registry.clone_for_vm("vm-1", "base")
    assert env.registry.reconcile([], older_than=600).too_young == ["vm-1"]
    later = env.registry.reconcile([], older_than=600, now=time.time() + 3600)
    assert (later.too_young, later.released) == ([], ["vm-1"])
    assert (env.clones_dir / "vm-1").exists()  # both were dry runs


def test_only_a_real_reconcile_finishes_what_crashed_releases_left(env: Env) -> None:
    """A dry run leaves a crashed release's trash alone; a real one with nothing to release empties it."""
    env.template("base", b"abc")
    env.registry.clone_for_vm("vm-1", "base")
    trash = env.clones_dir / ".trash"
    trash.mkdir()
    (env.clones_dir / "vm-1").rename(trash / "vm-1.0123abcd")
    env.registry.clone_for_vm("vm-2", "base")
    env.registry.reconcile(["vm-2"])
    assert [p.name for p in trash.iterdir()] == ["vm-1.0123abcd"]
    env.registry.reconcile(["vm-2"], dry_run=False)
    assert list(trash.iterdir()) == []
    assert (env.clones_dir / "vm-2" / "rootfs.ext4").read_bytes() == b"abc"


def test_hash_time_counts_only_the_hashing(env: Env) -> None:
    """hash_work.seconds of one cold hash is more than nothing and no more than the call took."""
    env.template("base", b"x" * 5000)
    started = time.monotonic()
    env.registry.stack("base")
    took = time.monotonic() - started
    assert 0 < env.registry.hash_work.seconds <= took


def test_a_writer_arriving_before_the_hash_stops_it_before_any_progress(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A writer that opens the template between its lease and its hash makes the hash refuse at once
    (TemplateBusy, no progress reported, not even 100%), and the writer proceeds once we let go."""
    template = env.template("base", b"v1" * 1000)
    env.forget(template)
    real = hashing.hash_fd
    wrote = threading.Event()

    def write_in_place() -> None:
        with template.open("r+b") as f:  # blocks until the hash lets go of its lease
            f.write(b"v2")
        wrote.set()

    def hash_after_a_writer_opened(fd: int, **kw: Any) -> str:
        threading.Thread(target=write_in_place, daemon=True).start()
        wait_until(lambda: fcntl.fcntl(fd, fcntl.F_GETLEASE) != fcntl.F_RDLCK, what="the lease to break", timeout=10)
        return real(fd, **kw)

    monkeypatch.setattr(hashing, "hash_fd", hash_after_a_writer_opened)
    reports: list[tuple[str, int, int]] = []
    with pytest.raises(TemplateBusy):
        env.registry.stack("base", progress=lambda *report: reports.append(report))
    assert reports == []
    assert wrote.wait(10), "the writer stayed blocked after the hash gave up"


def test_templates_hash_and_clone_where_no_lease_is_granted(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    """On a filesystem that grants no read lease (NFS), a template still hashes and clones."""
    env.template("base", b"abc")
    monkeypatch.setattr(lease, "take", lambda fd, path: False)
    info = env.registry.stack("base")
    assert info is not None and info.sha256 == ABC
    assert env.registry.clone_for_vm("vm-1", "base").path.read_bytes() == b"abc"


def test_the_first_clone_makes_the_clones_dir_and_its_parents(tmp_path: Path) -> None:
    """A clones dir that does not exist yet, nor its parent, is made by the first clone; VM directories are
    0755 under the umask (the Rust runtime and operators read them)."""
    write_template(tmp_path / "templates", "base", b"x" * 4096)
    registry = RootfsRegistry(RootfsConfig(tmp_path / "templates", tmp_path / "var" / "clones"))
    rootfs = registry.clone_for_vm("vm-1", "base")
    assert rootfs.path.read_bytes() == b"x" * 4096
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(rootfs.path.parent.stat().st_mode) == 0o755 & ~umask


def test_a_vm_dir_removed_right_after_it_was_made_is_a_filesystem_error(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A VM directory that is gone by the time it is opened (only a concurrent sweep could) is FilesystemError
    ("open clone dir") naming it, never an assertion."""
    env.template("base", b"x" * 4096)
    vm_dir = env.clones_dir / "vm-1"
    real_open = os.open
    opened = []

    def vanishing(path: Any, flags: int, *args: Any, **kw: Any) -> int:
        if str(path) == str(vm_dir) and kw.get("dir_fd") is None:
            opened.append(path)
            if len(opened) == 2:  # the open after our mkdir (the first one found nothing)
                os.rmdir(vm_dir)
        return real_open(path, flags, *args, **kw)

    monkeypatch.setattr(os, "open", vanishing)
    with pytest.raises(FilesystemError) as info:
        env.registry.clone_for_vm("vm-1", "base")
    assert (info.value.op, info.value.path, info.value.errno) == ("open clone dir", str(vm_dir), errno.ENOENT)


@pytest.mark.parametrize("name", [".vm-id", ".clone.json", "rootfs.ext4.sha256"])
def test_a_file_of_a_new_clone_that_cannot_be_written_is_named_and_leaves_nothing(
    env: Env, monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    """Writing the owner record, the clone record or the stamp into the VM directory the call just made
    failing with ENOSPC is a transient FilesystemError("write") naming that file; nothing is left, and the
    next call succeeds."""
    env.template("base", b"x" * 4096)
    vm_dir = env.clones_dir / "vm-1"
    real_write = os.write

    def full(fd: int, data: Any) -> int:
        if _fd_path(fd) == str(vm_dir / name):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", full)
    with pytest.raises(FilesystemError) as info:
        env.registry.clone_for_vm("vm-1", "base")
    assert (info.value.op, info.value.path, info.value.errno) == ("write", str(vm_dir / name), errno.ENOSPC)
    assert info.value.transient
    assert not vm_dir.exists()
    monkeypatch.undo()
    assert env.registry.clone_for_vm("vm-1", "base").path.read_bytes() == b"x" * 4096
