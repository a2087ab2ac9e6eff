"""What a worker does around its life: when it starts, sweep what crashed operations left, probe whether its
clones filesystem reflinks, announce its host (with the host's inventory) while it runs, warm its hashes."""

from __future__ import annotations

import logging
from typing import Any

from celery.signals import worker_ready, worker_shutdown

from worker.core import space
from worker.errors import RootfsError
from worker.service import runtime
from worker.service.hosts import Heartbeat
from worker.service.queues import host_queues, worker_queue_names

log = logging.getLogger(__name__)

_heartbeats: list[Heartbeat] = []


def start_up_sweep() -> None:
    """Before the first job: what crashed clones and releases left (worker.core.fixup; it logs each
    removal), and the reflink probe the heartbeat reports. A failure is logged, never fatal: the worker
    serving clones matters more than a tidy clones dir."""
    s = runtime.settings()
    try:
        runtime.registry().fixup()
    except (RootfsError, OSError) as exc:
        log.warning("start-up sweep of %s failed: %s", s.clones_dir, exc)
    try:
        space.probe_reflink(s.clones_dir)
    except OSError as exc:
        log.warning("reflink probe of %s failed: %s", s.clones_dir, exc)


@worker_ready.connect
def _on_worker_ready(sender: Any = None, **_: Any) -> None:
    s = runtime.settings()
    start_up_sweep()
    beat = Heartbeat(
        runtime.redis_client(),
        s.host,
        interval=s.heartbeat_interval,
        ttl=s.heartbeat_ttl,
        queues=worker_queue_names(s.host),
        inventory=runtime.registry().host_summary,
    )
    beat.start()
    _heartbeats.append(beat)
    log.info("host %s announced; consuming %s", s.host, ", ".join(worker_queue_names(s.host)))
    if s.warm_on_start and sender is not None:
        sender.app.send_task("rootfs.warm_hashes", queue=host_queues(s.host).bulk, expires=s.warm_interval)


@worker_shutdown.connect
def _on_worker_shutdown(**_: Any) -> None:
    while _heartbeats:
        _heartbeats.pop().stop()
