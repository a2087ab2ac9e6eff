"""A private Redis and one real `celery worker` serving one host, for the sections that cross the queue.

Never the machine's own Redis: a redis-server of ours on a free port, without persistence, stopped (with
the worker) on the way out, whatever happened.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from celery import Celery

from worker.celery import create_app
from worker.client import RootfsClient
from worker.dev.processes import CeleryProcess, RedisServer, worker_env
from worker.service.settings import Settings

#: The concurrency a section uses when it does not say: one pool process per core of the 2-core bench machine.
CONCURRENCY = 2


def default_concurrency() -> int:
    """The worker's own default (ROOTFS_CONCURRENCY unset)."""
    return Settings.from_env({}).concurrency


@dataclass(frozen=True)
class Host:
    """What a section needs: the client, the host name to send to, and the directories the worker serves."""

    client: RootfsClient
    name: str
    template_dir: Path
    clones_dir: Path
    log: Path


@contextlib.contextmanager
def celery_host(root: Path, name: str, *, concurrency: int = CONCURRENCY) -> Iterator[Host]:
    """Start Redis and a worker for host `name` with its directories under `root`; templates go in before
    the first job (the worker does not warm on start: the sections decide what is warm)."""
    tdir, cdir = root / "templates", root / "clones"
    tdir.mkdir(parents=True, exist_ok=True)
    server = RedisServer(root / "redis")
    proc: CeleryProcess | None = None
    app: Celery | None = None
    try:
        server.start()
        env = worker_env(
            broker_url=server.url,
            host=name,
            template_dir=tdir,
            clones_dir=cdir,
            extra={"ROOTFS_WARM_ON_START": "0", "ROOTFS_CONCURRENCY": str(concurrency)},
        )
        proc = CeleryProcess(
            "worker", env, root / "worker.log", args=["--concurrency", str(concurrency), "-n", f"{name}@%h"]
        )
        proc.start()
        proc.wait_ready()
        client_env = {"CELERY_BROKER_URL": server.url, "CELERY_RESULT_BACKEND": server.url, "ROOTFS_HOST": "bench"}
        app = create_app(Settings.from_env(client_env))
        yield Host(RootfsClient(app), name, tdir, cdir, proc.logfile)
    finally:
        if app is not None:
            app.close()
        if proc is not None:
            proc.stop()
        server.stop()
