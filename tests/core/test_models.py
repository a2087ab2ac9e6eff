"""The JSON shapes results have on the wire: one per result type, defined by the model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import Env
from worker import RootfsConfig, RootfsRegistry, StackInfo, VmRootfs, WarmReport
from worker.core.models import HashWork


def test_a_stack_has_name_size_and_hash_on_the_wire() -> None:
    """A scan entry is {name, size_bytes, sha256}: JSON-ready, without the host-local template path."""
    info = StackInfo("base", Path("/t/base/rootfs.ext4"), 3, "ab" * 32)
    assert json.loads(json.dumps(info.to_dict())) == {"name": "base", "size_bytes": 3, "sha256": "ab" * 32}


def test_a_clone_has_its_vm_stack_path_and_source_hash_on_the_wire() -> None:
    """A clone is {vm_id, stack, path, source_sha256, method}; the path is a string."""
    rootfs = VmRootfs("vm-1", "base", Path("/c/vm-1/rootfs.ext4"), "cd" * 32, "reflink")
    assert rootfs.to_dict() == {
        "vm_id": "vm-1",
        "stack": "base",
        "path": "/c/vm-1/rootfs.ext4",
        "source_sha256": "cd" * 32,
        "method": "reflink",
    }


def test_a_warm_report_lists_what_it_did_as_json() -> None:
    """A warm-up report is JSON-ready, with lists (not tuples) and its seconds rounded."""
    report = WarmReport(("a",), ("b",), 10, 1.23456789, {"c": "FilesystemError: EIO"}, False)
    assert json.loads(json.dumps(report.to_dict())) == {
        "hashed": ["a"],
        "already_warm": ["b"],
        "bytes_hashed": 10,
        "seconds": 1.234568,
        "failed": {"c": "FilesystemError: EIO"},
        "busy": False,
    }


def test_registry_results_have_those_shapes(env: Env) -> None:
    """What the registry returns serialises to those shapes: a first clone says "copy" (ext4), a second "existing"."""
    env.template("base", b"abc")
    info = env.registry.stack("base")
    assert info is not None
    digest = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    assert info.to_dict() == {"name": "base", "size_bytes": 3, "sha256": digest}
    assert info.template_path == env.template_dir / "base" / "rootfs.ext4"
    first = env.registry.clone_for_vm("vm/1", "base")
    expected = {"vm_id": "vm_1", "stack": "base", "path": str(env.clones_dir / "vm_1" / "rootfs.ext4")}
    assert first.to_dict() == {**expected, "source_sha256": digest, "method": "copy"}
    again = env.registry.clone_for_vm("vm/1", "base")
    assert again.to_dict() == {**expected, "source_sha256": digest, "method": "existing"}
    assert again == first  # the method is how this call got it, not part of the clone


def test_a_busy_warm_report_did_nothing() -> None:
    """The report of a warm-up that found another one running is empty and busy."""
    assert WarmReport(busy=True).to_dict() == {
        "hashed": [],
        "already_warm": [],
        "bytes_hashed": 0,
        "seconds": 0.0,
        "failed": {},
        "busy": True,
    }
    assert WarmReport().failed is not WarmReport().failed  # each report its own dict


def test_results_are_values() -> None:
    """Two results with the same data are equal and cannot be changed after the fact."""
    a = VmRootfs("vm-1", "base", Path("/c/vm-1/rootfs.ext4"), "0" * 64)
    assert a == VmRootfs("vm-1", "base", Path("/c/vm-1/rootfs.ext4"), "0" * 64, "reflink")
    assert a.method == "existing"
    with pytest.raises(AttributeError):
        a.vm_id = "vm-2"  # type: ignore[misc]
    assert StackInfo("a", Path("/t"), 1, "0" * 64) != StackInfo("a", Path("/t"), 2, "0" * 64)


def test_hash_work_adds_and_subtracts_field_by_field() -> None:
    """Hash work of two jobs adds up, and the work of one job is the difference of two running totals."""
    a, b = HashWork(1, 2, 30, 0.5), HashWork(4, 8, 160, 2.0)
    assert a + b == HashWork(5, 10, 190, 2.5)
    assert b - a == HashWork(3, 6, 130, 1.5)
    assert HashWork() == HashWork(0, 0, 0, 0.0)


def test_registry_from_env_reads_the_process_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """With no mapping given, the two directories come from the process environment, else the defaults."""
    monkeypatch.setenv("MICROVM_ROOTFS_TEMPLATE_DIR", str(tmp_path / "t"))
    monkeypatch.setenv("MICROVM_ROOTFS_CLONES_DIR", str(tmp_path / "c"))
    assert RootfsRegistry.from_env().config == RootfsConfig(tmp_path / "t", tmp_path / "c")
    assert RootfsConfig.from_env() == RootfsConfig(tmp_path / "t", tmp_path / "c")
    monkeypatch.setenv("MICROVM_ROOTFS_CLONES_DIR", "")
    assert RootfsConfig.from_env().clones_dir == Path("/var/lib/microvm/rootfs")
    assert RootfsConfig.from_env({}) == RootfsConfig()
    given_as_text = RootfsConfig(str(tmp_path), str(tmp_path / "c"))  # type: ignore[arg-type]
    assert given_as_text.template_dir == tmp_path and given_as_text.clones_dir == tmp_path / "c"


def test_min_free_comes_from_the_environment_mapping() -> None:
    """ROOTFS_MIN_FREE sets the reserve a copy must leave free; unset or blank, it is the default 5%."""
    from worker.core.space import DEFAULT_RESERVE, Reserve

    assert RootfsConfig.from_env({"ROOTFS_MIN_FREE": "10G"}).min_free == Reserve(nbytes=10 << 30)
    assert RootfsConfig.from_env({"ROOTFS_MIN_FREE": " 2% "}).min_free == Reserve(percent=2.0)
    assert RootfsConfig.from_env({"ROOTFS_MIN_FREE": "  "}).min_free == DEFAULT_RESERVE
    assert RootfsConfig.from_env({}).min_free == DEFAULT_RESERVE == Reserve(percent=5.0)


def test_private_names_of_the_clones_dir_are_the_dotted_ones() -> None:
    """Our own entries (.cache, .locks, .trash) are private; no safe vm id starts with a dot, so none is."""
    from worker.core.layout import is_private

    assert all(is_private(name) for name in (".cache", ".locks", ".trash"))
    assert not any(is_private(name) for name in ("vm-1", "vm_1", "x.y"))
