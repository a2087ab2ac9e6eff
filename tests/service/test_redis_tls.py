"""TLS to Redis: a real TLS-only redis-server that demands client certificates, certificates made by the test."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from tests.helpers import wait_until
from tests.prodredis import TlsRedis, make_ca, make_cert, start_tls_redis
from tests.service.conftest import MakeClient
from worker.dev.processes import CeleryProcess, worker_env
from worker.service.preflight import EXIT_MISCONFIGURED
from worker.service.queues import host_queues

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tls_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsRedis]:
    tls = start_tls_redis(tmp_path_factory.mktemp("tls"))
    yield tls
    tls.server.stop()


@pytest.fixture
def clean(tls_redis: TlsRedis) -> TlsRedis:
    _ask(tls_redis, lambda r: r.flushall())
    return tls_redis


def _ask(tls: TlsRedis, question: Callable[[redis.Redis], Any]) -> Any:
    """One question to the TLS server with the test's own client, closed after (an open TLS socket left to the
    garbage collector is a ResourceWarning, an error in this suite)."""
    with tls.redis() as r:
        return question(r)


def _worker(tmp_path: Path, host: str, env: dict[str, str]) -> CeleryProcess:
    tdir = tmp_path / host / "templates"
    (tdir / "base").mkdir(parents=True, exist_ok=True)
    (tdir / "base" / "rootfs.ext4").write_bytes(b"tls template " * 4096)
    wenv = worker_env(
        broker_url=env["CELERY_BROKER_URL"],
        host=host,
        template_dir=tdir,
        clones_dir=tmp_path / host / "clones",
        extra={"ROOTFS_WARM_ON_START": "0", "ROOTFS_HEARTBEAT_INTERVAL": "1", **env},
    )
    return CeleryProcess("worker", wenv, tmp_path / host / "worker.log", args=["--concurrency", "1", "-n", host])


def test_clone_release_heartbeat_and_results_all_go_over_tls(
    clean: TlsRedis, tmp_path: Path, make_client: MakeClient
) -> None:
    """On a Redis with no plain port, a worker and a client with the CA and a client cert clone, release, see hosts."""
    worker = _worker(tmp_path, "tls-a", clean.env()).start()
    try:
        worker.wait_ready()
        client = make_client(clean.env())
        wait_until(lambda: [h["host"] for h in client.hosts()] == ["tls-a"], what="the TLS heartbeat", timeout=15)
        result = client.clone(host="tls-a", vm_id="vm-1", stack="base").result(timeout=30)
        disk = Path(result["path"])
        assert disk.read_bytes() == b"tls template " * 4096
        assert client.release(host="tls-a", vm_id="vm-1").result(timeout=30)["released"] is True
        assert not disk.exists()
        # The heartbeat is in this TLS-only Redis (there is no other).
        assert _ask(clean, lambda r: r.exists("rootfs:host:tls-a")) == 1
    finally:
        worker.stop()


def test_a_server_certificate_from_another_ca_is_refused_and_no_job_taken(
    clean: TlsRedis, tmp_path: Path, make_client: MakeClient
) -> None:
    """A worker trusting another CA exits at once naming the certificate failure; the queued job stays queued."""
    client = make_client(clean.env())
    client.clone(host="tls-b", vm_id="vm-2", stack="base")
    queue = host_queues("tls-b").fast
    assert _ask(clean, lambda r: r.llen(queue)) == 1
    other = make_ca(tmp_path / "other", "other-ca")
    mine = make_cert(tmp_path / "other", other, "imposter-client")
    env = {**clean.env(), "ROOTFS_REDIS_CA": str(other.cert), "ROOTFS_REDIS_CERT": str(mine.cert)}
    env["ROOTFS_REDIS_KEY"] = str(mine.key)
    worker = _worker(tmp_path, "tls-b", env).start()
    assert worker.proc is not None
    assert worker.proc.wait(timeout=60) == EXIT_MISCONFIGURED
    log = worker.log()
    assert "certificate verify failed" in log.lower() and "ROOTFS_REDIS_CA" in log
    assert _ask(clean, lambda r: r.llen(queue)) == 1
    assert not (tmp_path / "tls-b" / "clones" / "vm-2").exists()


def test_a_plain_worker_on_a_tls_only_redis_exits_with_a_clear_message(clean: TlsRedis, tmp_path: Path) -> None:
    """redis:// towards a TLS-only port: the worker says to use rediss:// and exits, instead of retrying for ever."""
    plain = f"redis://127.0.0.1:{clean.server.port}/0"
    worker = _worker(tmp_path, "tls-c", {"CELERY_BROKER_URL": plain, "CELERY_RESULT_BACKEND": plain}).start()
    assert worker.proc is not None
    assert worker.proc.wait(timeout=60) == EXIT_MISCONFIGURED
    log = worker.log()
    assert "speaks only TLS" in log and "rediss://" in log
    assert log.count("cannot start") == 1
