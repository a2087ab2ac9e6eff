"""`python -m worker.dev.demo`: the whole product on sample templates, through a real worker and Redis.

Creates sample stacks in a temporary directory, uses the Redis at CELERY_BROKER_URL or starts a private
one when none answers, starts a worker and a beat, then sends scan, warm, clone and release through the
queue and prints each result. Everything it started or wrote is gone when it ends.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from worker.celery import create_app
from worker.client import RootfsClient
from worker.dev.processes import CeleryProcess, RedisServer, redis_answers, running, worker_env
from worker.dev.templates import MIB, write_sparse
from worker.errors import RootfsError
from worker.service.settings import Settings

#: (stack, apparent size, MiB of data): sparse like real ext4 images, so the demo is quick and small.
SAMPLES = (("base", 256 * MIB, 8), ("node-20", 512 * MIB, 16), ("python-3.12", 384 * MIB, 12))


def make_templates(template_dir: Path) -> None:
    for stack, size, data_mib in SAMPLES:
        write_sparse(template_dir / stack / "rootfs.ext4", size=size, data=data_mib * MIB, salt=stack.encode())


@contextlib.contextmanager
def redis_url_for_demo(workdir: Path) -> Iterator[str]:
    url = os.environ.get("CELERY_BROKER_URL") or "redis://localhost:6379/0"
    if redis_answers(url):
        step(f"using the Redis that answers at {url}")
        yield url
        return
    server = RedisServer(workdir / "redis", appendonly=True).start()
    step(f"no Redis answered at {url}: started a private redis-server at {server.url}")
    try:
        yield server.url
    finally:
        server.stop()


def step(text: str) -> None:
    print(f"\n== {text}", flush=True)


def show(label: str, call: Callable[[], Any]) -> Any:
    started = time.perf_counter()
    try:
        value = call()
    except RootfsError as exc:
        print(f"-- {label}: {type(exc).__name__}: {exc}  (transient={exc.transient})")
        return None
    ms = (time.perf_counter() - started) * 1000
    print(f"-- {label}  [{ms:.1f} ms]\n{json.dumps(value, indent=2, sort_keys=True)}", flush=True)
    return value


def main() -> int:
    workdir = Path(tempfile.mkdtemp(prefix="rootfs-demo-"))
    host = f"demo-{socket.gethostname()}-{os.getpid()}"
    try:
        template_dir, clones_dir = workdir / "templates", workdir / "clones"
        make_templates(template_dir)
        step(f"sample stacks in {template_dir}: {', '.join(s for s, _, _ in SAMPLES)}")
        with redis_url_for_demo(workdir) as url:
            env = worker_env(
                broker_url=url,
                host=host,
                template_dir=template_dir,
                clones_dir=clones_dir,
                extra={"ROOTFS_WARM_INTERVAL": "30", "ROOTFS_HEARTBEAT_INTERVAL": "2"},
            )
            worker = CeleryProcess("worker", env, workdir / "worker.log", args=["-n", f"{host}@%h"])
            beat = CeleryProcess("beat", env, workdir / "beat.log", args=["--schedule", str(workdir / "beat-db")])
            with running(worker, beat):
                worker.wait_ready()
                step(f"worker for host {host!r} and beat are running (logs in {workdir})")
                client = RootfsClient(create_app(Settings.from_env(env)))
                run_scenario(client, host)
            step("worker and beat stopped")
        return 0
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def run_scenario(client: RootfsClient, host: str) -> None:
    show("rootfs-worker hosts (live hosts, from their heartbeats)", lambda: [h["host"] for h in client.hosts()])
    show(
        "warm (hash every template now; the worker also did so when it started)",
        lambda: client.warm(host=host).result(timeout=120),
    )
    show("scan_stacks", lambda: client.stacks(host=host).result(timeout=60))
    show("clone_for_vm vm-1 base", lambda: client.clone(host=host, vm_id="vm-1", stack="base").result(timeout=60))
    show(
        "clone_for_vm vm-1 base again (idempotent: same clone)",
        lambda: client.clone(host=host, vm_id="vm-1", stack="base").result(timeout=60),
    )
    show(
        "clone_for_vm 'vm/2' node-20 (sanitised to vm_2)",
        lambda: client.clone(host=host, vm_id="vm/2", stack="node-20").result(timeout=60),
    )
    show(
        "clone_for_vm 'vm:2' node-20 (also vm_2: refused, never the same disk)",
        lambda: client.clone(host=host, vm_id="vm:2", stack="node-20").result(timeout=60),
    )
    show(
        "clone_for_vm vm-3 ghost (unknown stack: fails at once)",
        lambda: client.clone(host=host, vm_id="vm-3", stack="ghost").result(timeout=60),
    )
    show(
        "clone_for_vm vm-4 '../../etc' (hostile name: refused before any access)",
        lambda: client.clone(host=host, vm_id="vm-4", stack="../../etc").result(timeout=60),
    )
    show("release_vm vm-1", lambda: client.release(host=host, vm_id="vm-1").result(timeout=60))
    show("release_vm vm/2", lambda: client.release(host=host, vm_id="vm/2").result(timeout=60))
    show("release_vm vm-1 again (idempotent)", lambda: client.release(host=host, vm_id="vm-1").result(timeout=60))


if __name__ == "__main__":
    sys.exit(main())
