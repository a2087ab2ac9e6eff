"""Fleet lifecycle through the queue: inventory, in-use refusal, reconcile, start-up sweep, host inventory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import hold_open, wait_until
from tests.workers import StartHost
from worker import CloneInUse, InvalidArgument
from worker.client import RootfsClient

pytestmark = pytest.mark.slow


def _cli(env: dict[str, str], *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    exe = Path(sys.executable).with_name("rootfs-worker")
    return subprocess.run([str(exe), *args], env=env, input=stdin, capture_output=True, text=True, timeout=120)


def _age(vm_dir: Path, seconds: float) -> None:
    then = time.time() - seconds
    record = vm_dir / ".clone.json"
    data = json.loads(record.read_text())
    record.write_text(json.dumps({**data, "created": then}))
    os.utime(vm_dir, (then, then))


def test_worker_start_sweeps_leftovers_and_announces_its_inventory(
    start_host: StartHost, client: RootfsClient, tmp_path: Path
) -> None:
    """A starting worker removes a crashed clone and the trash, keeps complete clones, and its heartbeat
    carries free space, reflink, clone count and warm stack hashes (also in `rootfs-worker hosts`)."""
    clones = tmp_path / "inv" / "clones"
    crashed = clones / "vm-crashed"
    crashed.mkdir(parents=True)
    (crashed / "rootfs.ext4.partial").write_bytes(b"x")
    old = time.time() - 3600
    os.utime(crashed / "rootfs.ext4.partial", (old, old))
    os.utime(crashed, (old, old))
    (clones / ".trash" / "vm-gone.1").mkdir(parents=True)
    host = start_host("inv", clones_dir=clones)
    assert not crashed.exists() and not any((clones / ".trash").iterdir())
    assert "start-up sweep" in host.worker.log() and "vm-crashed" in host.worker.log()

    host.template("base", b"BASE")
    host.template("cold", b"COLD")
    result = client.clone(host="inv", vm_id="vm-1", stack="base").result(timeout=30)

    def announced() -> dict[str, object]:
        [info] = client.hosts()
        return info

    wait_until(lambda: announced().get("clones") == 1, what="the heartbeat to count the clone")
    info = announced()
    assert info["stacks"] == {"base": result["source_sha256"], "cold": None}
    assert info["reflink"] is False  # tmp_path is ext4 here
    assert isinstance(info["free_bytes"], int) and 0 < info["free_bytes"] <= info["total_bytes"]  # type: ignore[operator]
    table = _cli(host.env, "hosts")
    assert table.returncode == 0, table.stderr
    header, row = table.stdout.splitlines()
    assert header.split()[:5] == ["HOST", "FREE", "REFLINK", "CLONES", "STACKS"] and "LAST SEEN" in header
    assert row.split()[0] == "inv" and " no " in row and "1/2 warm" in row


def test_clones_release_in_use_and_reconcile_through_the_queue(start_host: StartHost, client: RootfsClient) -> None:
    """list_clones, a refused release of a disk in use (and a forced one), and reconcile, via client and CLI."""
    host = start_host("a")
    host.template("base", b"B" * 4096)
    for vm in ("vm-keep", "vm-leak", "vm-held", "vm-forced"):
        client.clone(host="a", vm_id=vm, stack="base").result(timeout=30)
    listed = client.clones(host="a").result(timeout=30)
    assert [c["vm_id"] for c in listed] == ["vm-forced", "vm-held", "vm-keep", "vm-leak"]
    assert {c["state"] for c in listed} == {"complete"} and {c["stack"] for c in listed} == {"base"}
    cli = _cli(host.env, "clones", "--host", "a", "--json")
    assert cli.returncode == 0 and json.loads(cli.stdout) == client.clones(host="a").result(timeout=30)
    table = _cli(host.env, "clones", "--host", "a").stdout.splitlines()
    assert table[0].split() == ["VM", "STACK", "STATE", "SIZE", "ALLOCATED", "AGE", "IN", "USE", "STALE"]
    assert table[1].split()[:3] == ["vm-forced", "base", "complete"] and len(table) == 5

    held_disk = host.clones_dir / "vm-held" / "rootfs.ext4"
    with hold_open(held_disk, "rw") as holder, hold_open(host.clones_dir / "vm-forced" / "rootfs.ext4", "ro"):
        with pytest.raises(CloneInUse) as refused:
            client.release(host="a", vm_id="vm-held").result(timeout=30)
        assert (refused.value.vm_id, refused.value.pids) == ("vm-held", [holder.pid])
        human = _cli(host.env, "release", "vm-held", "--host", "a")
        assert human.returncode == 1 and "CloneInUse" in human.stderr and str(holder.pid) in human.stderr
        forced = _cli(host.env, "release", "vm-forced", "--host", "a", "--force", "--json")
        assert json.loads(forced.stdout)["released"] is True
        for vm in ("vm-keep", "vm-leak", "vm-held"):
            _age(host.clones_dir / vm, 3600)
        dry = _cli(host.env, "reconcile", "--keep-file", "-", "--host", "a", stdin="vm-keep\n\n")
        assert dry.returncode == 0, dry.stderr
        assert "would release vm-leak" in dry.stdout and "dry run" in dry.stdout
        assert (host.clones_dir / "vm-leak").exists()
        report = client.reconcile(host="a", keep=["vm-keep"], dry_run=False).result(timeout=30)
        assert (report["released"], report["kept"], report["in_use"]) == (["vm-leak"], ["vm-keep"], ["vm-held"])
    assert client.release(host="a", vm_id="vm-held").result(timeout=30)["released"] is True
    with pytest.raises(InvalidArgument):
        client.reconcile(host="a", keep="vm-keep", dry_run=False).result(timeout=30)  # type: ignore[arg-type]
    assert [c["vm_id"] for c in client.clones(host="a").result(timeout=30)] == ["vm-keep"]
