"""Heartbeats and the host list, on fakeredis: the logic needs Redis' data model, not a real server."""

from __future__ import annotations

import json
from collections.abc import Iterator

import fakeredis
import pytest
import redis

from tests.helpers import wait_until
from worker.service.hosts import KEY_PREFIX, Heartbeat, announce, live_hosts, withdraw


@pytest.fixture
def r() -> Iterator[redis.Redis]:
    client = fakeredis.FakeRedis()
    yield client
    client.close()


def test_an_announced_host_is_listed_with_its_queues_until_withdrawn(r: redis.Redis) -> None:
    """announce makes a host live (with its queues and pid); withdraw takes it off the list."""
    assert live_hosts(r) == []
    announce(r, "hv-1", ttl=30, queues=["rootfs.host.hv-1", "rootfs.host.hv-1.bulk"])
    [info] = live_hosts(r)
    assert info["host"] == "hv-1" and info["queues"] == ["rootfs.host.hv-1", "rootfs.host.hv-1.bulk"]
    assert isinstance(info["pid"], int) and isinstance(info["seen"], float)
    withdraw(r, "hv-1")
    assert live_hosts(r) == []


def test_an_announcement_expires_after_its_ttl(r: redis.Redis) -> None:
    """The key carries the TTL, so a host whose worker died drops out by itself."""
    announce(r, "hv-1", ttl=7, queues=[])
    assert 0 < r.ttl(KEY_PREFIX + "hv-1") <= 7


def test_hosts_are_sorted_and_junk_under_the_prefix_is_skipped(r: redis.Redis) -> None:
    """Hosts come sorted by name; values that are not a host record (bad JSON, a list, no name) are ignored."""
    for host in ("hv-b", "hv-a", "hv-c"):
        announce(r, host, ttl=30, queues=[])
    r.set(KEY_PREFIX + "junk1", b"\xff not json")
    r.set(KEY_PREFIX + "junk2", json.dumps([1, 2]))
    r.set(KEY_PREFIX + "junk3", json.dumps({"host": 5}))
    assert [h["host"] for h in live_hosts(r)] == ["hv-a", "hv-b", "hv-c"]


def test_a_heartbeat_keeps_announcing_and_withdraws_when_stopped(r: redis.Redis) -> None:
    """A running Heartbeat re-announces every interval (the record's `seen` moves) and withdraws on stop."""
    beat = Heartbeat(r, "hv-1", interval=0.05, ttl=5, queues=["q"])
    beat.start()
    try:
        first = live_hosts(r)[0]["seen"]
        wait_until(lambda: live_hosts(r) and live_hosts(r)[0]["seen"] > first, timeout=10, what="a second beat")
    finally:
        beat.stop()
    assert live_hosts(r) == []


def test_a_heartbeat_survives_redis_errors() -> None:
    """A beat that cannot reach Redis logs and carries on; it announces again once Redis answers."""
    server = fakeredis.FakeServer()
    r = fakeredis.FakeRedis(server=server)
    server.connected = False
    beat = Heartbeat(r, "hv-1", interval=0.05, ttl=5, queues=[])
    beat.start()  # the first beat fails: no exception
    try:
        server.connected = True
        wait_until(lambda: [h["host"] for h in live_hosts(r)] == ["hv-1"], timeout=10, what="the host to reappear")
    finally:
        beat.stop()


def test_a_heartbeat_carries_the_hosts_inventory_and_survives_its_failure(r: redis.Redis) -> None:
    """Each beat adds the inventory (free space, reflink, clones, stacks); a failing inventory still announces."""
    summary = {"free_bytes": 10, "total_bytes": 20, "reflink": True, "clones": 3, "stacks": {"base": None}}
    Heartbeat(r, "hv-1", interval=60, ttl=5, queues=["q"], inventory=lambda: summary)._beat()
    [info] = live_hosts(r)
    assert {k: info[k] for k in summary} == summary and info["host"] == "hv-1"

    def broken() -> dict[str, object]:
        raise OSError("clones dir unreadable")

    Heartbeat(r, "hv-2", interval=60, ttl=5, queues=["q"], inventory=broken)._beat()
    assert "clones" not in live_hosts(r)[1] and live_hosts(r)[1]["host"] == "hv-2"
