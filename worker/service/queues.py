"""Queue names: the one place that says which queues a host's worker consumes and a client sends to."""

from __future__ import annotations

import re
from typing import NamedTuple

from worker.errors import InvalidArgument

_HOST_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")

#: Shared by every worker: the beat's fan-out lands here and any one live worker runs it.
FANOUT_QUEUE = "rootfs.fanout"


class HostQueues(NamedTuple):
    """`fast` carries clone/release/scan (latency-critical); `bulk` carries warm-ups, which may hash for
    minutes, so a clone is never queued behind one."""

    fast: str
    bulk: str


def check_host(host: object) -> str:
    """A host name that can name queues and Redis keys, or InvalidArgument."""
    if not isinstance(host, str) or not _HOST_RE.fullmatch(host):
        raise InvalidArgument("host", repr(host)[:80], "use letters, digits, '.', '_' or '-' (at most 63)")
    return host


def host_queues(host: str) -> HostQueues:
    check_host(host)
    return HostQueues(fast=f"rootfs.host.{host}", bulk=f"rootfs.host.{host}.bulk")


def worker_queue_names(host: str) -> list[str]:
    """Exactly what `celery -A worker worker` consumes with ROOTFS_HOST=host."""
    fast, bulk = host_queues(host)
    return [fast, bulk, FANOUT_QUEUE]
