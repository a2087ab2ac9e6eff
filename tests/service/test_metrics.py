"""Prometheus metrics of a real worker (prefork, 4 pool processes), scraped over HTTP and parsed by
prometheus_client's own parser; plus the job log lines and the in-process pieces."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers import MIB, wait_until
from tests.workers import StartHost
from worker import RootfsConfig, RootfsRegistry, StackNotFound
from worker.client import RootfsClient
from worker.core import locks
from worker.core.layout import LOCKS_DIR
from worker.dev.processes import free_port
from worker.service import jobs, metrics, runtime
from worker.service.jobs import FIELDS, logfmt
from worker.service.metrics import HostCollector, JobMetrics, sweep_dead
from worker.service.settings import Settings

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(port: int) -> Samples:
    """Every sample of the worker's /metrics, keyed by (sample name, labels), via the library's parser."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(samples: Samples, name: str, **labels: str) -> float:
    """The sum of `name`'s samples whose labels include `labels` (0 when there are none)."""
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= ls)


def parse_job_lines(log: str) -> list[dict[str, str]]:
    """The `job key=value ...` lines of a worker log, as dicts (quoted values decoded)."""
    rows = []
    for line in log.splitlines():
        m = re.search(r"\] job (task=.*)$", line)
        if m:
            pairs = re.findall(r'(\w+)=("(?:[^"\\]|\\.)*"|\S+)', m.group(1))
            rows.append({k: (v[1:-1].encode().decode("unicode_escape") if v.startswith('"') else v) for k, v in pairs})
    return rows


@pytest.mark.slow
def test_counters_equal_what_was_done_across_pool_processes(
    start_host: StartHost, client: RootfsClient, tmp_path: Path
) -> None:
    """12 clones, 4 again, 3 bad stacks, EIO failures retried, 5 releases, a warm-up on 4 pool processes:
    every counter of one scrape equals what was done."""
    port = free_port()
    run_dir = tmp_path / "run"
    stale = run_dir / "metrics" / "counter_1.db"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"left by an earlier run of this worker")
    fault_dir = tmp_path / "faults"
    fault_dir.mkdir()
    env = {
        "ROOTFS_METRICS_PORT": str(port),
        "ROOTFS_RUN_DIR": str(run_dir),
        "FAULT_DIR": str(fault_dir),
        "FAULT_EIO_COUNT": "3",
        "ROOTFS_RETRY_BASE": "0.05",
        "ROOTFS_RETRY_CAP": "0.2",
        "ROOTFS_RETRY_MAX": "10",
    }
    a = start_host("a", env=env, concurrency=4, app="tests.faulty_worker")
    assert not stale.exists(), "metric files of an earlier run were kept"
    a.template("base", os.urandom(MIB))
    a.template("other", os.urandom(MIB // 2))

    clones = [client.clone(host="a", vm_id=f"vm-{i}", stack="base") for i in range(12)]
    assert all(c.result(timeout=60)["method"] == "copy" for c in clones)
    again = [client.clone(host="a", vm_id=f"vm-{i}", stack="base") for i in range(4)]
    assert all(c.result(timeout=60)["method"] == "existing" for c in again)
    for i in range(3):
        with pytest.raises(StackNotFound):
            client.clone(host="a", vm_id=f"bad-{i}", stack="missing").result(timeout=60)
    releases = [client.release(host="a", vm_id=f"vm-{i}") for i in range(5)]
    assert all(r.result(timeout=60)["released"] for r in releases)
    warm = client.warm(host="a").result(timeout=60)
    assert warm["hashed"] == ["other"] and warm["already_warm"] == ["base"]

    eio = len((fault_dir / "eio-failures").read_text())  # injected copy failures (>= 3: processes race)
    assert eio >= 3
    # The worker learns a job ended from its pool a moment after the result is stored: wait for that.
    wait_until(lambda: value(scrape(port), "rootfs_jobs_in_progress", host="a") == 0, what="no job in progress")
    m = scrape(port)
    h = {"host": "a"}
    assert value(m, "rootfs_clone_duration_seconds_count", **h, method="copy", outcome="ok") == 12
    assert value(m, "rootfs_clone_duration_seconds_count", **h, method="existing", outcome="ok") == 4
    assert value(m, "rootfs_clone_duration_seconds_count", **h, outcome="permanent") == 3
    assert value(m, "rootfs_clone_duration_seconds_count", **h, outcome="transient") == eio
    assert value(m, "rootfs_clone_duration_seconds_bucket", **h, method="copy", outcome="ok", le="+Inf") == 12
    assert value(m, "rootfs_clone_duration_seconds_sum", **h, method="copy", outcome="ok") > 0
    assert value(m, "rootfs_errors_total", **h, task="clone_for_vm", type="StackNotFound", transient="false") == 3
    assert value(m, "rootfs_errors_total", **h, task="clone_for_vm", type="FilesystemError", transient="true") == eio
    assert value(m, "rootfs_retries_total", **h, task="clone_for_vm") == eio
    assert value(m, "rootfs_release_duration_seconds_count", **h, outcome="ok") == 5
    # Each clone attempt that found its template looked its hash up once; base and other were hashed once each.
    assert value(m, "rootfs_hash_cache_misses_total", **h) == 2
    assert value(m, "rootfs_hash_cache_hits_total", **h) == (12 + eio + 4 - 1) + 1
    assert value(m, "rootfs_hashed_bytes_total", **h) == MIB + MIB // 2
    assert value(m, "rootfs_hashing_seconds_total", **h) > 0
    assert value(m, "rootfs_jobs_in_progress", **h) == 0
    assert time.time() - 60 < value(m, "rootfs_warm_last_success_timestamp_seconds", **h) <= time.time()
    assert value(m, "rootfs_clones", **h) == 7
    assert value(m, "rootfs_clones_allocated_bytes", **h) >= 7 * MIB
    assert 0 < value(m, "rootfs_clones_fs_free_bytes", **h) < value(m, "rootfs_clones_fs_size_bytes", **h)
    assert value(m, "rootfs_templates", **h) == 2 and value(m, "rootfs_templates_warm", **h) == 2
    assert value(m, "rootfs_worker_live", **h) == 1 and value(m, "rootfs_worker_ready", **h) == 1
    processes = set(re.findall(r"/(ForkPoolWorker-\d+)\] job ", a.worker.log()))
    assert len(processes) >= 2, f"the jobs ran in {processes} only: nothing was summed across processes"


@pytest.mark.slow
def test_jobs_in_progress_shows_a_running_clone(start_host: StartHost, client: RootfsClient, tmp_path: Path) -> None:
    """A clone held on its VM's lock shows as one clone_for_vm in progress; once done, none."""
    port = free_port()
    a = start_host("a", env={"ROOTFS_METRICS_PORT": str(port), "ROOTFS_RUN_DIR": str(tmp_path / "run")})
    a.template("base", b"x" * 4096)
    with locks.exclusive(a.clones_dir / LOCKS_DIR / "vm-1.lock"):  # the registry's own per-VM lock
        handle = client.clone(host="a", vm_id="vm-1", stack="base")
        wait_until(
            lambda: value(scrape(port), "rootfs_jobs_in_progress", task="clone_for_vm") == 1,
            timeout=30,
            what="the held clone to show as in progress",
        )
    assert handle.result(timeout=60)["method"] == "copy"
    # The worker learns a job ended from its pool a moment after the result is stored: 0 follows, eventually.
    wait_until(lambda: value(scrape(port), "rootfs_jobs_in_progress", host="a") == 0, what="no job in progress")


@pytest.mark.slow
def test_each_job_logs_one_machine_readable_line(start_host: StartHost, client: RootfsClient) -> None:
    """A clone, a repeat, a failure and a release each log one `job` line with the same keys; grep by vm id."""
    a = start_host("a")
    a.template("base", b"x" * 4096)
    vm = 'vm "42" with spaces'
    client.clone(host="a", vm_id=vm, stack="base").result(timeout=60)
    client.clone(host="a", vm_id=vm, stack="base").result(timeout=60)
    with pytest.raises(StackNotFound):
        client.clone(host="a", vm_id="vm-7", stack="nope").result(timeout=60)
    client.release(host="a", vm_id=vm).result(timeout=60)
    rows = parse_job_lines(a.worker.log())
    assert [list(r) for r in rows] == [list(FIELDS)] * 4, "every line has the same keys in the same order"
    mine = [r for r in rows if r["vm_id"] == vm]
    assert [(r["task"], r["stack"], r["method"], r["outcome"]) for r in mine] == [
        ("clone_for_vm", "base", "copy", "ok"),
        ("clone_for_vm", "base", "existing", "ok"),
        ("release_vm", "-", "-", "ok"),
    ]
    (failed,) = [r for r in rows if r["vm_id"] == "vm-7"]
    assert (failed["outcome"], failed["error"], failed["retry"]) == ("permanent", "StackNotFound", "no")
    assert all(float(r["seconds"]) >= 0 and r["host"] == "a" and len(r["id"]) == 36 for r in rows)


@pytest.mark.slow
def test_no_metrics_server_without_a_port(start_host: StartHost, client: RootfsClient) -> None:
    """ROOTFS_METRICS_PORT unset: clones work, nothing is written for metrics and no port is served."""
    a = start_host("a")
    a.template("base", b"x" * 4096)
    assert client.clone(host="a", vm_id="vm-1", stack="base").result(timeout=60)["method"] == "copy"
    settings = Settings.from_env(a.env)
    assert not (settings.run_dir / "metrics").exists()
    assert "metrics on port" not in a.worker.log()


def test_logfmt_quotes_what_would_not_read_back() -> None:
    """Plain values stay bare; spaces, quotes, '=' and empty values are JSON-quoted; missing ones are '-'."""
    line = logfmt({"task": "clone_for_vm", "vm_id": 'a b="c"', "stack": "", "seconds": "0.1"})
    assert line.startswith('task=clone_for_vm vm_id="a b=\\"c\\"" stack="" method=- outcome=- seconds=0.1 ')
    assert len(logfmt({"vm_id": "v" * 10_000})) < 400


def test_exposition_names_follow_prometheus_conventions(tmp_path: Path) -> None:
    """Counters end in _total, durations are histograms in seconds, every series has a host label."""
    registry = CollectorRegistry()
    m = JobMetrics("h1", registry)
    m.clone(0.0004, method="reflink", outcome="ok")
    m.error("clone_for_vm", "FilesystemError", transient=True)
    text = generate_latest(registry).decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    counters = [f for f in families.values() if f.type == "counter"]
    assert counters and all(s.name.endswith(("_total", "_created")) for f in counters for s in f.samples)
    assert families["rootfs_clone_duration_seconds"].type == "histogram"
    assert all(f.name.startswith("rootfs_") for f in families.values())
    assert all(s.labels.get("host") == "h1" for f in families.values() for s in f.samples)
    buckets = [s.labels["le"] for s in families["rootfs_clone_duration_seconds"].samples if s.name.endswith("_bucket")]
    assert buckets[0] == "0.0005" and "1.0" in buckets and buckets[-1] == "+Inf"


def test_host_collector_counts_clones_and_warm_templates(tmp_path: Path) -> None:
    """The scrape-time gauges: clones and their blocks, free space, templates and which are warm."""
    tdir, cdir = tmp_path / "t", tmp_path / "c"
    for name in ("a", "b"):
        (tdir / name).mkdir(parents=True)
        (tdir / name / "rootfs.ext4").write_bytes(os.urandom(64 * 1024))
    registry = RootfsRegistry(RootfsConfig(tdir, cdir))
    registry.clone_for_vm("vm-1", "a")
    env = {"ROOTFS_HOST": "h1", "MICROVM_ROOTFS_TEMPLATE_DIR": str(tdir), "MICROVM_ROOTFS_CLONES_DIR": str(cdir)}
    collector = HostCollector(Settings.from_env(env), tmp_path / "no-health.json")
    got = {f.name: f.samples[0].value for f in collector.collect()}
    assert got["rootfs_clones"] == 1 and got["rootfs_clones_allocated_bytes"] >= 64 * 1024
    assert got["rootfs_templates"] == 2 and got["rootfs_templates_warm"] == 1
    assert got["rootfs_clones_fs_size_bytes"] > got["rootfs_clones_fs_free_bytes"] > 0
    assert got["rootfs_clones_fs_reserve_bytes"] == int(got["rootfs_clones_fs_size_bytes"] * 5 / 100)  # default 5%
    env["ROOTFS_MIN_FREE"] = "3G"
    reserve = {f.name: f.samples[0].value for f in HostCollector(Settings.from_env(env), tmp_path).collect()}
    assert reserve["rootfs_clones_fs_reserve_bytes"] == 3 << 30
    assert got["rootfs_worker_live"] == 0 and got["rootfs_worker_ready"] == 0
    registry.warm()
    assert {f.name: f.samples[0].value for f in collector.collect()}["rootfs_templates_warm"] == 2


def test_scrape_drops_live_gauges_of_dead_pool_processes(tmp_path: Path) -> None:
    """A pool process killed without saying goodbye leaves a live-gauge file; the scrape removes it,
    and keeps a live process's file and every counter file."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    names = [f"gauge_livesum_{dead.pid}.db", f"gauge_livesum_{os.getpid()}.db", f"counter_{dead.pid}.db"]
    for name in names:
        (tmp_path / name).write_bytes(b"")
    sweep_dead(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names[1:])


def test_jobs_in_progress_come_from_the_main_process_state(tmp_path: Path) -> None:
    """Running jobs are counted by task at scrape time (zero for tasks with none), not written by each job."""
    env = {
        "ROOTFS_HOST": "h1",
        "MICROVM_ROOTFS_TEMPLATE_DIR": str(tmp_path),
        "MICROVM_ROOTFS_CLONES_DIR": str(tmp_path),
    }
    running = ["rootfs.clone_for_vm", "rootfs.clone_for_vm", "rootfs.warm_hashes"]
    collector = HostCollector(Settings.from_env(env), tmp_path / "health.json", active=lambda: running)
    (family,) = [f for f in collector.collect() if f.name == "rootfs_jobs_in_progress"]
    got = {s.labels["task"]: s.value for s in family.samples}
    assert (got["clone_for_vm"], got["warm_hashes"], got["release_vm"]) == (2, 1, 0)


def test_an_attempts_metrics_are_recorded_after_it_returns(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """observe() returns before recording (the caller does not wait for metrics); flush() records exactly
    once, a failing recorder is logged and never raised, and the next attempt flushes what was left."""
    tdir, cdir = tmp_path / "t", tmp_path / "c"
    (tdir / "base").mkdir(parents=True)
    (tdir / "base" / "rootfs.ext4").write_bytes(os.urandom(4096))
    registry = RootfsRegistry(RootfsConfig(tdir, cdir))
    monkeypatch.setattr(runtime, "registry", lambda: registry)
    collector = CollectorRegistry()
    recorder = JobMetrics("h1", collector)
    monkeypatch.setattr(metrics, "for_this_process", lambda: recorder)

    def clones() -> float:
        value = collector.get_sample_value(
            "rootfs_clone_duration_seconds_count", {"host": "h1", "method": "copy", "outcome": "ok"}
        )
        return value or 0.0

    def clone(vm_id: str) -> object:
        return jobs.observe(
            lambda: registry.clone_for_vm(vm_id, "base"),
            task="rootfs.clone_for_vm", host="h1", task_id="t", attempt=0, vm_id=vm_id, stack="base",
        )  # fmt: skip

    clone("vm-1")
    assert clones() == 0, "recorded before the attempt returned its value"
    jobs.flush()
    assert clones() == 1
    jobs.flush()
    assert clones() == 1, "recorded twice"
    clone("vm-2")
    clone("vm-3")  # flushes vm-2's recording first
    assert clones() == 2
    monkeypatch.setattr(recorder, "clone", lambda *a, **k: 1 / 0)
    jobs.flush()  # vm-3's recording fails: logged, not raised
    assert clones() == 2
