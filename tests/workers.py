"""Fixtures for tests that cross the queue: a private redis-server and real `celery worker` processes.

Loaded as a pytest plugin from conftest.py. No test here uses task_always_eager or touches the machine's
own Redis: the session starts its own server on a free port and flushes it before each test.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis
from celery import Celery

from worker.celery import create_app
from worker.client import RootfsClient
from worker.dev.processes import CeleryProcess, RedisServer, worker_env
from worker.service.settings import Settings

#: Fixtures that start real processes: a test using one belongs to the slow tier, so `make test-fast` runs
#: with no Redis and no worker at all (fakeredis covers the logic that needs only Redis' data model).
REAL_PROCESS_FIXTURES = frozenset({"redis_server", "redis_url", "start_host", "client"})


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        used = REAL_PROCESS_FIXTURES.intersection(getattr(item, "fixturenames", ()))
        if used and item.get_closest_marker("slow") is None:
            raise pytest.UsageError(f"{item.nodeid} uses {sorted(used)} (a real Redis/worker) but is not marked slow")


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    client.close()
    return redis_server.url


@dataclass
class Host:
    """One simulated VM host: its name, its directories and its worker process."""

    name: str
    template_dir: Path
    clones_dir: Path
    env: dict[str, str]
    worker: CeleryProcess

    def template(self, stack: str, data: bytes) -> Path:
        path = self.template_dir / stack / "rootfs.ext4"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return path


StartHost = Callable[..., Host]


@pytest.fixture
def start_host(tmp_path: Path, redis_url: str) -> Iterator[StartHost]:
    """Factory: `start_host("a", env={...}, concurrency=2)` gives a Host whose worker is ready."""
    started: list[Host] = []

    def start(
        name: str | None = None,
        *,
        env: Mapping[str, str] | None = None,
        concurrency: int = 2,
        broker_url: str | None = None,
        ready: bool = True,
        template_dir: Path | None = None,
        clones_dir: Path | None = None,
        app: str = "worker",
    ) -> Host:
        name = name or f"h{uuid.uuid4().hex[:8]}"
        base = tmp_path / name
        tdir = template_dir or base / "templates"
        cdir = clones_dir or base / "clones"
        tdir.mkdir(parents=True, exist_ok=True)
        extra = {"ROOTFS_WARM_ON_START": "0", "ROOTFS_HEARTBEAT_INTERVAL": "1", **(env or {})}
        wenv = worker_env(
            broker_url=broker_url or redis_url, host=name, template_dir=tdir, clones_dir=cdir, extra=extra
        )
        proc = CeleryProcess(
            "worker",
            wenv,
            base / "worker.log",
            args=["--concurrency", str(concurrency), "-n", f"{name}@%h"],
            app=app,
        )
        host = Host(name, tdir, cdir, wenv, proc)
        started.append(host)
        proc.start()
        if ready:
            proc.wait_ready()
        return host

    yield start
    for host in started:
        host.worker.stop()


@pytest.fixture
def client(redis_url: str) -> Iterator[RootfsClient]:
    """A scheduler's client on the same Redis (its own ROOTFS_HOST does not matter to it)."""
    env = {"CELERY_BROKER_URL": redis_url, "CELERY_RESULT_BACKEND": redis_url, "ROOTFS_HOST": "scheduler"}
    app = create_app(Settings.from_env(env))
    yield RootfsClient(app)
    _close_connections(app)


def _close_connections(app: Celery) -> None:
    """Close the result backend's sockets (its subscription and its pool) now, rather than when the garbage
    collector finds them: an unclosed socket collected later is a ResourceWarning, which the suite turns into
    an error in whatever test happens to be running. (The producer pool is kombu's, shared by every app on
    the same broker URL: it stays open for the next test.)"""
    backend = app._backend
    if backend is not None:
        consumer = getattr(backend, "result_consumer", None)
        if consumer is not None:
            consumer.stop()
        redis_client = getattr(backend, "client", None)
        if redis_client is not None:
            redis_client.connection_pool.disconnect()
    app.close()
