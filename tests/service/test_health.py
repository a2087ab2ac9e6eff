"""`rootfs-worker health --live|--ready`: verdicts from the heartbeat file, and against a real worker whose
Redis goes away and comes back."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path

import pytest

from tests.helpers import wait_until
from tests.workers import StartHost
from worker.dev.processes import CeleryProcess, RedisServer, worker_env
from worker.service.health import HealthState, HealthWriter, check_live, check_ready, health_file
from worker.service.settings import Settings

EXPECTED = ["rootfs.fanout", "rootfs.host.a", "rootfs.host.a.bulk"]


def _write(path: Path, **fields: object) -> None:
    now = time.time()
    state = HealthState("worker", "a", os.getpid(), "elsewhere", written=now, since=now, expected=EXPECTED)
    data = {**asdict(state), **fields}
    path.write_text(json.dumps(data))


def probe(env: Mapping[str, str], *args: str) -> tuple[int, str]:
    """Run the real console command in a fresh process, as a supervisor would."""
    exe = Path(sys.executable).parent / "rootfs-worker"
    done = subprocess.run([str(exe), "health", *args], env=dict(env), capture_output=True, text=True, timeout=30)
    return done.returncode, done.stdout.strip()


def test_fresh_ready_file_is_live_and_ready(tmp_path: Path) -> None:
    """Fresh heartbeat, consuming every expected queue, loop ticking: live and ready."""
    path = tmp_path / "worker.health.json"
    _write(path, ready=True, loop=time.time(), queues=EXPECTED, reason="")
    assert check_live(path, max_age=5).ok
    assert check_ready(path, max_age=5).ok


def test_disconnected_worker_is_live_but_not_ready(tmp_path: Path) -> None:
    """Not connected (Redis down): still live, since a restart would not help; not ready."""
    path = tmp_path / "worker.health.json"
    _write(path, ready=False, reason="connection to the broker lost; reconnecting", since=time.time() - 100)
    assert check_live(path, max_age=5).ok
    verdict = check_ready(path, max_age=5)
    assert not verdict.ok and "connection to the broker lost" in verdict.reason


def test_stale_file_or_stalled_loop_is_not_live(tmp_path: Path) -> None:
    """An old heartbeat, or a loop that stopped ticking while connected, is a hung worker."""
    path = tmp_path / "worker.health.json"
    _write(path, written=time.time() - 60)
    assert "old" in check_live(path, max_age=5).reason and not check_live(path, max_age=5).ok
    _write(path, ready=True, loop=time.time() - 60, queues=EXPECTED)
    assert "event loop stalled" in check_live(path, max_age=5).reason
    assert not check_ready(path, max_age=5).ok


def test_missing_queue_or_missing_file_is_not_ready(tmp_path: Path) -> None:
    """Connected but not consuming the bulk queue: not ready; no file at all: neither."""
    path = tmp_path / "worker.health.json"
    _write(path, ready=True, loop=time.time(), queues=EXPECTED[:2])
    assert check_live(path, max_age=5).ok
    assert "rootfs.host.a.bulk" in check_ready(path, max_age=5).reason
    missing = tmp_path / "none.json"
    assert not check_live(missing, max_age=5).ok and not check_ready(missing, max_age=5).ok


def test_writer_removes_its_file_when_stopped(tmp_path: Path) -> None:
    """A worker that shut down cleanly is not live at once (no waiting for the file to age)."""
    path = tmp_path / "w.json"
    writer = HealthWriter(path, role="worker", host="a", interval=0.1, expected=EXPECTED).start()
    writer.set_ready(EXPECTED)
    assert check_ready(path, max_age=5).ok
    writer.stop()
    assert not path.exists() and not check_live(path, max_age=5).ok


def test_live_probe_imports_neither_celery_nor_redis(tmp_path: Path) -> None:
    """The --live path reads a file: no Celery, kombu, redis or prometheus_client import, exit code and
    one line of reason (JSON with --json)."""
    env = {**os.environ, "ROOTFS_HOST": "a", "ROOTFS_RUN_DIR": str(tmp_path)}
    _write(health_file(tmp_path, "worker"), ready=True, loop=time.time(), queues=EXPECTED)
    code = (
        "import sys\nfrom worker.cli import main\n"
        "try:\n    main(['health', '--live'])\nexcept SystemExit as e:\n    rc = e.code\n"
        "heavy = sorted({m.split('.')[0] for m in sys.modules} & {'celery', 'kombu', 'redis', 'prometheus_client'})\n"
        "print(rc, heavy)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=30)
    assert done.stdout.strip().splitlines()[-1] == "0 []", done.stdout + done.stderr
    rc, out = probe(env, "--ready", "--json")
    assert rc == 0 and json.loads(out)["ok"] is True and json.loads(out)["probe"] == "ready"
    rc, out = probe({**env, "ROOTFS_RUN_DIR": str(tmp_path / "nothing")}, "--live")
    assert rc == 1 and out.startswith("no heartbeat file") and "\n" not in out


@pytest.mark.slow
def test_probes_follow_a_real_worker_through_a_redis_outage(start_host: StartHost, tmp_path: Path) -> None:
    """Live and ready; Redis stopped: still live (for longer than the max age), not ready; Redis back: ready
    again; worker stopped: not live."""
    server = RedisServer(tmp_path / "redis").start()
    try:
        a = start_host("a", broker_url=server.url, env={"ROOTFS_RUN_DIR": str(tmp_path / "run")})
        max_age = Settings.from_env(a.env).liveness_max_age
        wait_until(lambda: probe(a.env, "--ready")[0] == 0, timeout=30, what="the worker to be ready")
        rc, reason = probe(a.env, "--live")
        assert rc == 0 and reason.startswith("live:") and "consuming" in reason
        server.stop(hard=True)
        wait_until(lambda: probe(a.env, "--ready")[0] == 1, timeout=30, what="readiness to drop")
        time.sleep(max_age + 1)  # longer than a heartbeat stays fresh: liveness must come from the worker
        rc, reason = probe(a.env, "--live")
        assert rc == 0, reason
        assert "not ready" in reason
        rc, reason = probe(a.env, "--ready")
        assert rc == 1 and "broker" in reason
        server.start()
        wait_until(lambda: probe(a.env, "--ready")[0] == 0, timeout=60, what="readiness to come back")
        assert probe(a.env, "--live")[0] == 0
        a.worker.stop()
        rc, reason = probe(a.env, "--live")
        assert rc == 1 and "no heartbeat file" in reason
    finally:
        server.stop()


@pytest.mark.slow
def test_beat_writes_its_own_heartbeat(redis_url: str, tmp_path: Path) -> None:
    """The beat is live by `health --live --role beat` while it runs; the worker's probe is not fooled."""
    env = worker_env(
        broker_url=redis_url,
        host="b",
        template_dir=tmp_path / "t",
        clones_dir=tmp_path / "c",
        extra={"ROOTFS_RUN_DIR": str(tmp_path / "run"), "ROOTFS_HEARTBEAT_INTERVAL": "1"},
    )
    beat = CeleryProcess("beat", env, tmp_path / "beat.log", args=["--schedule", str(tmp_path / "schedule")])
    beat.start()
    try:
        wait_until(lambda: probe(env, "--live", "--role", "beat")[0] == 0, timeout=60, what="the beat's heartbeat")
        assert probe(env, "--live")[0] == 1  # no worker runs for this host
    finally:
        beat.stop()
