"""Which hosts are live: each worker announces its host in Redis under a key that expires.

Pub/Sub broadcasts are lost for a host that is not listening (and kombu's Broadcast over Redis is not
delivered at all with Celery 5.7's defaults), so the beat's fan-out reads this list and sends one ordinary,
durable message to each host's own queue instead.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import redis

log = logging.getLogger(__name__)

KEY_PREFIX = "rootfs:host:"


#: What a heartbeat adds about the host (RootfsRegistry.host_summary: free/total bytes, reflink, clones,
#: stacks); must be cheap and never hash: it runs every heartbeat interval.
Inventory = Callable[[], dict[str, Any]]


def announce(
    client: redis.Redis, host: str, *, ttl: int, queues: list[str], extra: dict[str, Any] | None = None
) -> None:
    info = {
        **(extra or {}),
        "host": host,
        "queues": queues,
        "node": socket.gethostname(),
        "pid": os.getpid(),
        "seen": time.time(),
    }
    client.set(KEY_PREFIX + host, json.dumps(info), ex=ttl)


def withdraw(client: redis.Redis, host: str) -> None:
    client.delete(KEY_PREFIX + host)


def live_hosts(client: redis.Redis) -> list[dict[str, Any]]:
    """Every host announced within its TTL, sorted by name."""
    found = []
    for key in client.scan_iter(match=KEY_PREFIX + "*", count=500):
        raw = client.get(key)
        if raw is None:
            continue
        try:
            info = json.loads(raw)
        except ValueError:
            continue
        if isinstance(info, dict) and isinstance(info.get("host"), str):
            found.append(info)
    return sorted(found, key=lambda i: str(i["host"]))


class Heartbeat:
    """Announces a host every `interval` seconds from a daemon thread until stopped."""

    def __init__(
        self,
        client: redis.Redis,
        host: str,
        *,
        interval: float,
        ttl: int,
        queues: list[str],
        inventory: Inventory | None = None,
    ) -> None:
        self._client = client
        self._inventory = inventory
        self._host = host
        self._interval = interval
        self._ttl = ttl
        self._queues = queues
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"rootfs-heartbeat-{host}", daemon=True)

    def start(self) -> None:
        self._beat()
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=self._interval + 1)
        try:
            withdraw(self._client, self._host)
        except redis.RedisError as exc:
            log.warning("could not withdraw host %s: %s", self._host, exc)

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self._beat()

    def _beat(self) -> None:
        extra: dict[str, Any] | None = None
        if self._inventory is not None:
            try:
                extra = self._inventory()
            except Exception as exc:  # noqa: BLE001 - a host that cannot count its clones is still live
                log.warning("host inventory for %s failed: %s", self._host, exc)
        try:
            announce(self._client, self._host, ttl=self._ttl, queues=self._queues, extra=extra)
        except redis.RedisError as exc:  # Redis away for a moment: the next beat tries again.
            log.warning("heartbeat for host %s failed: %s", self._host, exc)
