"""Signed messages: a worker runs only jobs signed by a key it trusts; unsigned or foreign-signed jobs never run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import wait_until
from tests.prodredis import ROOT, Pem, make_ca, make_cert
from tests.service.conftest import MakeClient
from tests.workers import StartHost
from worker.service.queues import host_queues

pytestmark = pytest.mark.slow


def _signing_env(pem: Pem, trusted: Path) -> dict[str, str]:
    return {
        "ROOTFS_SIGNING_KEY": str(pem.key),
        "ROOTFS_SIGNING_CERT": str(pem.cert),
        "ROOTFS_SIGNING_TRUSTED": str(trusted / "*.pem"),
    }


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Path | Pem]]:
    """The fleet's worker and scheduler certificates (trusted), and an intruder's (not)."""
    base = tmp_path_factory.mktemp("signing")
    ca = make_ca(base, "fleet-ca")
    trusted = base / "trusted"
    trusted.mkdir()
    worker = make_cert(base, ca, "worker")
    scheduler = make_cert(base, ca, "scheduler")
    intruder = make_cert(base, make_ca(base, "other-ca"), "intruder")
    for pem in (worker, scheduler):
        (trusted / f"{pem.cert.stem}.pem").write_bytes(pem.cert.read_bytes())
    yield {"trusted": trusted, "worker": worker, "scheduler": scheduler, "intruder": intruder}


def _send(redis_url: str, task: str, queue: str, kwargs: dict[str, str], env: dict[str, str]) -> None:
    """One job from another process: unsigned, or signed with the key in `env`."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("ROOTFS_", "CELERY_"))}
    full = {**base, "CELERY_BROKER_URL": redis_url, "CELERY_RESULT_BACKEND": redis_url, "ROOTFS_HOST": "x", **env}
    subprocess.run(
        [sys.executable, "-m", "tests.send_job", task, queue, json.dumps(kwargs)], env=full, cwd=ROOT, check=True
    )


def test_only_jobs_signed_by_a_trusted_key_run(
    start_host: StartHost, redis_url: str, pki: dict[str, Any], make_client: MakeClient
) -> None:
    """Unsigned and foreign-signed release_vm jobs are refused and logged, the disk stays; a signed one releases."""
    trusted = pki["trusted"]
    host = start_host(env=_signing_env(pki["worker"], trusted))
    host.template("base", b"signed " * 1024)
    client = make_client(
        {"CELERY_BROKER_URL": redis_url, "CELERY_RESULT_BACKEND": redis_url} | _signing_env(pki["scheduler"], trusted)
    )
    disk = Path(client.clone(host=host.name, vm_id="vm-1", stack="base").result(timeout=30)["path"])
    assert disk.exists()

    queue = host_queues(host.name).fast
    release = {"vm_id": "vm-1", "host": host.name}
    _send(redis_url, "rootfs.release_vm", queue, release, {})
    _send(redis_url, "rootfs.release_vm", queue, release, _signing_env(pki["intruder"], trusted))
    # Certificates are public: the intruder's key under the scheduler's trusted certificate.
    impostor = Pem(pki["scheduler"].cert, pki["intruder"].key)
    _send(redis_url, "rootfs.release_vm", queue, release, _signing_env(impostor, trusted))
    wait_until(lambda: _refusals(host.worker.log()) == 3, what="the three forged jobs refused and logged", timeout=30)
    # A signed job after them runs: the queue moved past the forged ones, and none of them released the disk.
    assert client.ping(host=host.name).result(timeout=30) == {"host": host.name}
    assert disk.exists()
    assert "Task rootfs.release_vm" not in host.worker.log()

    assert client.release(host=host.name, vm_id="vm-1").result(timeout=30)["released"] is True
    assert not disk.exists()


def _refusals(log: str) -> int:
    """Log lines of refused jobs: unsigned (dropped by the transport's envelope check: not the signed content
    type), and signed by an unknown certificate or with the wrong key (Celery's signature check)."""
    lines = [line for line in log.splitlines() if "ERROR/" in line or "CRITICAL/" in line]
    unsigned = sum("dropped a message" in line and "application/data" in line for line in lines)
    return unsigned + sum("Can't decode message body" in line for line in lines)
