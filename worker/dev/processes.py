"""Local processes for the demo, the tests and the benchmarks: a private redis-server, workers, a beat.

Each process is started in its own session and ended by us alone (TERM, then KILL): nothing here ever
touches a Redis or worker it did not start.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

import redis


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def redis_answers(url: str, *, timeout: float = 1.0) -> bool:
    client = redis.Redis.from_url(url, socket_connect_timeout=timeout, socket_timeout=timeout)
    try:
        return bool(client.ping())
    except (redis.RedisError, OSError):
        return False
    finally:
        client.close()


class RedisServer:
    """A redis-server of our own on a free port; `appendonly` for tests that restart it and lose nothing."""

    def __init__(
        self,
        workdir: Path,
        *,
        port: int | None = None,
        appendonly: bool = False,
        extra: Sequence[str] = (),
        ready: Callable[[], bool] | None = None,
    ) -> None:
        self.workdir = workdir
        self.port = port or free_port()
        self.appendonly = appendonly
        #: More redis-server arguments (TLS, ACL file, replicaof, --sentinel...), and how to tell it answers
        #: when a plain PING on `url` cannot (a TLS-only server, a server whose default user is off).
        self.extra = list(extra)
        self.ready = ready
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        exe = shutil.which("redis-server")
        if exe is None:
            raise RuntimeError("redis-server is not installed (scripts/bootstrap.sh installs it)")
        self.workdir.mkdir(parents=True, exist_ok=True)
        args = [
            exe,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--dir",
            str(self.workdir),
            "--appendonly",
            "yes" if self.appendonly else "no",
            "--appendfsync",
            "always",
            "--maxmemory-policy",
            "noeviction",
            "--daemonize",
            "no",
            *self.extra,
        ]
        with (self.workdir / "redis.log").open("ab") as log:  # the child keeps its own copy of the fd
            self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 10
        answers = self.ready or (lambda: redis_answers(self.url, timeout=0.2))
        while not answers():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server on port {self.port} did not start; see {self.workdir}/redis.log")
            time.sleep(0.05)
        return self

    def stop(self, *, hard: bool = False) -> None:
        if self.proc is not None:
            _end(self.proc, hard=hard)
            self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()


class CeleryProcess:
    """`celery -A worker worker|beat` with an environment of our choosing and its output in a log file."""

    def __init__(
        self, role: str, env: Mapping[str, str], logfile: Path, *, args: list[str] | None = None, app: str = "worker"
    ) -> None:
        self.role = role
        self.app = app
        self.env = dict(env)
        self.logfile = logfile
        self.args = args or []
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> CeleryProcess:
        cmd = [sys.executable, "-m", "celery", "-A", self.app, self.role, "--loglevel", "INFO", *self.args]
        self.logfile.parent.mkdir(parents=True, exist_ok=True)
        with self.logfile.open("ab") as out:  # the child keeps its own copy of the fd
            self.proc = subprocess.Popen(
                cmd, env=self.env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, cwd=_project_root()
            )
        return self

    def wait_ready(self, *, timeout: float = 60.0, marker: str = "ready.") -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"celery {self.role} exited with {self.proc.returncode}:\n{self.log()[-4000:]}")
            if marker in self.log():
                return
            time.sleep(0.1)
        raise RuntimeError(f"celery {self.role} not ready within {timeout}s:\n{self.log()[-4000:]}")

    def log(self) -> str:
        try:
            return self.logfile.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def kill_hard(self) -> None:
        """SIGKILL the whole process group at once: main process and pool children, no goodbye."""
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
            self.proc = None

    def stop(self) -> None:
        if self.proc is not None:
            _end(self.proc, hard=False)
            self.proc = None


def worker_env(
    *, broker_url: str, host: str, template_dir: Path, clones_dir: Path, extra: Mapping[str, str] | None = None
) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ROOTFS_", "CELERY_", "MICROVM_"))}
    env.update(
        {
            "CELERY_BROKER_URL": broker_url,
            "CELERY_RESULT_BACKEND": broker_url,
            "ROOTFS_HOST": host,
            "MICROVM_ROOTFS_TEMPLATE_DIR": str(template_dir),
            "MICROVM_ROOTFS_CLONES_DIR": str(clones_dir),
            "PYTHONPATH": os.pathsep.join(filter(None, [str(_project_root()), env.get("PYTHONPATH", "")])),
        }
    )
    env.update(extra or {})
    return env


@contextlib.contextmanager
def running(*procs: CeleryProcess) -> Iterator[None]:
    try:
        for p in procs:
            p.start()
        yield
    finally:
        for p in reversed(procs):
            p.stop()


def _end(proc: subprocess.Popen[bytes], *, hard: bool) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL if hard else signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    # Pool children left behind by a main process that died first.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


def _project_root() -> str:
    return str(Path(__file__).resolve().parents[2])
