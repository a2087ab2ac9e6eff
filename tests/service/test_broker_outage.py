"""A Redis outage while a worker holds an unacknowledged job (kombu 5.7 crashed the worker there)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from kombu import Queue

from tests.helpers import wait_until
from tests.workers import StartHost
from worker.celery import create_app
from worker.client import RootfsClient
from worker.dev.processes import RedisServer
from worker.service.queues import host_queues
from worker.service.settings import Settings

pytestmark = pytest.mark.slow


def test_worker_holding_an_unacked_job_survives_a_redis_outage(start_host: StartHost, tmp_path: Path) -> None:
    """Redis down for 3 s while a job waits for its ETA in the worker: the worker lives and takes new jobs."""
    server = RedisServer(tmp_path / "redis", appendonly=True).start()
    try:
        # Jobs a lost connection strands in Redis' unacked set come back after the visibility timeout.
        fast_redelivery = {
            "ROOTFS_TASK_TIME_LIMIT": "10",
            "ROOTFS_RETRY_CAP": "1",
            "ROOTFS_VISIBILITY_TIMEOUT": "15",
            "ROOTFS_RESTORE_INTERVAL": "1",
        }
        a = start_host("a", broker_url=server.url, env=fast_redelivery)
        app = create_app(Settings.from_env(a.env))
        client = RootfsClient(app)
        assert client.ping(host="a").result(timeout=30) == {"host": "a"}
        # An ETA job stays reserved (unacknowledged) in the worker until it is due: like a retry waiting.
        later = app.send_task("rootfs.ping", kwargs={"host": "a"}, queue=Queue(host_queues("a").fast), countdown=5)
        wait_until(lambda: "rootfs.ping[" + later.id in a.worker.log(), timeout=30, what="the ETA job to be held")
        server.stop(hard=True)
        time.sleep(3)
        server.start()
        assert client.ping(host="a").result(timeout=60) == {"host": "a"}
        assert a.worker.proc is not None and a.worker.proc.poll() is None, "the worker died"
        assert "Unrecoverable error" not in a.worker.log()
        assert later.get(timeout=60) == {"host": "a"}  # the held job is not lost either
    finally:
        server.stop()


def test_clone_running_through_a_redis_outage_completes_and_reports(start_host: StartHost, tmp_path: Path) -> None:
    """Redis down for 3 s while a clone hashes and copies: the clone is not killed, its SUCCESS arrives."""
    server = RedisServer(tmp_path / "redis", appendonly=True).start()
    try:
        a = start_host("a", broker_url=server.url)
        path = a.template_dir / "big" / "rootfs.ext4"
        path.parent.mkdir(parents=True)
        block = os.urandom(1 << 20)
        with path.open("wb") as f:
            for _ in range(1024):
                f.write(block)
            os.fsync(f.fileno())
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)  # cold: the hash reads the disk
        client = RootfsClient(create_app(Settings.from_env(a.env)))
        handle = client.clone(host="a", vm_id="vm-1", stack="big")
        wait_until(lambda: handle.result_handle.state == "PROGRESS", timeout=60, what="the hash to report progress")
        server.stop(hard=True)
        time.sleep(3)
        server.start()
        result = handle.result(timeout=120)
        assert result["vm_id"] == "vm-1" and result["hashed_bytes"] == 1 << 30
        assert Path(result["path"]).stat().st_size == 1 << 30
        assert "Unrecoverable error" not in a.worker.log()
    finally:
        server.stop()
