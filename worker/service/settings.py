"""Every setting of the worker, read from an environment mapping when asked (never at import time).

`VARIABLES` documents each variable with its default; the README's table and the docker-compose test are
checked against it, so a variable cannot be renamed in one place only.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from typing import NamedTuple

from worker.core.config import CLONES_DIR_VAR, DEFAULT_CLONES_DIR, DEFAULT_TEMPLATE_DIR, TEMPLATE_DIR_VAR, RootfsConfig
from worker.errors import InvalidArgument
from worker.service.queues import check_host


class Variable(NamedTuple):
    name: str
    default: str
    meaning: str


VARIABLES: tuple[Variable, ...] = (
    Variable(TEMPLATE_DIR_VAR, DEFAULT_TEMPLATE_DIR, "where the template stacks live (`<dir>/<stack>/rootfs.ext4`)"),
    Variable(CLONES_DIR_VAR, DEFAULT_CLONES_DIR, "where per-VM clones are written (`<dir>/<vm>/rootfs.ext4`)"),
    Variable("CELERY_BROKER_URL", "redis://localhost:6379/0", "Redis broker; also holds the host heartbeats"),
    Variable("CELERY_RESULT_BACKEND", "redis://localhost:6379/0", "Redis result backend"),
    Variable("ROOTFS_HOST", "the machine's host name", "the host this worker serves; names its queues"),
    Variable("ROOTFS_CONCURRENCY", "4", "pool processes; one may be warming, the rest serve clones"),
    Variable("ROOTFS_TASK_TIME_LIMIT", "1800", "hard time limit of one task, seconds"),
    Variable(
        "ROOTFS_TASK_SOFT_TIME_LIMIT",
        "time limit - 30 (9/10 of it when under 60)",
        "soft time limit (raises inside the task), seconds",
    ),
    Variable("ROOTFS_RETRY_MAX", "5", "retries of a transient failure before it is reported"),
    Variable("ROOTFS_RETRY_BASE", "1.0", "first retry delay, seconds; doubles each retry (with jitter)"),
    Variable("ROOTFS_RETRY_CAP", "60.0", "longest retry delay, seconds"),
    Variable(
        "ROOTFS_VISIBILITY_TIMEOUT",
        "time limit + retry cap + 300",
        "seconds before an unacknowledged job is redelivered; must exceed time limit + retry cap",
    ),
    Variable("ROOTFS_RESTORE_INTERVAL", "10", "seconds between sweeps that redeliver jobs of dead workers"),
    Variable("ROOTFS_RESULT_EXPIRES", "86400", "seconds a result stays in Redis"),
    Variable("ROOTFS_WARM_INTERVAL", "300", "seconds between warm-ups of every live host (beat)"),
    Variable("ROOTFS_HEARTBEAT_INTERVAL", "10", "seconds between a worker's announcements of its host"),
    Variable("ROOTFS_WARM_ON_START", "1", "warm this host's hashes when the worker starts (0 to disable)"),
)


@dataclass(frozen=True)
class Settings:
    rootfs: RootfsConfig
    broker_url: str
    result_backend: str
    host: str
    concurrency: int
    time_limit: int
    soft_time_limit: int
    retry_max: int
    retry_base: float
    retry_cap: float
    visibility_timeout: int
    restore_interval: int
    result_expires: int
    warm_interval: float
    heartbeat_interval: float
    warm_on_start: bool

    @property
    def heartbeat_ttl(self) -> int:
        """A host is live while its last three announcements could still be in flight."""
        return max(3, int(self.heartbeat_interval * 3))

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        reader = _Reader(env)
        time_limit = reader.integer("ROOTFS_TASK_TIME_LIMIT", 1800, minimum=1)
        retry_cap = reader.real("ROOTFS_RETRY_CAP", 60.0, minimum=0.0)
        host = env.get("ROOTFS_HOST") or socket.gethostname()
        try:
            check_host(host)
        except InvalidArgument as exc:
            raise ValueError(f"ROOTFS_HOST: {exc}") from None
        settings = cls(
            rootfs=RootfsConfig.from_env(env),
            broker_url=env.get("CELERY_BROKER_URL") or "redis://localhost:6379/0",
            result_backend=env.get("CELERY_RESULT_BACKEND") or "redis://localhost:6379/0",
            host=host,
            concurrency=reader.integer("ROOTFS_CONCURRENCY", 4, minimum=1),
            time_limit=time_limit,
            soft_time_limit=reader.integer("ROOTFS_TASK_SOFT_TIME_LIMIT", _soft_default(time_limit), minimum=1),
            retry_max=reader.integer("ROOTFS_RETRY_MAX", 5, minimum=0),
            retry_base=reader.real("ROOTFS_RETRY_BASE", 1.0, minimum=0.0),
            retry_cap=retry_cap,
            visibility_timeout=reader.integer(
                "ROOTFS_VISIBILITY_TIMEOUT", time_limit + int(retry_cap) + 300, minimum=1
            ),
            restore_interval=reader.integer("ROOTFS_RESTORE_INTERVAL", 10, minimum=1),
            result_expires=reader.integer("ROOTFS_RESULT_EXPIRES", 86400, minimum=1),
            warm_interval=reader.real("ROOTFS_WARM_INTERVAL", 300.0, minimum=1.0),
            heartbeat_interval=reader.real("ROOTFS_HEARTBEAT_INTERVAL", 10.0, minimum=0.1),
            warm_on_start=reader.flag("ROOTFS_WARM_ON_START", True),
        )
        settings.check()
        return settings

    def check(self) -> None:
        """Refuse settings under which Redis would hand a running or waiting job to a second worker."""
        if self.soft_time_limit > self.time_limit:
            raise ValueError("ROOTFS_TASK_SOFT_TIME_LIMIT must not exceed ROOTFS_TASK_TIME_LIMIT")
        if self.visibility_timeout <= self.time_limit + self.retry_cap:
            raise ValueError(
                f"ROOTFS_VISIBILITY_TIMEOUT={self.visibility_timeout} must exceed the task time limit plus the "
                f"longest retry delay ({self.time_limit} + {self.retry_cap:g}): Redis would redeliver a job "
                "that is still running or waiting for its retry"
            )


def _soft_default(time_limit: int) -> int:
    """30 s of grace before the hard limit; a short limit keeps 9/10 of itself rather than nothing."""
    return time_limit - 30 if time_limit > 60 else max(1, time_limit * 9 // 10)


class _Reader:
    def __init__(self, env: Mapping[str, str]) -> None:
        self._env = env

    def integer(self, name: str, default: int, *, minimum: int) -> int:
        return int(self._number(name, default, minimum, int))

    def real(self, name: str, default: float, *, minimum: float) -> float:
        return self._number(name, default, minimum, float)

    def flag(self, name: str, default: bool) -> bool:
        raw = self._env.get(name, "").strip().lower()
        if not raw:
            return default
        if raw in ("1", "true", "yes", "on"):
            return True
        if raw in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"{name}={raw!r}: expected 1/0, true/false, yes/no or on/off")

    def _number(self, name: str, default: float, minimum: float, kind: type[int] | type[float]) -> float:
        raw = self._env.get(name, "").strip()
        if not raw:
            return default
        try:
            value = kind(raw)
        except ValueError:
            raise ValueError(f"{name}={raw!r}: expected a number") from None
        if value < minimum:
            raise ValueError(f"{name}={raw!r}: must be at least {minimum}")
        return value
