"""Prometheus metrics of one host's worker, correct under the prefork pool.

Pool processes count what their jobs did (durations, hash work, errors, retries) in prometheus_client's
multiprocess mode: each process writes its own memory-mapped files in one directory, and the main process's
HTTP server sums them at scrape time. Gauges (jobs running, clones, free space, templates, probes) are read
at scrape time instead, in the main process: Celery's own record of running jobs, a stat per clone and a
statvfs, never a hash and never a lock a clone could wait on. A clone job pays three writes to memory.

prometheus_client picks its value class when it is first imported, from PROMETHEUS_MULTIPROC_DIR. The worker
sets that variable in its main process before the pool forks (`prepare_multiproc_dir`), and this module
imports prometheus_client only inside functions, so that no earlier import can pin the single-process class.

Names follow Prometheus conventions: `rootfs_` prefix, base units (seconds, bytes), `_total` on counters,
and a `host` label on every series so that one rule covers a fleet.
"""

from __future__ import annotations

import contextlib
import functools
import glob
import os
import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from worker.core import inventory
from worker.core.hashcache import FileKey, HashCache
from worker.core.layout import CACHE_DIR
from worker.core.models import HashWork
from worker.core.templates import resolve_template, stack_names
from worker.errors import RootfsError
from worker.service.health import check_live, check_ready

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric
    from prometheus_client.registry import CollectorRegistry

    from worker.service.settings import Settings

#: Clone and release durations: a reflink or an existing clone is sub-millisecond to a few ms (fsyncs); a
#: copy of a template's data on ext4 takes from tens of ms to seconds; a cold hash of a multi-GB template,
#: tens of seconds to minutes.
DURATION_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
    300.0,
)

METRICS_SUBDIR = "metrics"

#: The jobs `rootfs_jobs_in_progress` reports (each with 0 when none runs, so the series never vanish).
JOB_TASKS = (
    "clone_for_vm",
    "release_vm",
    "scan_stacks",
    "warm_hashes",
    "fanout_warm",
    "ping",
    "list_clones",
    "reconcile",
)

#: Running jobs by task name, read in the main process at scrape time (worker.service.observability).
ActiveJobs = Callable[[], Iterable[str]]
_LIVE_FILE = re.compile(r"gauge_live\w*_(\d+)\.db")


class JobMetrics:
    """What pool processes record; one instance per process (`for_this_process`)."""

    def __init__(self, host: str, registry: CollectorRegistry | None = None) -> None:
        from prometheus_client import REGISTRY, Counter, Gauge, Histogram

        reg = REGISTRY if registry is None else registry
        self.host = host
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}
        self.clone_seconds = Histogram(
            "rootfs_clone_duration_seconds",
            "Time of one clone_for_vm attempt, by how the clone came to be and how the attempt ended",
            ["host", "method", "outcome"],
            buckets=DURATION_BUCKETS,
            registry=reg,
        )
        self.release_seconds = Histogram(
            "rootfs_release_duration_seconds",
            "Time of one release_vm attempt",
            ["host", "outcome"],
            buckets=DURATION_BUCKETS,
            registry=reg,
        )
        self.hashed_bytes = Counter(
            "rootfs_hashed_bytes", "Template bytes hashed (cache misses)", ["host"], registry=reg
        )
        self.hashing_seconds = Counter(
            "rootfs_hashing_seconds", "Seconds spent hashing templates", ["host"], registry=reg
        )
        self.cache_hits = Counter(
            "rootfs_hash_cache_hits", "Template hashes found in the hash cache", ["host"], registry=reg
        )
        self.cache_misses = Counter(
            "rootfs_hash_cache_misses", "Template hashes that had to be computed", ["host"], registry=reg
        )
        self.errors = Counter(
            "rootfs_errors",
            "Failed job attempts, by task, error type and whether a retry may succeed",
            ["host", "task", "type", "transient"],
            registry=reg,
        )
        self.retries = Counter(
            "rootfs_retries", "Retries scheduled after a transient error", ["host", "task"], registry=reg
        )
        self.last_warm = Gauge(
            "rootfs_warm_last_success_timestamp_seconds",
            "Unix time the last warm-up ended with every template hashed",
            ["host"],
            multiprocess_mode="max",
            registry=reg,
        )

    def _child(self, metric: Any, *labels: str) -> Any:
        """The labelled series, bound once per process: `labels()` costs as much as the write itself."""
        key = (id(metric), labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(self.host, *labels)
        return child

    def clone(self, seconds: float, *, method: str, outcome: str) -> None:
        self._child(self.clone_seconds, method, outcome).observe(seconds)

    def release(self, seconds: float, *, outcome: str) -> None:
        self._child(self.release_seconds, outcome).observe(seconds)

    def hashing(self, work: HashWork) -> None:
        if work.hits:
            self._child(self.cache_hits).inc(work.hits)
        if work.misses:
            self._child(self.cache_misses).inc(work.misses)
            self._child(self.hashed_bytes).inc(work.bytes)
            self._child(self.hashing_seconds).inc(work.seconds)

    def error(self, task: str, error_type: str, *, transient: bool) -> None:
        self._child(self.errors, task, error_type, "true" if transient else "false").inc()

    def retry(self, task: str) -> None:
        self._child(self.retries, task).inc()

    def warm_succeeded(self, when: float) -> None:
        self._child(self.last_warm).set(when)


@functools.cache
def for_this_process() -> JobMetrics | None:
    """This process's metrics, or None when the worker serves none (ROOTFS_METRICS_PORT unset)."""
    from worker.service import runtime

    settings = runtime.settings()
    if settings.metrics_port is None:
        return None
    return JobMetrics(settings.host)


# ------------------------------------------------------------------------------------------ main process


def multiproc_dir(run_dir: Path) -> Path:
    return run_dir / METRICS_SUBDIR


def prepare_multiproc_dir(run_dir: Path) -> Path:
    """Empty the pool's metric directory and point prometheus_client at it; call before the pool forks.

    Files left by an earlier run of this worker would otherwise be summed into this one's counters (and
    pile up across restarts): a restarted worker starts from zero, as a Prometheus counter reset expects.
    """
    path = multiproc_dir(run_dir)
    path.mkdir(parents=True, exist_ok=True)
    for leftover in glob.glob(str(path / "*.db")):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(leftover)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(path)
    return path


def mark_dead(pid: int, path: Path) -> None:
    """Drop a finished pool process's live gauges (its `rootfs_jobs_in_progress` must not linger)."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(pid, str(path))  # type: ignore[no-untyped-call]


def sweep_dead(path: Path) -> None:
    """Live gauges of pool processes that died without saying so (SIGKILL, OOM): drop them at scrape."""
    pids: set[int] = set()
    with contextlib.suppress(FileNotFoundError):
        for entry in os.scandir(path):
            m = _LIVE_FILE.fullmatch(entry.name)
            if m:
                pids.add(int(m.group(1)))
    for pid in pids:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            mark_dead(pid, path)
        except PermissionError:
            pass


class HostCollector:
    """Gauges read at scrape time from the filesystem and the heartbeat file: cheap, lock-free, no hashing."""

    def __init__(
        self,
        settings: Settings,
        health_path: Path,
        multiproc: Path | None = None,
        active: ActiveJobs | None = None,
    ) -> None:
        self._s = settings
        self._health = health_path
        self._multiproc = multiproc
        self._active = active
        self._cache = HashCache(settings.clones_dir / CACHE_DIR / "hashes")

    def collect(self) -> Iterable[Metric]:
        from prometheus_client.core import GaugeMetricFamily

        if self._multiproc is not None:
            sweep_dead(self._multiproc)
        host = self._s.host

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            family = GaugeMetricFamily(name, doc, labels=["host"])
            family.add_metric([host], value)
            return family

        if self._active is not None:
            # From the main process's own record of what its pool runs: no write on the job's path.
            running = GaugeMetricFamily("rootfs_jobs_in_progress", "Jobs running now, by task", labels=["host", "task"])
            counts = dict.fromkeys(JOB_TASKS, 0)
            for name in self._active():
                short = name.rpartition(".")[2]
                counts[short] = counts.get(short, 0) + 1
            for task, n in counts.items():
                running.add_metric([host, task], n)
            yield running
        clones, allocated = _clones(self._s.clones_dir)
        yield gauge("rootfs_clones", "VM clone directories on this host", clones)
        yield gauge("rootfs_clones_allocated_bytes", "Bytes allocated on disk by the clones' images", allocated)
        try:
            st = os.statvfs(self._s.clones_dir)
        except OSError:
            pass
        else:
            yield gauge(
                "rootfs_clones_fs_free_bytes",
                "Bytes free for new clones on the clones filesystem (available to unprivileged users)",
                st.f_bavail * st.f_frsize,
            )
            size = st.f_blocks * st.f_frsize
            yield gauge("rootfs_clones_fs_size_bytes", "Size of the clones filesystem", size)
            yield gauge(
                "rootfs_clones_fs_reserve_bytes",
                "Free space a copy must leave (ROOTFS_MIN_FREE): below it, clones that copy are refused",
                self._s.min_free.of(size),
            )
        total, warm = self._templates()
        yield gauge("rootfs_templates", "Template stacks on this host", total)
        yield gauge("rootfs_templates_warm", "Template stacks whose current hash is in the cache", warm)
        max_age = self._s.liveness_max_age
        yield gauge(
            "rootfs_worker_live", "1 while the worker's main process is live", _ok(check_live, self._health, max_age)
        )
        yield gauge(
            "rootfs_worker_ready",
            "1 while the worker is connected to the broker and consumes its host's queues",
            _ok(check_ready, self._health, max_age),
        )

    def _templates(self) -> tuple[int, int]:
        """Stacks, and how many of them have a cache entry for their current stat key (a stat and a small
        read each: warm means a clone would not hash)."""
        tdir = self._s.template_dir
        try:
            names = stack_names(tdir)
        except Exception:  # noqa: BLE001 - an unreadable template dir reads as no templates here
            return 0, 0
        warm = 0
        for name in names:
            try:
                found = resolve_template(tdir, name)
                if found is not None and self._cache.get(FileKey.of(os.stat(found[1]))) is not None:
                    warm += 1
            except Exception:  # noqa: BLE001, S112 - a template vanishing mid-scrape counts as not warm
                continue
        return len(names), warm


def _ok(probe: Any, path: Path, max_age: float) -> float:
    return 1.0 if probe(path, max_age=max_age).ok else 0.0


def _clones(clones_dir: Path) -> tuple[int, int]:
    """VM directories and the bytes their images allocate (worker.core.inventory, shared with the inventory:
    the same names count as clones there and here)."""
    try:
        return inventory.clone_totals(clones_dir)
    except RootfsError:
        return 0, 0


def scrape_registry(
    settings: Settings, health_path: Path, multiproc: Path | None, active: ActiveJobs | None = None
) -> CollectorRegistry:
    """What the HTTP server exposes: the pool processes' files summed, plus the host's gauges."""
    from prometheus_client import CollectorRegistry
    from prometheus_client.multiprocess import MultiProcessCollector

    registry = CollectorRegistry()
    if multiproc is not None:
        MultiProcessCollector(registry, path=str(multiproc))  # type: ignore[no-untyped-call]
    registry.register(HostCollector(settings, health_path, multiproc, active))
    return registry


class MetricsServer:
    """The HTTP server of the main process, on ROOTFS_METRICS_PORT."""

    def __init__(
        self, settings: Settings, health_path: Path, multiproc: Path | None, active: ActiveJobs | None = None
    ) -> None:
        self._registry = scrape_registry(settings, health_path, multiproc, active)
        self._port = settings.metrics_port
        self._server: Any = None

    def start(self) -> MetricsServer:
        from prometheus_client import start_http_server

        assert self._port is not None
        self._server, _ = start_http_server(self._port, registry=self._registry)
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
