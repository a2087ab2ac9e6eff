"""Before a worker or the beat starts: tell "Redis is away, keep trying" from "this can never work, exit".

Celery retries a broker connection forever at start (broker_connection_retry_on_startup, no max retries), and
kombu counts a refused password as a connection error like any other: a worker with a wrong password, a wrong
CA, or no TLS towards a TLS-only Redis would log the same retry line every few seconds for ever, and hold no
job. That is right for an outage (Redis restarting, a failover, a network cut: it will come back) and wrong
for a misconfiguration (it never will). So one PING is made first with exactly the settings Celery will use:

- it answers: start;
- no answer at all (refused, timed out, no master elected yet): start anyway and let Celery keep trying;
- an answer that says the configuration is wrong (bad user or password, a certificate that does not verify,
  a plain client on a TLS port): log one clear sentence and exit with status 78 (EX_CONFIG), which a
  supervisor can be told not to restart (systemd: `RestartPreventExitStatus=78`).
"""

from __future__ import annotations

import glob
import logging
import socket
import ssl
from typing import Any
from urllib.parse import urlsplit

import redis
from celery.signals import beat_init, worker_init
from kombu.utils.url import maybe_sanitize_url

from worker.service import runtime
from worker.service.connection import close_redis, make_redis, scheme, tls_options, uses_tls
from worker.service.settings import Settings

log = logging.getLogger(__name__)

#: sysexits.h EX_CONFIG: a configuration error, not worth restarting for.
EXIT_MISCONFIGURED = 78


class RedisMisconfigured(Exception):
    """Redis answered in a way that says our settings can never work."""


def _ssl_failure(exc: BaseException) -> ssl.SSLError | None:
    seen: BaseException | None = exc
    for _ in range(5):
        if seen is None:
            return None
        if isinstance(seen, ssl.SSLError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def speaks_tls(host: str, port: int, *, timeout: float = 3.0) -> bool:
    """Does the server at host:port answer a TLS handshake (without checking who it is)?"""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    try:
        with socket.create_connection((host, port), timeout=timeout) as raw, context.wrap_socket(raw) as tls:
            tls.getpeercert(binary_form=True)
        return True
    except ssl.SSLError as exc:
        # The server talks TLS but wants a client certificate: still a TLS server.
        return "alert" in str(exc).lower() and "version" not in str(exc).lower()
    except OSError:
        return False


def diagnose(url: str, *, tls: dict[str, Any] | None, master_name: str | None) -> str | None:
    """None when Redis answered or could not be reached at all; otherwise why it will never work."""
    shown = maybe_sanitize_url(url)
    client = make_redis(url, tls=tls, master_name=master_name, socket_timeout=5.0)
    try:
        client.ping()
        return None
    except redis.AuthenticationError as exc:
        return f"Redis at {shown} refused our user or password ({exc}): check the user:password in the URL"
    except redis.exceptions.NoPermissionError as exc:
        return f"Redis at {shown} denies our ACL user ({exc}): see docs/redis-acl.conf"
    except redis.ConnectionError as exc:
        failure = _ssl_failure(exc)
        if failure is not None:
            return (
                f"TLS to Redis at {shown} failed ({failure}): the server's "
                "certificate must chain to ROOTFS_REDIS_CA (and match its host name); a server that demands a "
                "client certificate needs ROOTFS_REDIS_CERT and ROOTFS_REDIS_KEY"
            )
        if scheme(url) == "redis":
            part = urlsplit(url)
            if speaks_tls(part.hostname or "localhost", part.port or 6379):
                return (
                    f"Redis at {shown} speaks only TLS, and the URL is redis:// (clear text): use rediss:// and "
                    "set ROOTFS_REDIS_CA"
                )
        log.warning("Redis at %s not reachable yet (%s); Celery will keep trying", shown, exc)
        return None
    except redis.RedisError as exc:
        log.warning("Redis at %s answered PING with %s; starting anyway", shown, exc)
        return None
    finally:
        close_redis(client)


def check(settings: Settings) -> None:
    """Raise RedisMisconfigured for the first of the broker and the result backend that can never work."""
    for url in dict.fromkeys((settings.broker_url, settings.result_backend)):
        problem = diagnose(
            url,
            tls=tls_options(settings) if uses_tls(settings, url) else None,
            master_name=settings.redis_master_name if scheme(url) == "sentinel" else None,
        )
        if problem is not None:
            raise RedisMisconfigured(problem)


def check_signing(settings: Settings) -> None:
    """Signing on with a missing key, certificate or trust store would refuse every job, silently: refuse to start."""
    if not settings.signing:
        return
    for var, path in (("ROOTFS_SIGNING_KEY", settings.signing_key), ("ROOTFS_SIGNING_CERT", settings.signing_cert)):
        if path is None or not path.is_file():
            raise RedisMisconfigured(f"{var}={path} is not a readable file")
    if not glob.glob(settings.signing_trusted):
        raise RedisMisconfigured(f"ROOTFS_SIGNING_TRUSTED={settings.signing_trusted!r} matches no certificate")


def _check_or_exit(**_: Any) -> None:
    try:
        check_signing(runtime.settings())
        check(runtime.settings())
    except RedisMisconfigured as exc:
        log.critical("cannot start: %s", exc)
        raise SystemExit(EXIT_MISCONFIGURED) from None


# Connected here (imported by worker/celery.py): the worker's main process and the beat, before either connects.
worker_init.connect(_check_or_exit, weak=False)
beat_init.connect(_check_or_exit, weak=False)
