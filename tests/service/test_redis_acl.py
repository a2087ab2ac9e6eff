"""ACL users: docs/redis-acl.conf, loaded verbatim into a real redis-server, is enough for every role and no more."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from kombu.exceptions import OperationalError

from tests.helpers import wait_until
from tests.prodredis import ACL_FILE
from tests.service.conftest import MakeClient
from worker.celery import create_app
from worker.dev.processes import CeleryProcess, RedisServer, free_port, worker_env
from worker.service.preflight import EXIT_MISCONFIGURED
from worker.service.queues import host_queues
from worker.service.settings import Settings

pytestmark = pytest.mark.slow

#: The test's own superuser, appended to a copy of the documented file (which turns `default` off).
ADMIN = "user acl-test-admin on >acl-test-admin ~* &* +@all"
WORKER = "rootfs-worker:change-me-worker"
SCHEDULER = "rootfs-scheduler:change-me-scheduler"


class AclRedis:
    def __init__(self, workdir: Path) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        users = workdir / "users.acl"
        users.write_text(ACL_FILE.read_text() + "\n" + ADMIN + "\n")
        self.port = free_port()
        self.server = RedisServer(workdir, port=self.port, extra=["--aclfile", str(users)], ready=self._answers)

    def url(self, who: str) -> str:
        return f"redis://{who}@127.0.0.1:{self.port}/0"

    def admin(self) -> redis.Redis:
        return redis.Redis(port=self.port, username="acl-test-admin", password="acl-test-admin")

    def _answers(self) -> bool:
        try:
            return bool(self.admin().ping())
        except (redis.RedisError, OSError):
            return False

    def denials(self) -> list[dict[str, Any]]:
        """ACL LOG: every command, key or channel refused to a user since the last reset."""
        return [dict(e) for e in self.admin().acl_log()]


@pytest.fixture(scope="module")
def acl_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AclRedis]:
    server = AclRedis(tmp_path_factory.mktemp("acl"))
    server.server.start()
    yield server
    server.server.stop()


@pytest.fixture
def acl(acl_redis: AclRedis) -> AclRedis:
    admin = acl_redis.admin()
    admin.flushall()
    admin.acl_log_reset()
    return acl_redis


def _process(role: str, tmp_path: Path, host: str, url: str, **extra: str) -> CeleryProcess:
    tdir = tmp_path / host / "templates"
    (tdir / "base").mkdir(parents=True, exist_ok=True)
    (tdir / "base" / "rootfs.ext4").write_bytes(b"acl template " * 8192)
    env = worker_env(
        broker_url=url,
        host=host,
        template_dir=tdir,
        clones_dir=tmp_path / host / "clones",
        extra={"ROOTFS_WARM_ON_START": "1", "ROOTFS_HEARTBEAT_INTERVAL": "1", "ROOTFS_RESTORE_INTERVAL": "1", **extra},
    )
    args = ["--concurrency", "1", "-n", host] if role == "worker" else ["-s", str(tmp_path / "beat-schedule")]
    return CeleryProcess(role, env, tmp_path / host / f"{role}.log", args=args)


def _env(url: str) -> dict[str, str]:
    return {"CELERY_BROKER_URL": url, "CELERY_RESULT_BACKEND": url}


def test_the_documented_acls_are_enough_for_worker_beat_and_scheduler(
    acl: AclRedis, tmp_path: Path, make_client: MakeClient
) -> None:
    """Worker, beat and scheduler under the documented users: every job kind works and Redis refused nothing."""
    worker = _process("worker", tmp_path, "acl-a", acl.url(WORKER)).start()
    beat = _process("beat", tmp_path, "acl-a", acl.url(WORKER), ROOTFS_WARM_INTERVAL="1").start()
    try:
        worker.wait_ready()
        client = make_client(_env(acl.url(SCHEDULER)))
        wait_until(lambda: [h["host"] for h in client.hosts()] == ["acl-a"], what="the heartbeat", timeout=15)
        progress: list[dict[str, Any]] = []
        assert [s["name"] for s in client.stacks(host="acl-a").result(timeout=30)] == ["base"]
        clone = client.clone(host="acl-a", vm_id="vm-1", stack="base").result(timeout=30, on_progress=progress.append)
        assert Path(clone["path"]).read_bytes() == b"acl template " * 8192
        assert client.warm(host="acl-a").result(timeout=30)["host"] == "acl-a"
        assert client.ping(host="acl-a").result(timeout=30) == {"host": "acl-a"}
        assert client.release(host="acl-a", vm_id="vm-1").result(timeout=30)["released"] is True
        # The beat's fan-out reached the worker (a warm-up it did not ask for itself).
        wait_until(lambda: worker.log().count("rootfs.fanout_warm") >= 1, what="a fan-out from the beat", timeout=30)
        # The unacked sweep has run several times (every second here), and the worker answers remote control.
        admin_app = create_app(Settings.from_env({"CELERY_BROKER_URL": acl.url(WORKER), "ROOTFS_HOST": "x"}))
        try:
            assert admin_app.control.ping(timeout=2)
        finally:
            admin_app.close()
        assert acl.denials() == []
    finally:
        beat.stop()
        worker.stop()
    assert acl.denials() == []


def test_the_scheduler_cannot_take_jobs_from_a_hosts_queue(acl: AclRedis, make_client: MakeClient) -> None:
    """With the scheduler's user a job can be queued but not read, popped, moved or deleted: NOPERM each time."""
    client = make_client(_env(acl.url(SCHEDULER)))
    client.clone(host="acl-b", vm_id="vm-2", stack="base")
    queue = host_queues("acl-b").fast
    thief = redis.Redis.from_url(acl.url(SCHEDULER))
    for attempt in (
        lambda: thief.rpop(queue),
        lambda: thief.brpop([queue], timeout=1),
        lambda: thief.lmove(queue, "mine", "RIGHT", "LEFT"),
        lambda: thief.lrange(queue, 0, -1),
        lambda: thief.delete(queue),
    ):
        with pytest.raises(redis.exceptions.NoPermissionError):
            attempt()
    assert acl.admin().llen(queue) == 1
    # The worker's user can (the positive case beside the negative one).
    assert redis.Redis.from_url(acl.url(WORKER)).brpop([queue], timeout=1) is not None


def test_a_wrong_password_is_one_clear_error_at_start(
    acl: AclRedis, tmp_path: Path, make_client: MakeClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Worker and beat with a wrong password exit with status 78 and one line each; a client fails its first send."""
    wrong = acl.url("rootfs-worker:wrong")
    worker = _process("worker", tmp_path, "acl-c", wrong).start()
    beat = _process("beat", tmp_path, "acl-c", wrong).start()
    for proc in (worker, beat):
        assert proc.proc is not None
        assert proc.proc.wait(timeout=60) == EXIT_MISCONFIGURED
        log = proc.log()
        assert log.count("cannot start") == 1 and "refused our user or password" in log
        assert "change-me" not in log and "wrong@" not in log  # the URL is shown without its password
    # The scheduler's client does not retry a refused password as it would an outage: it says so, sends nothing.
    client = make_client(_env(wrong))
    sends: list[str] = []
    real_send = client._app.send_task

    def counting_send(name: str, *args: Any, **kwargs: Any) -> Any:
        sends.append(name)
        return real_send(name, *args, **kwargs)

    monkeypatch.setattr(client._app, "send_task", counting_send)
    with pytest.raises(OperationalError, match="refused our user or password"):
        client.clone(host="acl-c", vm_id="vm-3", stack="base")
    assert sends == []
    assert make_client(_env(acl.url(SCHEDULER))).ping(host="acl-c").id  # the right password sends
