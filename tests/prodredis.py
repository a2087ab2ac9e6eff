"""Production-shaped Redis for the tests: certificates made with the openssl CLI, a TLS-only server, an ACL server.

Everything runs on loopback, on free ports, in the test's own directory; nothing here touches the machine's Redis.
"""

from __future__ import annotations

import contextlib
import gc
import subprocess
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import redis

from worker.celery import create_app
from worker.client import RootfsClient
from worker.dev.processes import RedisServer, free_port
from worker.service.connection import close_redis
from worker.service.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
ACL_FILE = ROOT / "docs" / "redis-acl.conf"


@contextlib.contextmanager
def client_for(env: Mapping[str, str]) -> Iterator[RootfsClient]:
    """A scheduler's client configured from `env`, shut before the test's servers are: otherwise each result it
    still tracks tries, when garbage-collected, to unsubscribe from a server that is gone (30 retries each)."""
    app = create_app(Settings.from_env({"ROOTFS_HOST": "scheduler", **env}))
    try:
        yield RootfsClient(app)
    finally:
        with warnings.catch_warnings():
            # Results dropped by the test unsubscribe now, while their server still answers. After a failover,
            # redis-py/kombu drop a TLS connection to the dead master without closing it; collecting it here
            # warns about that socket (theirs, not ours): not a leak of this client's.
            warnings.simplefilter("ignore", ResourceWarning)
            gc.collect()
        consumer = getattr(app.backend, "result_consumer", None)
        if consumer is not None:
            consumer.stop()
            consumer._pubsub = None  # nothing left to unsubscribe from
        # The result backend's own connections (and, for Sentinel, its connections to the sentinels).
        close_redis(app.backend.client)
        app.close()


@dataclass(frozen=True)
class Pem:
    cert: Path
    key: Path


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


def make_ca(directory: Path, name: str) -> Pem:
    """A self-signed certificate authority."""
    directory.mkdir(parents=True, exist_ok=True)
    pem = Pem(directory / f"{name}.crt", directory / f"{name}.key")
    _openssl(
        "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", f"/CN={name}",
        "-keyout", str(pem.key), "-out", str(pem.cert),
    )  # fmt: skip
    return pem


def make_cert(directory: Path, ca: Pem, name: str, *, ip: str = "127.0.0.1") -> Pem:
    """A certificate for `name` (and the IP address `ip`), signed by `ca`."""
    pem = Pem(directory / f"{name}.crt", directory / f"{name}.key")
    csr = directory / f"{name}.csr"
    ext = directory / f"{name}.ext"
    ext.write_text(f"subjectAltName=IP:{ip},DNS:localhost\n")
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}", "-keyout", str(pem.key), "-out", str(csr))
    _openssl(
        "x509", "-req", "-in", str(csr), "-CA", str(ca.cert), "-CAkey", str(ca.key), "-CAcreateserial",
        "-days", "2", "-out", str(pem.cert), "-extfile", str(ext),
    )  # fmt: skip
    return pem


@dataclass(frozen=True)
class TlsFiles:
    """A CA, a server certificate and a client certificate (the test's PKI for one Redis deployment)."""

    ca: Pem
    server: Pem
    client: Pem

    def files(self) -> dict[str, str]:
        """The server side's TLS files, as redis-server arguments (sentinels reuse them to reach the masters)."""
        return {
            "--tls-cert-file": str(self.server.cert),
            "--tls-key-file": str(self.server.key),
            "--tls-ca-cert-file": str(self.ca.cert),
        }

    def server_args(self) -> list[str]:
        return [word for pair in self.files().items() for word in pair] + ["--tls-auth-clients", "yes"]

    def client_env(self) -> dict[str, str]:
        return {
            "ROOTFS_REDIS_CA": str(self.ca.cert),
            "ROOTFS_REDIS_CERT": str(self.client.cert),
            "ROOTFS_REDIS_KEY": str(self.client.key),
        }

    def redis(self, port: int, *, decode_responses: bool = False) -> redis.Redis:
        return redis.Redis(
            port=port,
            decode_responses=decode_responses,
            ssl=True,
            ssl_ca_certs=str(self.ca.cert),
            ssl_certfile=str(self.client.cert),
            ssl_keyfile=str(self.client.key),
            socket_timeout=1,
        )


def make_tls_files(directory: Path) -> TlsFiles:
    ca = make_ca(directory, "fleet-ca")
    return TlsFiles(ca, make_cert(directory, ca, "redis-server"), make_cert(directory, ca, "rootfs-client"))


@dataclass(frozen=True)
class TlsRedis:
    server: RedisServer
    ca: Pem
    client: Pem

    @property
    def url(self) -> str:
        return f"rediss://127.0.0.1:{self.server.port}/0"

    def env(self) -> dict[str, str]:
        """What a worker or client on this server sets."""
        return {
            "CELERY_BROKER_URL": self.url,
            "CELERY_RESULT_BACKEND": self.url,
            "ROOTFS_REDIS_CA": str(self.ca.cert),
            "ROOTFS_REDIS_CERT": str(self.client.cert),
            "ROOTFS_REDIS_KEY": str(self.client.key),
        }

    def redis(self) -> redis.Redis:
        return redis.Redis(
            host="127.0.0.1",
            port=self.server.port,
            ssl=True,
            ssl_ca_certs=str(self.ca.cert),
            ssl_certfile=str(self.client.cert),
            ssl_keyfile=str(self.client.key),
        )


def start_tls_redis(workdir: Path) -> TlsRedis:
    """A redis-server that speaks only TLS (no plain port) and demands a client certificate from its CA."""
    ca = make_ca(workdir / "pki", "fleet-ca")
    server_pem = make_cert(workdir / "pki", ca, "redis-server")
    client_pem = make_cert(workdir / "pki", ca, "rootfs-client")
    port = free_port()
    holder: list[TlsRedis] = []

    def ready() -> bool:
        try:
            with holder[0].redis() as r:
                return bool(r.ping())
        except (redis.RedisError, OSError):
            return False

    tls_args = {
        "--port": "0",  # the last `port` wins: no plain port at all; `server.port` is the TLS one
        "--tls-port": str(port),
        "--tls-cert-file": str(server_pem.cert),
        "--tls-key-file": str(server_pem.key),
        "--tls-ca-cert-file": str(ca.cert),
        "--tls-auth-clients": "yes",
    }
    extra = [word for pair in tls_args.items() for word in pair]
    server = RedisServer(workdir / "redis", port=port, extra=extra, ready=ready)
    tls = TlsRedis(server, ca, client_pem)
    holder.append(tls)
    server.start()
    return tls


class SentinelGroup:
    """One master, one replica and three sentinels on loopback, with timeouts short enough for a test.

    down-after 1 s and a 5 s failover timeout: a SIGKILLed master is replaced within a few seconds."""

    MASTER = "rootfs"

    def __init__(self, workdir: Path, *, tls: bool = False) -> None:
        """With `tls`, master, replica and sentinels speak only TLS (replication and sentinel links too) and
        demand client certificates."""
        self.workdir = workdir
        self.tls: TlsFiles | None = None
        tls_args: list[str] = []
        if tls:
            self.tls = make_tls_files(workdir / "pki")
            tls_args = [*self.tls.server_args(), "--tls-replication", "yes"]
        master_port, replica_port = free_port(), free_port()
        ready = self._tls_ready if tls else None
        self.master = RedisServer(
            workdir / "master", port=master_port, extra=self._port_args(master_port) + tls_args, ready=ready
        )
        self.replica = RedisServer(
            workdir / "replica",
            port=replica_port,
            extra=[*self._port_args(replica_port), *tls_args, "--replicaof", "127.0.0.1", str(master_port)],
            ready=ready,
        )
        self.sentinel_ports = [free_port() for _ in range(3)]
        self._sentinels: list[subprocess.Popen[bytes]] = []

    def _port_args(self, port: int) -> list[str]:
        return ["--port", "0", "--tls-port", str(port)] if self.tls else []

    def _tls_ready(self) -> bool:
        assert self.tls is not None
        try:
            # Whichever server is starting: both answer on their own port; master first, then the replica.
            for server in (self.master, self.replica):
                if server.proc is not None:
                    with self.tls.redis(server.port) as r:
                        if not r.ping():
                            return False
            return True
        except (redis.RedisError, OSError):
            return False

    @property
    def url(self) -> str:
        return ";".join(f"sentinel://127.0.0.1:{port}/0" for port in self.sentinel_ports)

    def env(self) -> dict[str, str]:
        env = {
            "CELERY_BROKER_URL": self.url,
            "CELERY_RESULT_BACKEND": self.url,
            "ROOTFS_REDIS_MASTER_NAME": self.MASTER,
        }
        return env | (self.tls.client_env() if self.tls else {})

    def start(self) -> SentinelGroup:
        self.master.start()
        self.replica.start()
        for i, port in enumerate(self.sentinel_ports):
            directory = self.workdir / f"sentinel-{i}"
            directory.mkdir(parents=True, exist_ok=True)
            conf = directory / "sentinel.conf"
            conf.write_text(
                (f"port 0\ntls-port {port}\ntls-auth-clients yes\n" if self.tls else f"port {port}\n")
                + f"bind 127.0.0.1\ndir {directory}\n"
                f"sentinel monitor {self.MASTER} 127.0.0.1 {self.master.port} 2\n"
                f"sentinel down-after-milliseconds {self.MASTER} 1000\n"
                f"sentinel failover-timeout {self.MASTER} 5000\n"
                f"sentinel parallel-syncs {self.MASTER} 1\n"
                + ("tls-replication yes\n" + "".join(f"{k[2:]} {v}\n" for k, v in self.tls.files().items())
                   if self.tls else "")
            )  # fmt: skip
            with (directory / "sentinel.log").open("ab") as log:  # the child keeps its own copy of the fd
                self._sentinels.append(
                    subprocess.Popen(
                        ["redis-server", str(conf), "--sentinel"],
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,
                    )
                )
        return self

    def sentinel(self, i: int = 0) -> redis.Redis:
        port = self.sentinel_ports[i]
        if self.tls is None:
            return redis.Redis(port=port, socket_timeout=1, decode_responses=True)
        return self.tls.redis(port, decode_responses=True)

    def settled(self) -> bool:
        """Every sentinel sees the master, its replica and the two other sentinels."""
        try:
            for i in range(3):
                with self.sentinel(i) as s:
                    state = s.sentinel_master(self.MASTER)
                assert isinstance(state, dict)
                if int(state["num-slaves"]) < 1 or int(state["num-other-sentinels"]) < 2:
                    return False
            return True
        except (redis.RedisError, OSError):
            return False

    def master_port(self) -> int | None:
        try:
            with self.sentinel(0) as s:
                addr = s.sentinel_get_master_addr_by_name(self.MASTER)
        except (redis.RedisError, OSError):
            return None
        return int(addr[1]) if isinstance(addr, tuple) else None

    def stop(self) -> None:
        for proc in self._sentinels:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
        self.replica.stop(hard=True)
        self.master.stop(hard=True)
