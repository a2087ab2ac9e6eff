"""Faults with real processes: a worker killed mid-clone, Redis restarts, duplicate jobs, a full disk.

Every test runs real `celery worker` processes. Tests that stop Redis start a redis-server of their own (AOF
on); the others use the session's private server. None touches the machine's Redis. Tests wait with
generous deadlines but never assert how long anything took.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import MIB, evict, sha256_of, tmpfs_mount, wait_until, write_template
from tests.workers import StartHost
from worker import InsufficientSpace, RootfsConfig, RootfsRegistry
from worker.celery import create_app
from worker.client import JobHandle, RootfsClient
from worker.dev.processes import CeleryProcess, RedisServer
from worker.service.queues import host_queues
from worker.service.settings import Settings

pytestmark = pytest.mark.slow

#: What a finished clone directory holds, and nothing else.
CLONE_FILES = [".clone.json", ".vm-id", "rootfs.ext4", "rootfs.ext4.sha256"]

#: Large enough that copying it from disk (page cache evicted first) plus the fsync takes seconds on ext4,
#: so the kill lands mid-copy.
BIG_TEMPLATE_MIB = 1536

#: Redelivery of a killed worker's job. Redis hands an unacknowledged job to another worker once it has been
#: out for ROOTFS_VISIBILITY_TIMEOUT (25 s here; Settings.check requires > time limit 20 + retry cap 2), and
#: the new worker sweeps for such jobs every ROOTFS_RESTORE_INTERVAL (1 s). The soft limit is set explicitly:
#: its default, time limit - 30, would be 1 s here and cut the copy short.
REDELIVERY_ENV = {
    "ROOTFS_TASK_TIME_LIMIT": "20",
    "ROOTFS_TASK_SOFT_TIME_LIMIT": "18",
    "ROOTFS_RETRY_CAP": "2",
    "ROOTFS_VISIBILITY_TIMEOUT": "25",
    "ROOTFS_RESTORE_INTERVAL": "1",
}


# ---------------------------------------------------------------------------------------------- helpers


def client_for(url: str) -> RootfsClient:
    """A scheduler's client on the Redis at `url`."""
    env = {"CELERY_BROKER_URL": url, "CELERY_RESULT_BACKEND": url, "ROOTFS_HOST": "scheduler"}
    return RootfsClient(create_app(Settings.from_env(env)))


def partials_under(root: Path) -> list[str]:
    return sorted(
        os.path.relpath(os.path.join(d, name), root)
        for d, _, files in os.walk(root)
        for name in files
        if name.endswith(".partial")
    )


def free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def assert_complete_clone(vm_dir: Path, result: dict[str, Any], digest: str) -> None:
    """The job's answer names the clone, whose bytes are the template's, and the directory holds only it."""
    assert result["path"] == str(vm_dir / "rootfs.ext4")
    assert result["source_sha256"] == digest
    assert sorted(os.listdir(vm_dir)) == CLONE_FILES
    assert (vm_dir / "rootfs.ext4.sha256").read_text() == digest
    assert sha256_of(vm_dir / "rootfs.ext4") == digest


@dataclass(frozen=True)
class BigTemplate:
    template_dir: Path
    stack: str
    sha256: str

    @property
    def path(self) -> Path:
        return self.template_dir / self.stack / "rootfs.ext4"


@pytest.fixture(scope="module")
def big_template(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BigTemplate]:
    """A 1.5 GiB template of real, non-zero, non-repeating data (no holes to skip), written once per module."""
    root = tmp_path_factory.mktemp("big-template")
    path = root / "templates" / "big" / "rootfs.ext4"
    path.parent.mkdir(parents=True)
    digest = hashlib.sha256()
    noise = os.urandom(MIB)
    try:
        with path.open("wb") as f:
            for i in range(BIG_TEMPLATE_MIB):
                block = i.to_bytes(8, "little") + noise[8:]
                f.write(block)
                digest.update(block)
        yield BigTemplate(root / "templates", "big", digest.hexdigest())
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def extra_workers() -> Iterator[list[CeleryProcess]]:
    """Workers a test starts by hand (e.g. a replacement for a killed one); stopped at the end."""
    procs: list[CeleryProcess] = []
    yield procs
    for proc in reversed(procs):
        proc.stop()


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server with AOF (appendfsync always) that the test may kill and restart on the same port.

    Request it before `start_host`, so the workers are stopped before this server is.
    """
    server = RedisServer(tmp_path / "own-redis", appendonly=True).start()
    yield server
    server.stop()


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 16 MiB tmpfs (skipped, with the reason, when not root or the mount fails)."""
    with tmpfs_mount(tmp_path, size_mib=16) as mountpoint:
        yield mountpoint


# ------------------------------------------------------------------------------------------------ tests


def test_worker_killed_mid_clone_job_is_redelivered_and_completes(
    big_template: BigTemplate,
    tmp_path: Path,
    start_host: StartHost,
    client: RootfsClient,
    extra_workers: list[CeleryProcess],
) -> None:
    """A clone whose worker is SIGKILLed mid-copy comes back (visibility 25 s), completes, and leaves no partial."""
    clones = tmp_path / "clones"
    # Warm the hash in the host's shared cache, so the job goes straight to copying.
    warmed = RootfsRegistry(RootfsConfig(big_template.template_dir, clones)).stack(big_template.stack)
    assert warmed is not None and warmed.sha256 == big_template.sha256
    evict(big_template.path)
    host = start_host(
        "killed", env=REDELIVERY_ENV, concurrency=1, template_dir=big_template.template_dir, clones_dir=clones
    )
    vm_dir = clones / "vm-kill"
    partial = vm_dir / "rootfs.ext4.partial"
    try:
        handle = client.clone(host=host.name, vm_id="vm-kill", stack=big_template.stack)
        wait_until(lambda: partial.exists() and partial.stat().st_size > 0, timeout=60, what="the copy to start")
        host.worker.kill_hard()
        assert not (vm_dir / "rootfs.ext4").exists(), "the copy finished before the kill: use a bigger template"
        assert partial.exists()
        # The crash did not touch the template (reading it also brings it back into the page cache, so the
        # second attempt copies well within its 20 s time limit).
        assert sha256_of(big_template.path) == big_template.sha256

        # Same host, same dirs, same queues: only the process is new.
        second = CeleryProcess(
            "worker", host.env, tmp_path / "second-worker.log", args=["--concurrency", "1", "-n", "killed-2@%h"]
        )
        extra_workers.append(second)
        second.start().wait_ready()

        result = handle.result(timeout=180)
        assert_complete_clone(vm_dir, result, big_template.sha256)
        assert partials_under(clones) == []
    finally:
        shutil.rmtree(vm_dir, ignore_errors=True)  # 1.5 GiB per run: too much to leave in pytest's tmp dirs


def test_clone_jobs_queued_across_a_redis_restart_all_complete(
    own_redis: RedisServer, tmp_path: Path, start_host: StartHost
) -> None:
    """Clone jobs queued while no worker runs survive Redis (AOF) being killed and restarted: all complete."""
    client = client_for(own_redis.url)
    template_dir = tmp_path / "aof" / "templates"
    template = write_template(template_dir, "base", os.urandom(MIB))
    digest = sha256_of(template)
    vm_ids = [f"vm-{i}" for i in range(8)]
    handles = [client.clone(host="aof", vm_id=vm_id, stack="base") for vm_id in vm_ids]

    own_redis.stop(hard=True)  # SIGKILL: no shutdown save, only what the AOF already holds
    own_redis.start()
    host = start_host("aof", broker_url=own_redis.url, template_dir=template_dir)

    results = [handle.result(timeout=90) for handle in handles]
    for vm_id, result in zip(vm_ids, results, strict=True):
        assert_complete_clone(host.clones_dir / vm_id, result, digest)


def test_ten_duplicate_clone_jobs_make_exactly_one_clone(start_host: StartHost, client: RootfsClient) -> None:
    """Ten concurrent clone jobs for one VM make one clone and give ten identical answers; it is never replaced."""
    host = start_host("dup", concurrency=4)
    template = host.template("base", os.urandom(128 * MIB))
    digest = sha256_of(template)
    vm_dir = host.clones_dir / "vm-dup"
    clone = vm_dir / "rootfs.ext4"

    pending: list[JobHandle] = [client.clone(host="dup", vm_id="vm-dup", stack="base") for _ in range(10)]
    results: list[dict[str, Any]] = []
    inodes: list[int] = []

    def collect() -> bool:
        # In the order the jobs finish; the clone's inode is read right after each answer.
        for handle in [h for h in pending if h.result_handle.ready()]:
            results.append(handle.result(timeout=10))
            inodes.append(clone.stat().st_ino)
            pending.remove(handle)
        return not pending

    wait_until(collect, timeout=120, what="ten answers", poll=0.01)
    assert len({(r["path"], r["source_sha256"], r["vm_id"]) for r in results}) == 1
    assert len(set(inodes)) == 1, f"the clone was replaced between answers: inodes {inodes}"
    assert_complete_clone(vm_dir, results[0], digest)
    assert clone.stat().st_nlink == 1
    assert host.worker.log().count(f"to {clone} by") == 1, "the template was copied more than once"


def test_clone_that_cannot_fit_is_retried_then_fails_having_written_nothing(
    small_tmpfs: Path, start_host: StartHost, client: RootfsClient
) -> None:
    """A clone that cannot fit is refused before any copy (InsufficientSpace), retried, then reported; the
    filesystem's free space never moved."""
    clones = small_tmpfs / "clones"
    host = start_host(
        "full",
        env={"ROOTFS_RETRY_MAX": "2", "ROOTFS_RETRY_BASE": "0.2", "ROOTFS_RETRY_CAP": "1"},
        clones_dir=clones,
    )
    host.template("base", os.urandom(24 * MIB))  # 24 MiB of data into a 16 MiB filesystem
    free_before = free_bytes(small_tmpfs)

    handle = client.clone(host="full", vm_id="vm-full", stack="base")
    with pytest.raises(InsufficientSpace) as failure:
        handle.result(timeout=90)

    assert failure.value.needed >= 24 * MIB
    assert failure.value.path == str(clones)
    assert failure.value.reserve == int(free_bytes_total(small_tmpfs) * 0.05)  # the default: 5%
    assert handle.result_handle.retries == 2  # three attempts, as the client sees them
    log = host.worker.log()
    assert "retry 1/2" in log and "retry 2/2" in log
    assert "failed for good after 2 retries: InsufficientSpace" in log
    assert "by sparse-copy" not in log and not (clones / "vm-full").exists()
    assert partials_under(small_tmpfs) == []
    assert {p.name for p in clones.iterdir()} <= {".cache", ".locks"}
    assert free_bytes(small_tmpfs) >= free_before - MIB  # the hash cache and lock files take a few KiB


def free_bytes_total(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_blocks * st.f_frsize


def test_clone_into_a_full_disk_succeeds_once_space_is_freed(
    small_tmpfs: Path, start_host: StartHost, client: RootfsClient
) -> None:
    """A clone refused for space on its first attempt is retried and succeeds once space has been freed."""
    clones = small_tmpfs / "clones"
    # Retries 1-2 s apart (up to 5 of them): enough room for the test to free space between two attempts.
    host = start_host(
        "freed",
        env={"ROOTFS_RETRY_MAX": "5", "ROOTFS_RETRY_BASE": "1", "ROOTFS_RETRY_CAP": "2"},
        clones_dir=clones,
    )
    template = host.template("base", os.urandom(8 * MIB))
    digest = sha256_of(template)
    ballast = small_tmpfs / "ballast"
    ballast.write_bytes(b"\xff" * (12 * MIB))  # leaves about 4 MiB free: too little for an 8 MiB clone

    handle = client.clone(host="freed", vm_id="vm-freed", stack="base")
    wait_until(
        lambda: handle.result_handle.state == "RETRY" or "retry 1/5" in host.worker.log(),
        timeout=60,
        what="the first attempt to fail",
    )
    assert not handle.result_handle.ready()
    ballast.unlink()

    result = handle.result(timeout=90)
    assert_complete_clone(clones / "vm-freed", result, digest)
    log = host.worker.log()
    assert "transient InsufficientSpace" in log
    assert "failed for good" not in log
    assert partials_under(small_tmpfs) == []


def test_worker_reconnects_after_losing_redis(own_redis: RedisServer, start_host: StartHost) -> None:
    """A worker whose Redis is killed for 3 s, while it holds a job not yet done, reconnects and takes new jobs."""
    # The app as the host's own processes configure it: it may name the host's queues by name.
    env = {"CELERY_BROKER_URL": own_redis.url, "CELERY_RESULT_BACKEND": own_redis.url, "ROOTFS_HOST": "outage"}
    app = create_app(Settings.from_env(env))
    client = RootfsClient(app)
    host = start_host("outage", broker_url=own_redis.url)
    template = host.template("base", os.urandom(MIB))
    digest = sha256_of(template)
    before = client.clone(host="outage", vm_id="vm-before", stack="base").result(timeout=60)
    assert_complete_clone(host.clones_dir / "vm-before", before, digest)
    # A job the worker has taken but not finished when Redis goes (one scheduled a minute ahead, as a retry
    # waiting for its backoff is): the worker's unacknowledged messages are what made kombu 5.7 crash.
    held = app.send_task("rootfs.ping", kwargs={"host": "outage"}, queue=host_queues("outage").fast, countdown=60)
    wait_until(lambda: f"rootfs.ping[{held.id}] received" in host.worker.log(), timeout=30, what="the ping to be taken")

    own_redis.stop(hard=True)
    time.sleep(3)  # the outage itself, not a wait for a result
    own_redis.start()  # same port, same AOF

    after = client.clone(host="outage", vm_id="vm-after", stack="base").result(timeout=120)
    assert_complete_clone(host.clones_dir / "vm-after", after, digest)
    assert host.worker.proc is not None and host.worker.proc.poll() is None, "the worker exited"
    assert "Unrecoverable error" not in host.worker.log()
