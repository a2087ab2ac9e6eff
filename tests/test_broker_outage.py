"""A Redis outage while a worker holds an unacknowledged job (kombu 5.7 crashed the worker there)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from kombu import Queue

from tests.queue import StartHost
from worker.celery import create_app
from worker.client import RootfsClient
from worker.local import RedisServer
from worker.queues import host_queues
from worker.settings import Settings

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
        deadline = time.monotonic() + 30
        while "rootfs.ping[" + later.id not in a.worker.log() and time.monotonic() < deadline:
            time.sleep(0.05)
        server.stop(hard=True)
        time.sleep(3)
        server.start()
        assert client.ping(host="a").result(timeout=60) == {"host": "a"}
        assert a.worker.proc is not None and a.worker.proc.poll() is None, "the worker died"
        assert "Unrecoverable error" not in a.worker.log()
        assert later.get(timeout=60) == {"host": "a"}  # the held job is not lost either
    finally:
        server.stop()
