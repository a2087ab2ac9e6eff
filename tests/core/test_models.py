"""The JSON shapes results have on the wire: one per result type, defined by the model."""

from __future__ import annotations

import json
from pathlib import Path

from worker import StackInfo, VmRootfs, WarmReport


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
