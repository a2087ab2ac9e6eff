"""Celery's side of the probes and the metrics: which signal or bootstep does what, in which process.

- `worker_init` (main process, before the pool forks): empty the pool's metric directory and point
  prometheus_client at it (worker.service.metrics.prepare_multiproc_dir), when ROOTFS_METRICS_PORT is set.
- `Observability`, a worker bootstep after the pool (main process, so the pool's children inherit neither
  the listening socket nor the threads): start the heartbeat file writer and the metrics HTTP server.
- `Readiness`, a consumer bootstep after the task consumer: ready when it starts (connected, consuming
  its queues), not ready when Celery stops it to reconnect; meanwhile an event-loop timer ticks, so a hung
  loop shows in the liveness probe (worker.service.health).
- `worker_process_shutdown` (each pool process, as it exits): drop its live gauges.
- `beat_init`: the beat's own heartbeat file.
"""

from __future__ import annotations

import atexit
import logging
import os
from typing import Any

from celery import bootsteps
from celery.signals import beat_init, worker_init, worker_process_shutdown

from worker.service import metrics, runtime
from worker.service.health import HealthWriter, health_file
from worker.service.queues import worker_queue_names

log = logging.getLogger(__name__)


class _Main:
    """What the worker's main process holds between bootsteps."""

    writer: HealthWriter | None = None
    server: metrics.MetricsServer | None = None


@worker_init.connect
def _on_worker_init(**_: Any) -> None:
    s = runtime.settings()
    if s.metrics_port is not None:
        path = metrics.prepare_multiproc_dir(s.run_dir)
        log.info("metrics of the pool processes go to %s", path)


@worker_process_shutdown.connect
def _on_pool_process_exit(pid: int | None = None, **_: Any) -> None:
    s = runtime.settings()
    if s.metrics_port is not None:
        metrics.mark_dead(pid or os.getpid(), metrics.multiproc_dir(s.run_dir))


class Observability(bootsteps.StartStopStep):
    """The heartbeat file and the metrics server of the worker's main process."""

    requires = ("celery.worker.components:Pool",)
    label = "rootfs-observability"

    def start(self, worker: Any) -> None:
        s = runtime.settings()
        path = health_file(s.run_dir, "worker")
        _Main.writer = HealthWriter(
            path, role="worker", host=s.host, interval=s.heartbeat_interval, expected=worker_queue_names(s.host)
        )
        _Main.writer.set_not_ready("connecting to the broker")
        _Main.writer.start()
        if s.metrics_port is not None:
            multiproc = metrics.multiproc_dir(s.run_dir)
            try:
                _Main.server = metrics.MetricsServer(s, path, multiproc, _running_jobs).start()
            except OSError as exc:
                # Clones matter more than their metrics: serve jobs anyway; the scrape target being down
                # (Prometheus' `up == 0`) is what tells the operator.
                log.error("metrics server on port %d not started: %s", s.metrics_port, exc)
            else:
                log.info("metrics on port %d (/metrics)", s.metrics_port)

    def stop(self, worker: Any) -> None:
        if _Main.server is not None:
            _Main.server.stop()
            _Main.server = None
        if _Main.writer is not None:
            _Main.writer.stop()
            _Main.writer = None

    shutdown = stop


def _running_jobs() -> list[str]:
    """Task names of the jobs the pool runs now, from the main process's own state (no write per job)."""
    from celery.worker import state

    return [req.name for req in tuple(state.active_requests)]  # tuple(): one step under the GIL


class Readiness(bootsteps.StartStopStep):
    """Ready while the consumer runs: started after the task consumer, stopped before a reconnect."""

    requires = ("celery.worker.consumer.tasks:Tasks",)
    label = "rootfs-readiness"

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        self._tick: Any = None

    def start(self, c: Any) -> None:
        writer = _Main.writer
        if writer is None:
            return
        queues = [q.name for q in (c.task_consumer.queues if c.task_consumer is not None else [])]
        writer.set_ready(queues)
        self._tick = c.timer.call_repeatedly(runtime.settings().heartbeat_interval, writer.tick)

    def stop(self, c: Any) -> None:
        self._not_ready("connection to the broker lost; reconnecting")

    def shutdown(self, c: Any) -> None:
        self._not_ready("shutting down")

    def _not_ready(self, reason: str) -> None:
        if self._tick is not None:
            self._tick.cancel()
            self._tick = None
        if _Main.writer is not None:
            _Main.writer.set_not_ready(reason)


def install(app: Any) -> None:
    """Add the bootsteps to an app (every app a worker may run: `worker.celery.create_app` calls this)."""
    app.steps["worker"].add(Observability)
    app.steps["consumer"].add(Readiness)


@beat_init.connect
def _on_beat_init(**_: Any) -> None:
    s = runtime.settings()
    writer = HealthWriter(
        health_file(s.run_dir, "beat"), role="beat", host=s.host, interval=s.heartbeat_interval, expected=[]
    ).start()
    atexit.register(writer.stop)
