"""Every setting of the worker, each defined once, read from an environment mapping when asked (never at import).

`SETTINGS` is the single definition of each variable: its name, the `Settings` field it fills, its parser, its
typed default (or a rule deriving it from settings read before it) and its documentation. `Settings.from_env`,
the README's table and the docker-compose test are all derived from or checked against it, so a variable cannot
be renamed, re-defaulted or documented in one place only.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Generic, TypeVar

from worker.core.config import CLONES_DIR_VAR, DEFAULT_CLONES_DIR, DEFAULT_TEMPLATE_DIR, TEMPLATE_DIR_VAR, RootfsConfig
from worker.core.space import DEFAULT_RESERVE, MIN_FREE_VAR, Reserve
from worker.errors import InvalidArgument
from worker.service.queues import check_host

T = TypeVar("T")

#: Values read so far, by field name: what a derived default may depend on.
Read = Mapping[str, Any]


@dataclass(frozen=True)
class Setting(Generic[T]):
    """One environment variable: where it goes, how it is parsed, what it defaults to, what it means."""

    env: str
    field: str
    parse: Callable[[str], T]
    default: T | Callable[[Read], T]
    doc: str
    #: How a derived default reads in the README (a typed default is shown as itself).
    default_doc: str | None = None

    @property
    def documented_default(self) -> str:
        if self.default_doc is not None:
            return self.default_doc
        return f"{self.default:g}" if isinstance(self.default, float) else str(self.default)

    def read(self, env: Mapping[str, str], done: Read) -> T:
        raw = env.get(self.env, "").strip()
        if not raw:
            return self.default(done) if callable(self.default) else self.default
        try:
            return self.parse(raw)
        except ValueError as exc:
            raise ValueError(f"{self.env}={raw!r}: {exc}") from None


# ---------------------------------------------------------------------------------------------------- parsers


def integer(minimum: int) -> Callable[[str], int]:
    def parse(raw: str) -> int:
        try:
            value = int(raw)
        except ValueError:
            raise ValueError("expected a whole number") from None
        if value < minimum:
            raise ValueError(f"must be at least {minimum}")
        return value

    return parse


def real(minimum: float) -> Callable[[str], float]:
    def parse(raw: str) -> float:
        try:
            value = float(raw)
        except ValueError:
            raise ValueError("expected a number") from None
        if not value >= minimum:  # also refuses nan
            raise ValueError(f"must be at least {minimum:g}")
        return value

    return parse


def flag(raw: str) -> bool:
    low = raw.lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise ValueError("expected 1/0, true/false, yes/no or on/off")


def text(raw: str) -> str:
    return raw


def optional_path(raw: str) -> Path | None:
    return Path(raw)


def optional_text(raw: str) -> str | None:
    return raw


def host_name(raw: str) -> str:
    try:
        return check_host(raw)
    except InvalidArgument as exc:
        raise ValueError(str(exc)) from None


def _this_host(_: Read) -> str:
    return host_name(socket.gethostname())


def _soft_default(done: Read) -> int:
    """30 s of grace before the hard limit; a short limit keeps 9/10 of itself rather than nothing."""
    limit: int = done["time_limit"]
    return limit - 30 if limit > 60 else max(1, limit * 9 // 10)


def _visibility_default(done: Read) -> int:
    return int(done["time_limit"] + done["retry_cap"] + 300)


def port(raw: str) -> int:
    value = integer(1)(raw)
    if value > 65535:
        raise ValueError("must be at most 65535")
    return value


def _run_dir_default(done: Read) -> Path:
    """Per host, so that two workers on one machine (tests, a demo) never share heartbeat or metric files."""
    return Path("/tmp") / f"rootfs-worker-{done['host']}"


def _max_age_default(done: Read) -> float:
    """Three missed heartbeats, like the host's announcement in Redis (Settings.heartbeat_ttl)."""
    return max(3.0, 3 * float(done["heartbeat_interval"]))


SETTINGS: tuple[Setting[Any], ...] = (
    Setting(
        TEMPLATE_DIR_VAR,
        "template_dir",
        Path,
        Path(DEFAULT_TEMPLATE_DIR),
        "where the template stacks live (`<dir>/<stack>/rootfs.ext4`)",
    ),
    Setting(
        CLONES_DIR_VAR,
        "clones_dir",
        Path,
        Path(DEFAULT_CLONES_DIR),
        "where per-VM clones are written (`<dir>/<vm>/rootfs.ext4`)",
    ),
    Setting(
        MIN_FREE_VAR,
        "min_free",
        Reserve.parse,
        DEFAULT_RESERVE,
        "space a copy must leave free on the clones filesystem: bytes (`10G`) or a percentage of it (`5%`);"
        " a clone that would eat into it fails at once with InsufficientSpace",
    ),
    Setting(
        "CELERY_BROKER_URL",
        "broker_url",
        text,
        "redis://localhost:6379/0",
        "Redis broker; also holds the host heartbeats",
    ),
    Setting("CELERY_RESULT_BACKEND", "result_backend", text, "redis://localhost:6379/0", "Redis result backend"),
    # Production Redis (README "Production Redis"): TLS, Sentinel. ACL users go in the URLs (user:password@).
    Setting(
        "ROOTFS_REDIS_CA",
        "redis_ca",
        optional_path,
        None,
        "CA the Redis server's certificate must chain to; required by `rediss://`, turns TLS on for `sentinel://`",
        "unset",
    ),
    Setting(
        "ROOTFS_REDIS_CERT",
        "redis_cert",
        optional_path,
        None,
        "client certificate, for a Redis that demands one (`tls-auth-clients yes`); with `ROOTFS_REDIS_KEY`",
        "unset",
    ),
    Setting("ROOTFS_REDIS_KEY", "redis_key", optional_path, None, "private key of `ROOTFS_REDIS_CERT`", "unset"),
    Setting(
        "ROOTFS_REDIS_MASTER_NAME",
        "redis_master_name",
        optional_text,
        None,
        "Sentinel master name; required by (and only allowed with) `sentinel://` URLs",
        "unset",
    ),
    Setting(
        "ROOTFS_HOST",
        "host",
        host_name,
        _this_host,
        "the host this worker serves; names its queues",
        "the machine's host name",
    ),
    Setting(
        "ROOTFS_CONCURRENCY", "concurrency", integer(1), 4, "pool processes; one may be warming, the rest serve clones"
    ),
    Setting("ROOTFS_TASK_TIME_LIMIT", "time_limit", integer(1), 1800, "hard time limit of one task, seconds"),
    Setting(
        "ROOTFS_TASK_SOFT_TIME_LIMIT",
        "soft_time_limit",
        integer(1),
        _soft_default,
        "soft time limit (raises inside the task), seconds",
        "time limit - 30 (9/10 of it when under 60)",
    ),
    Setting("ROOTFS_RETRY_MAX", "retry_max", integer(0), 5, "retries of a transient failure before it is reported"),
    Setting(
        "ROOTFS_RETRY_BASE",
        "retry_base",
        real(0.0),
        1.0,
        "first retry delay, seconds; doubles each retry (with jitter)",
    ),
    Setting("ROOTFS_RETRY_CAP", "retry_cap", real(0.0), 60.0, "longest retry delay, seconds"),
    Setting(
        "ROOTFS_VISIBILITY_TIMEOUT",
        "visibility_timeout",
        integer(1),
        _visibility_default,
        "seconds before an unacknowledged job is redelivered; must exceed time limit + retry cap",
        "time limit + retry cap + 300",
    ),
    Setting(
        "ROOTFS_RESTORE_INTERVAL",
        "restore_interval",
        integer(1),
        10,
        "seconds between sweeps that redeliver jobs of dead workers",
    ),
    Setting("ROOTFS_RESULT_EXPIRES", "result_expires", integer(1), 86400, "seconds a result stays in Redis"),
    Setting(
        "ROOTFS_WARM_INTERVAL", "warm_interval", real(1.0), 300.0, "seconds between warm-ups of every live host (beat)"
    ),
    Setting(
        "ROOTFS_HEARTBEAT_INTERVAL",
        "heartbeat_interval",
        real(0.1),
        10.0,
        "seconds between a worker's announcements of its host",
    ),
    Setting(
        "ROOTFS_WARM_ON_START",
        "warm_on_start",
        flag,
        True,
        "warm this host's hashes when the worker starts (0 to disable)",
        "1",
    ),
    Setting(
        "ROOTFS_METRICS_PORT",
        "metrics_port",
        port,
        None,
        "port of this worker's Prometheus metrics (`http://<host>:<port>/metrics`, all interfaces)",
        "unset (no metrics server)",
    ),
    Setting(
        "ROOTFS_RUN_DIR",
        "run_dir",
        Path,
        _run_dir_default,
        "runtime state: the heartbeat files `rootfs-worker health` reads, the pool processes' metric files "
        "(a tmpfs such as /run suits; stale metric files are removed at start)",
        "`/tmp/rootfs-worker-<host>`",
    ),
    Setting(
        "ROOTFS_LIVENESS_MAX_AGE",
        "liveness_max_age",
        real(1.0),
        _max_age_default,
        "seconds after which a heartbeat file no longer counts as live (`rootfs-worker health --live`)",
        "3 x heartbeat interval (at least 3)",
    ),
    # Message signing (optional; needs the `signing` extra): all three or none.
    Setting(
        "ROOTFS_SIGNING_KEY",
        "signing_key",
        optional_path,
        None,
        "private key (PEM) this process signs its messages with; turns signing on",
        "unset",
    ),
    Setting(
        "ROOTFS_SIGNING_CERT",
        "signing_cert",
        optional_path,
        None,
        "certificate (PEM) of `ROOTFS_SIGNING_KEY`, sent with every message",
        "unset",
    ),
    Setting(
        "ROOTFS_SIGNING_TRUSTED",
        "signing_trusted",
        text,
        "",
        "glob of the certificates (PEM) whose messages this process accepts, e.g. `/etc/rootfs/trusted/*.pem`",
        "unset",
    ),
)


@dataclass(frozen=True)
class Settings:
    """One field per entry of SETTINGS, in the same order (a test checks it)."""

    template_dir: Path
    clones_dir: Path
    min_free: Reserve
    broker_url: str
    result_backend: str
    redis_ca: Path | None
    redis_cert: Path | None
    redis_key: Path | None
    redis_master_name: str | None
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
    metrics_port: int | None
    run_dir: Path
    liveness_max_age: float
    signing_key: Path | None
    signing_cert: Path | None
    signing_trusted: str

    @property
    def rootfs(self) -> RootfsConfig:
        """The core's view: the two directories it shares with the Rust runtime, and the space reserve."""
        return RootfsConfig(self.template_dir, self.clones_dir, self.min_free)

    @property
    def heartbeat_ttl(self) -> int:
        """A host is live while its last three announcements could still be in flight."""
        return max(3, int(self.heartbeat_interval * 3))

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """Every setting from `env` (os.environ when None); a bad value raises ValueError naming the variable."""
        env = os.environ if env is None else env
        done: dict[str, Any] = {}
        for setting in SETTINGS:
            done[setting.field] = setting.read(env, done)
        settings = cls(**done)
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
        self._check_redis()
        self._check_signing()

    def _check_redis(self) -> None:
        """Refuse TLS and Sentinel settings that would silently not be used, or not verify the server."""
        if (self.redis_cert is None) != (self.redis_key is None):
            raise ValueError("ROOTFS_REDIS_CERT and ROOTFS_REDIS_KEY go together: set both or neither")
        for var, url in (("CELERY_BROKER_URL", self.broker_url), ("CELERY_RESULT_BACKEND", self.result_backend)):
            scheme = url.partition("://")[0].lower()
            if scheme == "rediss" and self.redis_ca is None:
                # kombu would otherwise connect with ssl_cert_reqs=CERT_NONE: encrypted, but to anyone.
                raise ValueError(f"{var} is rediss:// but ROOTFS_REDIS_CA is unset: the server could not be verified")
            if scheme == "redis" and self.redis_ca is not None:
                raise ValueError(f"ROOTFS_REDIS_CA is set but {var} is redis:// (clear text): use rediss://")
            if scheme == "sentinel" and not self.redis_master_name:
                raise ValueError(f"{var} is sentinel:// but ROOTFS_REDIS_MASTER_NAME is unset")
        urls = (self.broker_url, self.result_backend)
        if self.redis_master_name and not any(u.lower().startswith("sentinel://") for u in urls):
            raise ValueError("ROOTFS_REDIS_MASTER_NAME is set but neither URL is sentinel://")

    def _check_signing(self) -> None:
        given = [self.signing_key is not None, self.signing_cert is not None, bool(self.signing_trusted)]
        if any(given) and not all(given):
            raise ValueError(
                "message signing needs ROOTFS_SIGNING_KEY, ROOTFS_SIGNING_CERT and ROOTFS_SIGNING_TRUSTED together"
            )

    @property
    def signing(self) -> bool:
        return self.signing_key is not None


def field_names() -> list[str]:
    """The Settings dataclass's fields, in order: SETTINGS must fill exactly these."""
    return [f.name for f in fields(Settings)]


def markdown_table() -> str:
    """The README's configuration table, derived from SETTINGS (the README must contain it verbatim)."""
    rows = ["| variable | default | meaning |", "|---|---|---|"]
    for s in SETTINGS:
        default = s.documented_default
        shown = f"`{default}`" if s.default_doc is None or default.isdigit() else default
        rows.append(f"| `{s.env}` | {shown} | {s.doc} |")
    return "\n".join(rows) + "\n"
