"""Our record of a clone (.clone.json): written as fixed JSON, dated by its stamp when adopted, read as a hint."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import Env
from worker import FilesystemError
from worker.core import records


@dataclass
class VmDir:
    path: Path
    fd: int

    @property
    def record(self) -> Path:
        return self.path / ".clone.json"

    @property
    def stamp(self) -> Path:
        return self.path / "rootfs.ext4.sha256"

    def write(self, vm_id: str = "vm-1", stack: str = "base", *, adopted: bool = False) -> None:
        records.write_record(self.fd, self.path, vm_id=vm_id, stack=stack, adopted=adopted)

    def read(self) -> object:
        return records.read_record(self.fd, self.path)


@pytest.fixture
def vm_dir(tmp_path: Path) -> Iterator[VmDir]:
    path = tmp_path / "clones" / "vm-1"
    path.mkdir(parents=True)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        yield VmDir(path, fd)
    finally:
        os.close(fd)


def test_record_is_json_with_sorted_keys_and_the_ids_as_written(vm_dir: VmDir) -> None:
    """The file holds one JSON object, keys in a fixed order, a non-ASCII vm id as UTF-8 text (not escaped)."""
    vm_dir.write("vm-é/1", "base")
    raw = vm_dir.record.read_bytes()
    created = json.loads(raw)["created"]
    assert isinstance(created, float)
    assert raw == f'{{"created": {created!r}, "stack": "base", "vm_id": "vm-é/1"}}'.encode()
    assert vm_dir.read() == {"created": created, "stack": "base", "vm_id": "vm-é/1"}


def test_new_clone_is_dated_now_and_an_adopted_one_by_its_stamp(vm_dir: VmDir, tmp_path: Path) -> None:
    """A clone we made is created "now" even beside an old stamp; a clone we adopt is as old as its stamp."""
    vm_dir.stamp.write_text("0" * 64)
    os.utime(vm_dir.stamp, (1_000_000.0, 1_000_000.0))
    before = time.time()
    vm_dir.write(adopted=False)
    record = vm_dir.read()
    assert isinstance(record, dict)
    assert before <= record["created"] <= time.time()

    vm_dir.record.unlink()
    vm_dir.write(adopted=True)
    assert vm_dir.read() == {"created": 1_000_000.0, "stack": "base", "vm_id": "vm-1"}


def test_adopted_clone_with_a_symlinked_stamp_is_dated_by_the_link_not_its_target(
    vm_dir: VmDir, tmp_path: Path
) -> None:
    """A stamp that is a symlink is not followed out of the VM directory: the record takes the link's own time."""
    target = tmp_path / "elsewhere"
    target.write_text("0" * 64)
    os.utime(target, (2_000_000.0, 2_000_000.0))
    vm_dir.stamp.symlink_to(target)
    os.utime(vm_dir.stamp, (1_000_000.0, 1_000_000.0), follow_symlinks=False)
    vm_dir.write(adopted=True)
    assert vm_dir.read() == {"created": 1_000_000.0, "stack": "base", "vm_id": "vm-1"}


@pytest.mark.parametrize(
    "raw", [b"", b"\0" * 16, b"{", b"null", b"[]", b'["vm-1", "base"]', b"42", b'"vm-1"', b'{"vm_id": "\xff"}']
)
def test_record_that_is_not_a_json_object_reads_as_none(vm_dir: VmDir, raw: bytes) -> None:
    """An empty, damaged (not even UTF-8) or non-object record is no record; an object is read as it is."""
    vm_dir.record.write_bytes(raw)
    assert vm_dir.read() is None
    vm_dir.record.write_text('{"vm_id": "vm-1"}')
    assert vm_dir.read() == {"vm_id": "vm-1"}
    if b"\xff" not in raw:
        assert records.parse_record(raw.decode()) is None


def test_clone_whose_record_is_not_utf8_is_cloned_again_with_a_new_record(env: Env) -> None:
    """Cloning again a VM whose record was damaged into bytes that are not UTF-8 returns the clone and rewrites
    the record (it used to fail with UnicodeDecodeError)."""
    env.template("base", b"B" * 1000)
    first = env.registry.clone_for_vm("vm-1", "base")
    record = first.path.parent / ".clone.json"
    record.write_bytes(b'{"vm_id": "\xff"}')
    again = env.registry.clone_for_vm("vm-1", "base")
    assert again.path == first.path and again.path.read_bytes() == b"B" * 1000
    assert json.loads(record.read_bytes())["vm_id"] == "vm-1"


def test_reconcile_releases_a_clone_whose_record_is_not_utf8(env: Env) -> None:
    """A reconcile sweep releases an old clone whose record is not UTF-8 (it used to abort the whole sweep)."""
    env.template("base", b"B" * 1000)
    vm_dir = env.registry.clone_for_vm("vm-1", "base").path.parent
    (vm_dir / ".clone.json").write_bytes(b'{"vm_id": "\xff"}')
    for old in (vm_dir / "rootfs.ext4.sha256", vm_dir):  # a day old, with no record to say otherwise
        os.utime(old, (time.time() - 86400,) * 2)
    report = env.registry.reconcile([], older_than=60, dry_run=False)
    assert (report.released, report.failed) == (["vm-1"], {})
    assert not vm_dir.exists()


def test_record_that_is_a_symlink_reads_as_none_and_is_replaced_not_followed(vm_dir: VmDir, tmp_path: Path) -> None:
    """A .clone.json symlinked to a record elsewhere reads as none; writing ours replaces the link, and the file
    it pointed to is left as it was."""
    target = tmp_path / "elsewhere.json"
    target.write_text('{"vm_id": "vm-1", "stack": "base", "created": 1.0}')
    vm_dir.record.symlink_to(target)
    assert vm_dir.read() is None
    vm_dir.write("vm-1", "base")
    assert not vm_dir.record.is_symlink()
    record = vm_dir.read()
    assert isinstance(record, dict) and record["created"] != 1.0
    assert target.read_text() == '{"vm_id": "vm-1", "stack": "base", "created": 1.0}'


def test_record_that_is_a_directory_reads_as_none_and_cannot_be_written(vm_dir: VmDir) -> None:
    """A directory in the record's place reads as no record; writing the record over it fails with
    FilesystemError("write") naming the record, and the directory stays."""
    vm_dir.record.mkdir()
    assert vm_dir.read() is None
    with pytest.raises(FilesystemError) as failed:
        vm_dir.write()
    assert (failed.value.op, failed.value.path) == ("write", str(vm_dir.record))
    assert vm_dir.record.is_dir()


def test_a_record_that_cannot_be_written_in_a_new_directory_is_named(
    vm_dir: VmDir, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Writing the record of a directory just made (one write, no partial) failing with ENOSPC is a transient
    FilesystemError naming the record; the same directory then takes the record once the disk has room."""
    real_write = os.write

    def full(fd: int, data: bytes) -> int:
        if os.readlink(f"/proc/self/fd/{fd}") == str(vm_dir.record):
            raise OSError(28, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", full)
    with pytest.raises(FilesystemError) as info:
        records.write_record(vm_dir.fd, vm_dir.path, vm_id="vm-1", stack="base", adopted=False, fresh=True)
    assert (info.value.op, info.value.path, info.value.errno) == ("write", str(vm_dir.record), 28)
    assert info.value.transient
    monkeypatch.undo()
    vm_dir.record.unlink()
    records.write_record(vm_dir.fd, vm_dir.path, vm_id="vm-1", stack="base", adopted=False, fresh=True)
    assert json.loads(vm_dir.record.read_text())["stack"] == "base"
