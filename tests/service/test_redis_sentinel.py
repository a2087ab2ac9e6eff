"""Sentinel: the master is SIGKILLed during a burst of clones; after the failover every VM has its disk."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from tests.helpers import wait_until
from tests.prodredis import SentinelGroup
from tests.service.conftest import MakeClient
from tests.workers import StartHost
from worker.client import JobHandle, RootfsClient
from worker.dev.processes import CeleryProcess, worker_env
from worker.errors import TaskTimeout
from worker.service.queues import host_queues

pytestmark = pytest.mark.slow

JOBS = 50
KILL_AFTER = 20
HOST = "sentinel-a"


@pytest.fixture
def group(tmp_path: Path) -> Iterator[SentinelGroup]:
    g = SentinelGroup(tmp_path / "redis").start()
    try:
        wait_until(g.settled, what="three sentinels agreeing on master and replica", timeout=30, poll=0.2)
        yield g
    finally:
        g.stop()


def test_a_burst_of_clones_survives_a_sentinel_failover(
    group: SentinelGroup, tmp_path: Path, make_client: MakeClient
) -> None:
    """Master SIGKILLed mid-burst: all 50 VMs get their clone and a result; worker and beat keep running."""
    tdir = tmp_path / "templates"
    (tdir / "base").mkdir(parents=True)
    data = b"sentinel template " * 4096
    (tdir / "base" / "rootfs.ext4").write_bytes(data)
    clones = tmp_path / "clones"
    env = worker_env(
        broker_url=group.url,
        host=HOST,
        template_dir=tdir,
        clones_dir=clones,
        extra={
            **group.env(),
            "ROOTFS_WARM_ON_START": "0",
            "ROOTFS_HEARTBEAT_INTERVAL": "1",
            "ROOTFS_WARM_INTERVAL": "1",
        },
    )
    worker = CeleryProcess("worker", env, tmp_path / "worker.log", args=["--concurrency", "2", "-n", HOST])
    beat = CeleryProcess("beat", env, tmp_path / "beat.log", args=["-s", str(tmp_path / "beat-schedule")])
    worker.start()
    beat.start()
    try:
        worker.wait_ready()
        client = make_client(group.env())
        wait_until(lambda: [h["host"] for h in client.hosts()] == [HOST], what="the heartbeat", timeout=20)
        old_master = group.master_port()
        assert old_master == group.master.port

        handles: list[JobHandle] = []
        for i in range(JOBS):
            if i == KILL_AFTER:
                assert group.master.proc is not None
                os.kill(group.master.proc.pid, signal.SIGKILL)
                killed_at = time.time()
            handles.append(client.clone(host=HOST, vm_id=f"vm-{i}", stack="base"))
        results = client.gather(handles, timeout=10, resubmit=3)
        resubmitted = sum(h.resubmitted for h in handles)
        print(f"\nsentinel failover: {resubmitted} of {JOBS} clones resubmitted")

        assert group.master_port() == group.replica.port  # the failover happened
        assert [r["vm_id"] for r in results] == [f"vm-{i}" for i in range(JOBS)]
        for i in range(JOBS):
            assert (clones / f"vm-{i}" / "rootfs.ext4").read_bytes() == data
        # Worker and beat rode through: same processes, and the beat's fan-outs reach the worker after the kill.
        assert worker.proc is not None and worker.proc.poll() is None
        assert beat.proc is not None and beat.proc.poll() is None
        wait_until(lambda: [h["host"] for h in client.hosts()] == [HOST], what="heartbeat on the new master")
        before = worker.log().count("Task rootfs.fanout_warm")
        wait_until(
            lambda: worker.log().count("Task rootfs.fanout_warm") >= before + 2,
            what="the beat's fan-out after the failover",
            timeout=20,
        )
        assert time.time() > killed_at
    finally:
        beat.stop()
        worker.stop()


def test_a_clone_whose_job_was_lost_is_resubmitted_and_answers(
    start_host: StartHost, client: RootfsClient, redis_url: str
) -> None:
    """A job Redis lost (as after a failover) times out once, is sent again under the same id, and answers."""
    lost = client.clone(host="lostjob", vm_id="vm-lost", stack="base")
    burst = [client.clone(host="lostjob", vm_id=f"vm-burst-{i}", stack="base") for i in range(2)]
    # What an asynchronous replica may do: forget jobs the old master had acknowledged.
    with redis.Redis.from_url(redis_url) as r:
        assert r.delete(host_queues("lostjob").fast) == 1
    host = start_host("lostjob")
    host.template("base", b"resubmit " * 1024)
    # Without resubmission the loss is a timeout (the negative case)...
    with pytest.raises(TaskTimeout):
        lost.result(timeout=1)
    # ...with it, the same job (same id) is sent again and answers.
    result = lost.result(timeout=5, resubmit=2)
    assert result["vm_id"] == "vm-lost" and lost.resubmitted == 1
    assert (host.clones_dir / "vm-lost" / "rootfs.ext4").read_bytes() == b"resubmit " * 1024
    # A burst: one shared timeout, then every missing job sent again at once.
    assert [r["vm_id"] for r in client.gather(burst, timeout=3, resubmit=1)] == ["vm-burst-0", "vm-burst-1"]
    assert [h.resubmitted for h in burst] == [1, 1]


@pytest.fixture
def tls_group(tmp_path: Path) -> Iterator[SentinelGroup]:
    g = SentinelGroup(tmp_path / "redis", tls=True).start()
    try:
        wait_until(g.settled, what="three sentinels agreeing on a TLS master and replica", timeout=30, poll=0.2)
        yield g
    finally:
        g.stop()


def test_sentinel_with_tls_masters_clones_before_and_after_a_failover(
    tls_group: SentinelGroup, tmp_path: Path, make_client: MakeClient
) -> None:
    """Sentinels in clear, TLS-only masters demanding client certs: a clone works, and again after a failover."""
    g = tls_group
    tdir = tmp_path / "templates"
    (tdir / "base").mkdir(parents=True)
    (tdir / "base" / "rootfs.ext4").write_bytes(b"tls sentinel " * 1024)
    env = worker_env(
        broker_url=g.url,
        host=HOST,
        template_dir=tdir,
        clones_dir=tmp_path / "clones",
        extra={**g.env(), "ROOTFS_WARM_ON_START": "0", "ROOTFS_HEARTBEAT_INTERVAL": "1"},
    )
    worker = CeleryProcess("worker", env, tmp_path / "worker.log", args=["--concurrency", "1", "-n", HOST]).start()
    try:
        worker.wait_ready()
        client = make_client(g.env())
        assert client.clone(host=HOST, vm_id="vm-a", stack="base").result(timeout=30, resubmit=1)["vm_id"] == "vm-a"
        assert g.master.proc is not None
        os.kill(g.master.proc.pid, signal.SIGKILL)
        wait_until(lambda: g.master_port() == g.replica.port, what="the failover", timeout=30, poll=0.2)
        assert client.clone(host=HOST, vm_id="vm-b", stack="base").result(timeout=30, resubmit=1)["vm_id"] == "vm-b"
        wait_until(lambda: [h["host"] for h in client.hosts()] == [HOST], what="heartbeat on the new master")
        assert worker.proc is not None and worker.proc.poll() is None
    finally:
        worker.stop()
