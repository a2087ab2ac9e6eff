"""Whatever lands in a host's queue list, the worker survives it: tested the way a hostile client would.

The sending side is raw Redis (LPUSH of bytes, tests/service/raw_client.py): no kombu, no Celery, so nothing
on this side tidies a message before the worker sees it. After every run: the same worker pid, nothing left
in `unacked`, a FAILURE under the id of each refused item that has one, and a valid clone still succeeds.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator

import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kombu import Queue

from tests.helpers import wait_until
from tests.service.hostile_items import HOSTILE, ITEMS, QUEUE, usable_id, valid
from tests.service.raw_client import READY_STATES, RawClient
from tests.workers import Host, StartHost
from worker import InvalidMessage
from worker.client import JobHandle, RootfsClient

pytestmark = pytest.mark.slow


def _state(r: redis.Redis) -> tuple[int, int, int]:
    return int(r.hlen("unacked")), int(r.zcard("unacked_index")), int(r.llen(QUEUE))


def _drops(host: Host) -> int:
    return host.worker.log().count("dropped a message from")


def _clone_succeeds(client: RawClient, vm_id: str) -> None:
    meta = client.call("a", "rootfs.clone_for_vm", {"vm_id": vm_id, "stack": "base"})
    assert meta["status"] == "SUCCESS", meta
    assert meta["result"]["vm_id"] == vm_id


@pytest.fixture
def host_a(start_host: StartHost) -> Host:
    a = start_host("a", env={"ROOTFS_TASK_TIME_LIMIT": "60"})
    a.template("base", b"base-template")
    return a


@pytest.fixture
def raw(redis_url: str) -> Iterator[RawClient]:
    client = RawClient(redis_url)
    yield client
    client.close()


def test_named_hostile_items_are_each_refused_once_and_the_worker_goes_on(host_a: Host, raw: RawClient) -> None:
    """Each named hostile item is dropped with one log line and a FAILURE under its id; same pid, clone works."""
    pid = host_a.worker.pid
    sent: list[tuple[str, str | None]] = []
    for name, make in HOSTILE:
        item, task_id = make()
        raw.push(QUEUE, item)
        sent.append((name, task_id))
    _clone_succeeds(raw, "vm-after")  # FIFO: every hostile item was read before this clone
    assert host_a.worker.proc is not None and host_a.worker.proc.poll() is None
    assert host_a.worker.pid == pid
    wait_until(lambda: _state(raw.redis) == (0, 0, 0), what="unacked and queue empty", timeout=10)
    assert _drops(host_a) == len(HOSTILE), "each hostile item is logged exactly once"
    for name, task_id in sent:
        if task_id is None:
            continue
        meta = raw.meta(task_id)
        assert meta is not None, f"{name}: no FAILURE stored under {task_id}"
        assert meta["status"] == "FAILURE", (name, meta)
        assert meta["result"]["exc_type"] == "InvalidMessage", (name, meta)
        assert meta["result"]["exc_message"][0] == task_id
    assert "Unrecoverable error" not in host_a.worker.log()


def test_valid_jobs_among_hostile_items_run_with_their_own_outcome(host_a: Host, raw: RawClient) -> None:
    """Well-formed jobs still run: success, a task error, an unknown rootfs task, an expired job."""
    ok = raw.send("a", "rootfs.clone_for_vm", {"vm_id": "vm-ok", "stack": "base"})
    raw.push(QUEUE, b"garbage in between")
    bad_arg = raw.send("a", "rootfs.clone_for_vm", {"vm_id": 123, "stack": "base"})
    unknown = raw.send("a", "rootfs.no_such_task", {})
    expired = raw.send("a", "rootfs.clone_for_vm", {"vm_id": "vm-late", "stack": "base"}, expires_in=-60)
    limited = raw.send("a", "rootfs.ping", {}, headers={"timelimit": [30, 20]})
    assert raw.wait(ok)["result"]["vm_id"] == "vm-ok"
    assert raw.wait(bad_arg)["result"]["exc_type"] == "InvalidVmId"
    assert raw.wait(unknown)["result"]["exc_type"] == "NotRegistered"
    assert raw.wait(expired)["status"] == "REVOKED"
    assert raw.wait(limited)["result"] == {"host": "a"}
    assert not (host_a.clones_dir / "vm-late").exists()
    assert _drops(host_a) == 1


def test_item_left_in_unacked_by_a_dead_worker_does_not_kill_the_next(start_host: StartHost, raw: RawClient) -> None:
    """A message already in `unacked` when the worker starts (and a garbage entry) are dropped, not run."""
    poison = valid(headers={"timelimit": 5})
    tag = poison["properties"]["delivery_tag"]
    raw.redis.hset("unacked", tag, json.dumps([poison, "", QUEUE]))
    raw.redis.hset("unacked", "garbage-tag", b"\x00not json")
    old = time.time() - 100_000
    raw.redis.zadd("unacked_index", {tag: old, "garbage-tag": old})
    a = start_host("a", env={"ROOTFS_RESTORE_INTERVAL": "1"})
    a.template("base", b"base-template")
    pid = a.worker.pid
    poison_id = poison["headers"]["id"]
    meta = raw.wait(poison_id, timeout=30)
    assert meta["result"]["exc_type"] == "InvalidMessage" and "timelimit" in meta["result"]["exc_message"][1]
    wait_until(lambda: _state(raw.redis) == (0, 0, 0), what="unacked emptied", timeout=15)
    _clone_succeeds(raw, "vm-1")
    assert a.worker.pid == pid and a.worker.proc is not None and a.worker.proc.poll() is None
    assert "not [envelope, exchange, routing_key]" in a.worker.log()


def test_generated_items_never_stop_the_worker(host_a: Host, raw: RawClient) -> None:
    """Hypothesis-generated items (bytes, JSON, mutated envelopes): same pid, unacked empty, a result per id."""
    pid = host_a.worker.pid

    @settings(
        max_examples=60,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )
    @given(items=st.lists(ITEMS, min_size=1, max_size=8))
    def run(items: list[bytes]) -> None:
        ids = [task_id for task_id in map(usable_id, items) if task_id is not None]
        for item in items:
            raw.push(QUEUE, item)
        assert raw.call("a", "rootfs.ping", {}, timeout=30)["result"] == {"host": "a"}
        assert host_a.worker.proc is not None and host_a.worker.proc.poll() is None, host_a.worker.log()[-3000:]
        assert host_a.worker.pid == pid
        wait_until(lambda: _state(raw.redis) == (0, 0, 0), what="unacked and queue empty", timeout=30)
        for task_id in ids:
            wait_until(
                lambda task_id=task_id: (raw.meta(task_id) or {}).get("status") in READY_STATES,  # type: ignore[misc]
                what=f"a result under {task_id!r}",
                timeout=30,
            )

    run()
    _clone_succeeds(raw, f"vm-{uuid.uuid4().hex[:6]}")
    assert "Unrecoverable error" not in host_a.worker.log()


def test_python_client_gets_invalid_message_for_limits_the_worker_cannot_honour(
    host_a: Host, client: RootfsClient
) -> None:
    """Through RootfsClient, a job asking for more time than the worker allows fails at once as InvalidMessage."""
    app = client._app
    sent = app.send_task("rootfs.ping", kwargs={"host": "a"}, queue=Queue(QUEUE), time_limit=3600)
    with pytest.raises(InvalidMessage, match="exceeds the worker's time limit 60s") as info:
        JobHandle(sent, "rootfs.ping", "a").result(timeout=30)
    assert info.value.task_id == sent.id and not info.value.transient
    assert client.ping(host="a").result(timeout=30) == {"host": "a"}


def test_garbage_on_the_control_broadcast_does_not_stop_the_worker(host_a: Host, raw: RawClient) -> None:
    """PUBLISHed garbage on the pidbox channel (remote control) is dropped; the worker still clones."""
    pid = host_a.worker.pid
    channel = "/0.celery.pidbox"  # kombu's fanout topic for Celery's control exchange, database 0

    def garbage_dropped() -> bool:
        # Pub/Sub keeps nothing for a subscriber that is not listening yet: publish until the worker reports.
        for item in (b"[1, 2]", b'{"no": "properties"}', b"null", b"not json"):
            raw.redis.publish(channel, item)
        log = host_a.worker.log()
        return all(f"pidbox (task id None): {why}" in log for why in ("envelope is a JSON array", "properties is null"))

    wait_until(garbage_dropped, what="the broadcast garbage dropped", timeout=30, poll=0.5)
    _clone_succeeds(raw, "vm-after-broadcast")
    assert host_a.worker.pid == pid and host_a.worker.proc is not None and host_a.worker.proc.poll() is None
