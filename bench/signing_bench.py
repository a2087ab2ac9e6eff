"""7. What message signing adds to a clone's round trip.

Two workers on one Redis, one with signing off and one with it on (Celery's `auth` serializer, RSA-2048 keys,
SHA-256), and one client for each; clone and release rounds alternate between them, so drift hits both alike.
The signed round trip signs the job (client) and the worker verifies it; the worker signs the STARTED state
(task_track_started) and the result, and the client verifies both: three RSA-2048 signatures and three
verifications more than the plain one. The in-process row isolates one sign + verify from Redis and Celery.
"""

from __future__ import annotations

import contextlib
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

from celery import Celery

from bench.common import Context, Row, Section, median, ms, percentile, ratio
from worker.celery import create_app
from worker.client import RootfsClient
from worker.dev.processes import CeleryProcess, RedisServer, worker_env
from worker.dev.templates import write_sparse
from worker.service.settings import Settings

STACK = "small"
TIMEOUT = 60.0
MIB = 1 << 20


def _self_signed(directory: Path, name: str) -> tuple[Path, Path]:
    key, cert = directory / f"{name}.key", directory / f"{name}.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", f"/CN={name}",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    return key, cert


@contextlib.contextmanager
def _hosts(root: Path) -> Iterator[dict[str, tuple[RootfsClient, str, Path]]]:
    """Redis, a plain and a signing worker, and a client for each: {"plain"|"signed": (client, host, clones)}."""
    pki = root / "pki"
    pki.mkdir(parents=True)
    worker_key, worker_cert = _self_signed(pki, "worker")
    client_key, client_cert = _self_signed(pki, "client")
    trusted = str(pki / "*.pem")
    signing = {
        "worker": {"ROOTFS_SIGNING_KEY": str(worker_key), "ROOTFS_SIGNING_CERT": str(worker_cert)},
        "client": {"ROOTFS_SIGNING_KEY": str(client_key), "ROOTFS_SIGNING_CERT": str(client_cert)},
    }
    server = RedisServer(root / "redis")
    procs: list[CeleryProcess] = []
    apps: list[Celery] = []
    try:
        server.start()
        hosts: dict[str, tuple[RootfsClient, str, Path]] = {}
        for kind in ("plain", "signed"):
            name = f"bench-{kind}"
            tdir, cdir = root / kind / "templates", root / kind / "clones"
            write_sparse(tdir / STACK / "rootfs.ext4", size=64 * MIB, data=1 * MIB, chunks=1)
            extra = {"ROOTFS_WARM_ON_START": "0"}
            if kind == "signed":
                extra |= signing["worker"] | {"ROOTFS_SIGNING_TRUSTED": trusted}
            env = worker_env(broker_url=server.url, host=name, template_dir=tdir, clones_dir=cdir, extra=extra)
            proc = CeleryProcess("worker", env, root / kind / "worker.log", args=["--concurrency", "2", "-n", name])
            procs.append(proc.start())
            client_env = {"CELERY_BROKER_URL": server.url, "CELERY_RESULT_BACKEND": server.url, "ROOTFS_HOST": "b"}
            if kind == "signed":
                client_env |= signing["client"] | {"ROOTFS_SIGNING_TRUSTED": trusted}
            apps.append(create_app(Settings.from_env(client_env)))
            hosts[kind] = (RootfsClient(apps[-1]), name, cdir)
        for proc in procs:
            proc.wait_ready()
        yield hosts
    finally:
        for app in apps:
            app.close()
        for proc in procs:
            proc.stop()
        server.stop()


def _in_process(rounds: int) -> dict[str, float]:
    """Median seconds to serialise and read back one clone job body, as JSON and as a signed `auth` message
    (the app's serializer registry after setup_security, so the same code the client and worker run)."""
    from kombu.serialization import dumps, loads

    body = [[], {"vm_id": "vm-42", "stack": "node-20", "host": "hv-12"}, {"callbacks": None, "errbacks": None}]
    out: dict[str, float] = {}
    for serializer in ("json", "auth"):
        times = []
        for _ in range(rounds):
            start = time.perf_counter()
            ctype, enc, data = dumps(body, serializer=serializer)
            loads(data, ctype, enc, accept={ctype})
            times.append(time.perf_counter() - start)
        out[serializer] = median(times)
    return out


def run_section(ctx: Context) -> Section:
    section = Section("Message signing")
    rounds = ctx.reps(full=100, quick=15)
    lat: dict[str, list[float]] = {"plain": [], "signed": []}
    with _hosts(ctx.workdir / "signing") as hosts:
        for i in range(-5, rounds):  # five untimed warm-up rounds (hash cache, connections, subscriptions)
            for kind in ("plain", "signed") if i % 2 == 0 else ("signed", "plain"):
                client, name, _ = hosts[kind]
                start = time.perf_counter()
                client.clone(host=name, vm_id=f"vm-{i}", stack=STACK).result(timeout=TIMEOUT)
                took = time.perf_counter() - start
                client.release(host=name, vm_id=f"vm-{i}").result(timeout=TIMEOUT)
                if i >= 0:
                    lat[kind].append(took)
        ctx.log(f"signing: {rounds} rounds done")
        own = _in_process(ctx.reps(full=2000, quick=200))
    p50 = {k: median(v) for k, v in lat.items()}
    p99 = {k: percentile(v, 99) for k, v in lat.items()}
    section.rows += [
        Row(
            "`clone_for_vm` p50 enqueue→result, signed / unsigned",
            ms(p50["signed"]),
            ms(p50["plain"]),
            ratio(p50["signed"], p50["plain"]),
            None,
        ),
        Row(
            "`clone_for_vm` p99 enqueue→result, signed / unsigned",
            ms(p99["signed"]),
            ms(p99["plain"]),
            ratio(p99["signed"], p99["plain"]),
            None,
        ),
        Row(
            "one job body serialised + read back in process, `auth` / `json`",
            ms(own["auth"]),
            ms(own["json"]),
            ratio(own["auth"], own["json"]),
            None,
        ),
    ]
    section.notes.append(
        f"{rounds} alternating rounds, one clone at a time per worker, on one Redis; a clone copies 1 MiB of a "
        f"64 MiB sparse template (warm hash). Signing adds {ms(p50['signed'] - p50['plain'])} to the median round "
        f"trip; one sign + verify in process costs {ms(own['auth'] - own['json'])} over JSON, and a round trip "
        "does three (the job, its STARTED state, its result), with the pool processes competing for the same cores."
    )
    return section
