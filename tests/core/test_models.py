"""The registry's results in their JSON form: the shapes the README documents and the task results carry."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import Env
from worker import RootfsConfig, RootfsRegistry
from worker.core.models import StackInfo, VmRootfs, WarmReport


def test_stack_and_clone_results_have_the_documented_json_shape(env: Env) -> None:
    """A stack is {name, template_path, size_bytes, sha256}; a clone {vm_id, stack, path, source_sha256}."""
    template = env.template("base", b"abc")
    info = env.registry.stack("base")
    assert info is not None
    digest = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    assert info.to_dict() == {"name": "base", "template_path": str(template), "size_bytes": 3, "sha256": digest}
    rootfs = env.registry.clone_for_vm("vm/1", "base")
    assert rootfs.to_dict() == {
        "vm_id": "vm_1",
        "stack": "base",
        "path": str(env.clones_dir / "vm_1" / "rootfs.ext4"),
        "source_sha256": digest,
    }
    assert json.loads(json.dumps([info.to_dict(), rootfs.to_dict()])) == [info.to_dict(), rootfs.to_dict()]


def test_warm_report_json_shape() -> None:
    """A warm-up report is {hashed, already_warm, bytes_hashed, seconds (to the microsecond), failed, busy}."""
    report = WarmReport(("a",), ("b", "c"), 42, 1.23456789, {"d": "TemplateChanged: ..."}, False)
    assert report.to_dict() == {
        "hashed": ["a"],
        "already_warm": ["b", "c"],
        "bytes_hashed": 42,
        "seconds": 1.234568,
        "failed": {"d": "TemplateChanged: ..."},
        "busy": False,
    }
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
    assert a == VmRootfs("vm-1", "base", Path("/c/vm-1/rootfs.ext4"), "0" * 64)
    with pytest.raises(AttributeError):
        a.vm_id = "vm-2"  # type: ignore[misc]
    assert StackInfo("a", Path("/t"), 1, "0" * 64) != StackInfo("a", Path("/t"), 2, "0" * 64)


def test_registry_from_env_reads_the_process_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """With no mapping given, the two directories come from the process environment, else the defaults."""
    monkeypatch.setenv("MICROVM_ROOTFS_TEMPLATE_DIR", str(tmp_path / "t"))
    monkeypatch.setenv("MICROVM_ROOTFS_CLONES_DIR", str(tmp_path / "c"))
    assert RootfsRegistry.from_env().config == RootfsConfig(tmp_path / "t", tmp_path / "c")
    assert RootfsConfig.from_env() == RootfsConfig(tmp_path / "t", tmp_path / "c")
    monkeypatch.setenv("MICROVM_ROOTFS_CLONES_DIR", "")
    assert RootfsConfig.from_env().clones_dir == Path("/var/lib/microvm/rootfs")
    assert RootfsConfig.from_env({}) == RootfsConfig()
    assert RootfsConfig(str(tmp_path), str(tmp_path)).template_dir == tmp_path  # type: ignore[arg-type]
