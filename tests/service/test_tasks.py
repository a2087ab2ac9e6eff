"""The Celery layer with a real Redis and real worker processes (never task_always_eager)."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import redis
from kombu import Connection, Exchange, Producer, Queue

from tests.helpers import MIB, wait_until, write_sparse_template
from tests.workers import StartHost
from worker import (
    FilesystemError,
    InvalidArgument,
    InvalidVmId,
    RemoteError,
    StackNotFound,
)
from worker.client import JobHandle, RootfsClient
from worker.dev.processes import CeleryProcess, worker_env
from worker.service.queues import FANOUT_QUEUE, host_queues, worker_queue_names

pytestmark = pytest.mark.slow


def _consumed_queues(log: str) -> set[str]:
    """The queues a worker's start-up banner says it consumes (`.> NAME exchange=...`)."""
    return {line.split()[1] for line in log.splitlines() if line.strip().startswith(".> ")}


def test_worker_consumes_exactly_its_hosts_queues(start_host: StartHost) -> None:
    """With ROOTFS_HOST=a and no -Q, the worker consumes a's fast and bulk queues and the fan-out queue."""
    a = start_host("a")
    assert _consumed_queues(a.worker.log()) == set(worker_queue_names("a"))
    assert set(worker_queue_names("a")) == {"rootfs.host.a", "rootfs.host.a.bulk", FANOUT_QUEUE}


def test_clone_runs_on_the_host_it_was_sent_to(start_host: StartHost, client: RootfsClient) -> None:
    """A clone for host a lands in a's clones dir, never b's, and vice versa."""
    a, b = start_host("a"), start_host("b")
    a.template("base", b"A-BYTES")
    b.template("base", b"B-BYTES")
    ra = client.clone(host="a", vm_id="vm-1", stack="base").result(timeout=30)
    rb = client.clone(host="b", vm_id="vm-2", stack="base").result(timeout=30)
    assert (ra["host"], rb["host"]) == ("a", "b")
    assert Path(ra["path"]) == a.clones_dir / "vm-1" / "rootfs.ext4"
    assert Path(ra["path"]).read_bytes() == b"A-BYTES"
    assert Path(rb["path"]).read_bytes() == b"B-BYTES"
    assert not (b.clones_dir / "vm-1").exists() and not (a.clones_dir / "vm-2").exists()
    a.template("only-a", b"x")
    with pytest.raises(StackNotFound):
        client.clone(host="b", vm_id="vm-3", stack="only-a").result(timeout=30)


def test_job_misrouted_to_another_host_is_refused(start_host: StartHost, client: RootfsClient) -> None:
    """A clone meant for host b that reaches host a's queue fails instead of cloning on the wrong host."""
    a = start_host("a")
    a.template("base", b"x")
    handle = client._app.send_task(
        "rootfs.clone_for_vm",
        kwargs={"vm_id": "vm-1", "stack": "base", "host": "b"},
        queue=Queue(host_queues("a").fast),
    )
    with pytest.raises(InvalidArgument, match="serves host 'a'"):
        handle.get(timeout=30)
    assert not (a.clones_dir / "vm-1").exists()


def test_results_are_json_in_the_documented_shapes(start_host: StartHost, client: RootfsClient) -> None:
    """scan, clone, release and warm return the documented JSON objects."""
    a = start_host("a")
    a.template("base", b"abc")
    abc = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    assert client.stacks(host="a").result(timeout=30) == [{"name": "base", "size_bytes": 3, "sha256": abc}]
    clone = client.clone(host="a", vm_id="vm/1", stack="base").result(timeout=30)
    assert {k: clone[k] for k in ("vm_id", "stack", "path", "source_sha256", "host")} == {
        "vm_id": "vm_1",
        "stack": "base",
        "path": str(a.clones_dir / "vm_1" / "rootfs.ext4"),
        "source_sha256": abc,
        "host": "a",
    }
    assert client.release(host="a", vm_id="vm/1").result(timeout=30) == {"vm_id": "vm_1", "released": True, "host": "a"}
    warm = client.warm(host="a").result(timeout=30)
    assert warm["already_warm"] == ["base"] and warm["hashed"] == [] and warm["bytes_hashed"] == 0
    assert isinstance(warm["seconds"], float)


def test_permanent_error_fails_at_once_with_its_type(start_host: StartHost, client: RootfsClient) -> None:
    """An unknown stack fails on the first attempt; its type, message and data come back to the client."""
    a = start_host("a", env={"ROOTFS_RETRY_BASE": "0.1"})
    handle = client.clone(host="a", vm_id="vm-1", stack="ghost")
    with pytest.raises(StackNotFound) as info:
        handle.result(timeout=30)
    assert info.value.stack == "ghost" and info.value.template_dir == str(a.template_dir)
    assert "not found under" in str(info.value)
    assert handle.result_handle.state == "FAILURE"
    assert "Retry in" not in a.worker.log()


def test_transient_error_is_retried_until_success(start_host: StartHost, client: RootfsClient, tmp_path: Path) -> None:
    """Two EIO failures of the copy are retried with backoff and the job ends in SUCCESS."""
    fault_dir = tmp_path / "faults"
    fault_dir.mkdir()
    a = start_host(
        "a",
        app="tests.faulty_worker",
        env={"FAULT_DIR": str(fault_dir), "FAULT_EIO_COUNT": "2", "ROOTFS_RETRY_BASE": "0.2", "ROOTFS_RETRY_CAP": "1"},
    )
    a.template("base", b"eventually")
    handle = client.clone(host="a", vm_id="vm-1", stack="base")
    result = handle.result(timeout=60)
    assert Path(result["path"]).read_bytes() == b"eventually"
    assert (fault_dir / "eio-failures").read_text() == "xx"
    assert a.worker.log().count("Retry in") == 2


def test_transient_error_that_persists_is_reported_with_its_cause(
    start_host: StartHost, client: RootfsClient, tmp_path: Path
) -> None:
    """A transient error that outlasts the retries ends in FAILURE naming EIO, after exactly retry-max retries."""
    fault_dir = tmp_path / "faults"
    fault_dir.mkdir()
    a = start_host(
        "a",
        app="tests.faulty_worker",
        env={
            "FAULT_DIR": str(fault_dir),
            "FAULT_EIO_COUNT": "99",
            "ROOTFS_RETRY_MAX": "2",
            "ROOTFS_RETRY_BASE": "0.1",
            "ROOTFS_RETRY_CAP": "0.5",
        },
    )
    a.template("base", b"never")
    with pytest.raises(FilesystemError) as info:
        client.clone(host="a", vm_id="vm-1", stack="base").result(timeout=60)
    assert info.value.transient and "EIO" in str(info.value)
    assert (fault_dir / "eio-failures").read_text() == "xxx"  # the first try and two retries
    assert not (a.clones_dir / "vm-1").exists()


def test_pickle_message_is_refused_and_never_unpickled(
    start_host: StartHost, client: RootfsClient, tmp_path: Path
) -> None:
    """A pickle-serialised job is rejected unread: its payload never runs, and the worker goes on."""
    a = start_host("a")
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self) -> tuple[Any, tuple[str]]:
            return (os.system, (f"touch {marker}",))

    with Connection(client._app.conf.broker_url) as conn:
        producer = Producer(conn, exchange=Exchange(""))
        body = pickle.dumps(((Exploit(),), {}, {"callbacks": None, "errbacks": None, "chain": None, "chord": None}))
        producer.publish(
            body,
            routing_key=host_queues("a").fast,
            content_type="application/x-python-serialize",
            content_encoding="binary",
            headers={"task": "rootfs.release_vm", "id": "pickled-job", "lang": "py", "argsrepr": "", "kwargsrepr": ""},
        )
    wait_until(lambda: "pickle" in a.worker.log().lower() or "content" in a.worker.log().lower(), what="refusal")
    assert client.ping(host="a").result(timeout=30) == {"host": "a"}
    assert not marker.exists()


def test_malformed_messages_fail_cleanly_and_the_worker_goes_on(start_host: StartHost, client: RootfsClient) -> None:
    """Wrong argument types, missing arguments and a garbage body each fail alone; the next job succeeds."""
    a = start_host("a")
    a.template("base", b"x")
    app = client._app
    fast = Queue(host_queues("a").fast)
    with pytest.raises(InvalidVmId, match="must be a string"):
        client.clone(host="a", vm_id=123, stack="base").result(timeout=30)  # type: ignore[arg-type]
    with pytest.raises(RemoteError, match="TypeError"):
        JobHandle(app.send_task("rootfs.release_vm", kwargs={"host": "a"}, queue=fast), "release", "a").result(
            timeout=30
        )
    with Connection(app.conf.broker_url) as conn:
        producer = Producer(conn, exchange=Exchange(""))
        for body, headers in [
            ('{"not": "json"', {"task": "rootfs.clone_for_vm", "id": "not-json"}),
            ({"not": "a task body"}, {"task": "rootfs.clone_for_vm", "id": "dict-body"}),
            ([1, 2], {"task": "rootfs.clone_for_vm", "id": "short-body"}),
            ([[], {}, {}], {"task": "rootfs.clone_for_vm"}),  # no id
            ([[], {}, {}], {"task": "rootfs.no_such_task", "id": "unknown-task"}),
        ]:
            if isinstance(body, str):
                producer.publish(
                    body,
                    routing_key=fast.name,
                    content_type="application/json",
                    content_encoding="utf-8",
                    headers={**headers, "lang": "py"},
                )
            else:
                producer.publish(body, routing_key=fast.name, serializer="json", headers={**headers, "lang": "py"})
    wait_until(lambda: "unknown-task" in a.worker.log() or "no_such_task" in a.worker.log(), what="unknown task logged")
    assert client.clone(host="a", vm_id="vm-1", stack="base").result(timeout=30)["vm_id"] == "vm-1"
    assert a.worker.proc is not None and a.worker.proc.poll() is None


def test_clone_does_not_wait_behind_a_warm_up(start_host: StartHost, client: RootfsClient) -> None:
    """While a warm-up hashes a large template, a clone on the same host completes first."""
    a = start_host("a", concurrency=2)
    a.template("small", b"small-stack")
    client.warm(host="a").result(timeout=30)
    write_sparse_template(a.template_dir, "huge", size=6144 * MIB, data_mib=8)
    warm = client.warm(host="a")
    wait_until(lambda: warm.result_handle.state == "PROGRESS", what="warm-up progress")
    clone = client.clone(host="a", vm_id="vm-1", stack="small").result(timeout=60)
    assert clone["hashed_bytes"] == 0
    assert warm.result_handle.state == "PROGRESS", "the clone waited for the warm-up to end"
    assert warm.result(timeout=120)["hashed"] == ["huge"]


def test_second_warm_up_on_a_host_returns_at_once(start_host: StartHost, client: RootfsClient) -> None:
    """A warm-up sent while one runs reports busy instead of occupying a second worker process."""
    a = start_host("a", concurrency=2)
    write_sparse_template(a.template_dir, "huge", size=6144 * MIB, data_mib=8)
    first = client.warm(host="a")
    wait_until(lambda: first.result_handle.state == "PROGRESS", what="warm-up progress")
    assert client.warm(host="a").result(timeout=60)["busy"] is True
    assert first.result(timeout=120)["hashed"] == ["huge"]


def test_progress_reaches_the_client_while_a_cold_clone_hashes(start_host: StartHost, client: RootfsClient) -> None:
    """A cold clone reports PROGRESS (bytes done of total) to a waiting client before its result."""
    a = start_host("a")
    write_sparse_template(a.template_dir, "big", size=3072 * MIB, data_mib=8)
    seen: list[dict[str, Any]] = []
    result = client.clone(host="a", vm_id="vm-1", stack="big").result(timeout=120, on_progress=seen.append)
    assert seen and all(p["stack"] == "big" and p["total"] == 3072 * MIB for p in seen)
    assert [p["done"] for p in seen] == sorted(p["done"] for p in seen)
    assert result["hashed_bytes"] == 3072 * MIB


def test_beat_warms_every_live_host_and_clones_then_hash_nothing(
    start_host: StartHost, client: RootfsClient, redis_url: str, tmp_path: Path
) -> None:
    """The beat's fan-out reaches both live hosts; a clone afterwards hashes nothing on either host."""
    a, b = start_host("a"), start_host("b")
    for host in (a, b):
        host.template("base", host.name.encode() * 1000)
    assert [h["host"] for h in client.hosts()] == ["a", "b"]
    env = worker_env(
        broker_url=redis_url,
        host="beat",
        template_dir=tmp_path / "none",
        clones_dir=tmp_path / "none-clones",
        extra={"ROOTFS_WARM_INTERVAL": "1"},
    )
    beat = CeleryProcess("beat", env, tmp_path / "beat.log", args=["--schedule", str(tmp_path / "beat-schedule")])
    beat.start()
    try:
        for host in (a, b):
            log = host.worker.log
            wait_until(
                lambda log=log: "rootfs.warm_hashes" in log() and "succeeded" in log(),  # type: ignore[misc]
                what=f"warm-up on {host.name}",
            )
    finally:
        beat.stop()
    for host in (a, b):
        result = client.clone(host=host.name, vm_id="vm-1", stack="base").result(timeout=30)
        assert result["hashed_bytes"] == 0, f"{host.name} hashed again"


def test_worker_warms_its_own_host_when_it_starts(start_host: StartHost, client: RootfsClient, tmp_path: Path) -> None:
    """A worker started with templates present hashes them by itself; the first clone hashes nothing."""
    tdir = tmp_path / "pre" / "templates"
    (tdir / "base").mkdir(parents=True)
    (tdir / "base" / "rootfs.ext4").write_bytes(b"prewarmed" * 1000)
    a = start_host("a", env={"ROOTFS_WARM_ON_START": "1"}, template_dir=tdir)
    wait_until(lambda: "rootfs.warm_hashes" in a.worker.log() and "succeeded" in a.worker.log(), what="warm-up")
    assert client.clone(host="a", vm_id="vm-1", stack="base").result(timeout=30)["hashed_bytes"] == 0


def test_hosts_lists_live_hosts_and_forgets_stopped_ones(start_host: StartHost, client: RootfsClient) -> None:
    """A stopped worker's host drops out of the live list once its heartbeat expires."""
    a, b = start_host("a"), start_host("b")
    assert [h["host"] for h in client.hosts()] == ["a", "b"]
    b.worker.stop()
    wait_until(lambda: [h["host"] for h in client.hosts()] == ["a"], what="b to drop out")
    a.worker.kill_hard()  # no goodbye: the TTL alone must end it
    wait_until(lambda: client.hosts() == [], timeout=30, what="a to expire")


def _cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    exe = Path(sys.executable).with_name("rootfs-worker")
    return subprocess.run([str(exe), *args], env=env, capture_output=True, text=True, timeout=120)


def test_cli_json_round_trips(start_host: StartHost, client: RootfsClient) -> None:
    """`rootfs-worker ... --json` prints exactly what the client API returns, and errors as JSON with exit 1."""
    a = start_host("a")
    a.template("base", b"cli-bytes")
    env = {**a.env, "ROOTFS_HOST": "a"}
    hosts = _cli(env, "hosts", "--json")
    assert hosts.returncode == 0 and [h["host"] for h in json.loads(hosts.stdout)] == ["a"]
    stacks = _cli(env, "stacks", "--json")
    assert stacks.returncode == 0, stacks.stderr
    assert json.loads(stacks.stdout) == client.stacks(host="a").result(timeout=30)
    cloned = _cli(env, "clone", "vm-1", "base", "--host", "a", "--json")
    assert cloned.returncode == 0, cloned.stderr
    again = client.clone(host="a", vm_id="vm-1", stack="base").result(timeout=30)
    assert (json.loads(cloned.stdout)["method"], again["method"]) == ("copy", "existing")
    assert json.loads(cloned.stdout) | {"seconds": 0, "method": ""} == again | {"seconds": 0, "method": ""}
    released = _cli(env, "release", "vm-1", "--json")
    assert json.loads(released.stdout) == {"vm_id": "vm-1", "released": True, "host": "a"}
    warm = _cli(env, "warm", "--json")
    assert json.loads(warm.stdout)["already_warm"] == ["base"]
    failed = _cli(env, "clone", "vm-2", "ghost", "--json")
    assert failed.returncode == 1
    assert json.loads(failed.stdout)["error"]["type"] == "StackNotFound"
    human = _cli(env, "clone", "vm-2", "ghost")
    assert human.returncode == 1 and "StackNotFound: stack 'ghost' not found" in human.stderr
    table = _cli(env, "stacks")
    assert table.returncode == 0 and table.stdout.splitlines()[0].split() == ["STACK", "SIZE", "SHA256"]


def test_cli_reports_an_unreachable_broker(tmp_path: Path) -> None:
    """With Redis unreachable the CLI exits non-zero with a readable error instead of hanging."""
    from worker.dev.processes import free_port

    url = f"redis://127.0.0.1:{free_port()}/0"
    env = worker_env(broker_url=url, host="a", template_dir=tmp_path, clones_dir=tmp_path / "c")
    out = _cli(env, "hosts", "--json")
    assert out.returncode != 0
    assert "error" in json.loads(out.stdout)


def test_results_live_in_redis(start_host: StartHost, client: RootfsClient, redis_url: str) -> None:
    """The result of a job is stored in the Redis result backend as JSON, readable by any client."""
    a = start_host("a")
    a.template("base", b"x")
    handle = client.clone(host="a", vm_id="vm-1", stack="base")
    handle.result(timeout=30)
    raw = redis.Redis.from_url(redis_url).get(f"celery-task-meta-{handle.id}")
    assert raw is not None
    meta = json.loads(raw)
    assert meta["status"] == "SUCCESS" and meta["result"]["vm_id"] == "vm-1"
