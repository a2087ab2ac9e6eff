"""What a worker does around its life: announce its host while it runs, warm its hashes when it starts."""

from __future__ import annotations

import logging
from typing import Any

from celery.signals import worker_ready, worker_shutdown

from worker.service import runtime
from worker.service.hosts import Heartbeat
from worker.service.queues import host_queues, worker_queue_names

log = logging.getLogger(__name__)

_heartbeats: list[Heartbeat] = []


@worker_ready.connect
def _on_worker_ready(sender: Any = None, **_: Any) -> None:
    s = runtime.settings()
    beat = Heartbeat(
        runtime.redis_client(),
        s.host,
        interval=s.heartbeat_interval,
        ttl=s.heartbeat_ttl,
        queues=worker_queue_names(s.host),
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
