"""How every process reaches Redis: one place turns the settings into TLS options, Sentinel options and clients.

Celery (broker and result backend), the heartbeats and the client's `hosts()` must all use the same TLS, ACL
user and Sentinel settings, or one of them ends up on a different server, in clear text, or as the wrong user.
Celery gets its options from `celery_options`; everything else gets its redis-py client from `make_redis`.
"""

from __future__ import annotations

import ssl
from collections.abc import Mapping
from typing import Any
from urllib.parse import unquote, urlsplit

import redis
from redis.sentinel import Sentinel

from worker.service.settings import Settings

#: Seconds to wait for a TCP/TLS connection, and for a reply, on our own clients.
CONNECT_TIMEOUT_S = 5.0
REPLY_TIMEOUT_S = 10.0


def scheme(url: str) -> str:
    return url.partition("://")[0].lower()


def tls_options(settings: Settings) -> dict[str, Any]:
    """redis-py's TLS keyword arguments (also what kombu's `broker_use_ssl` and Celery's `redis_backend_use_ssl`
    take): the server must present a certificate chaining to ROOTFS_REDIS_CA (CERT_REQUIRED, host name checked)."""
    if settings.redis_ca is None:
        return {}
    options: dict[str, Any] = {"ssl_cert_reqs": ssl.CERT_REQUIRED, "ssl_ca_certs": str(settings.redis_ca)}
    if settings.redis_cert is not None and settings.redis_key is not None:
        options["ssl_certfile"] = str(settings.redis_cert)
        options["ssl_keyfile"] = str(settings.redis_key)
    return options


def celery_options(settings: Settings) -> dict[str, Any]:
    """The Celery settings that carry TLS and Sentinel for the broker and the result backend.

    Transport options (`master_name`) are merged into the app's own by the caller."""
    conf: dict[str, Any] = {}
    if uses_tls(settings, settings.broker_url):
        conf["broker_use_ssl"] = tls_options(settings)
    if uses_tls(settings, settings.result_backend):
        conf["redis_backend_use_ssl"] = tls_options(settings)
    return conf


def uses_tls(settings: Settings, url: str) -> bool:
    """rediss:// always (Settings.check demands the CA); sentinel:// when a CA is given: sentinels and masters
    are then reached over TLS (the masters through kombu's and Celery's SentinelManagedSSLConnection)."""
    return scheme(url) == "rediss" or (scheme(url) == "sentinel" and settings.redis_ca is not None)


def sentinel_transport_options(settings: Settings, url: str) -> dict[str, Any]:
    """kombu's SentinelChannel and Celery's SentinelBackend both read `master_name` from their transport options;
    the sentinels themselves get short timeouts, so a dead sentinel is skipped quickly during a failover."""
    if scheme(url) != "sentinel":
        return {}
    return {"master_name": settings.redis_master_name, "sentinel_kwargs": sentinel_kwargs(tls_options(settings))}


def sentinel_kwargs(tls: Mapping[str, Any] | None) -> dict[str, Any]:
    """How to talk to the sentinels themselves: short timeouts, and TLS when the deployment uses it (Redis links
    sentinels to each other and to the masters with the same TLS setting, so TLS masters mean TLS sentinels)."""
    return {"socket_connect_timeout": 1.0, "socket_timeout": 1.0, **({"ssl": True, **tls} if tls else {})}


def make_redis(
    url: str,
    *,
    tls: Mapping[str, Any] | None = None,
    master_name: str | None = None,
    socket_timeout: float = REPLY_TIMEOUT_S,
) -> redis.Redis:
    """A redis-py client for `url` (redis://, rediss://, or `sentinel://h1:p1;sentinel://h2:p2` with `master_name`),
    with the ACL user and password of the URL and the given TLS options: the one way our own code reaches Redis."""
    common: dict[str, Any] = {"socket_connect_timeout": CONNECT_TIMEOUT_S, "socket_timeout": socket_timeout}
    if scheme(url) != "sentinel":
        return redis.Redis.from_url(url, **common, **dict(tls or {}))
    if not master_name:
        raise ValueError("a sentinel:// URL needs a master name (ROOTFS_REDIS_MASTER_NAME)")
    sentinels: list[tuple[str, int]] = []
    first = urlsplit(url.split(";")[0])
    for chunk in url.split(";"):
        part = urlsplit(chunk.strip())
        sentinels.append((part.hostname or "127.0.0.1", part.port or 26379))
    db = int((first.path or "/0").strip("/") or 0)
    auth = {
        "username": unquote(first.username) if first.username else None,
        "password": unquote(first.password) if first.password else None,
    }
    sentinel = Sentinel(sentinels, sentinel_kwargs=sentinel_kwargs(tls), **common, db=db)  # type: ignore[no-untyped-call]
    # The master's connections: redis-py's SentinelManagedSSLConnection when TLS is on.
    master_tls = {"ssl": True, **tls} if tls else {}
    client: redis.Redis = sentinel.master_for(master_name, **auth, **master_tls)  # type: ignore[no-untyped-call]
    return client


def close_redis(client: redis.Redis) -> None:
    """Close a client from make_redis, and for Sentinel also its connections to the sentinels themselves."""
    client.close()
    for sentinel in getattr(getattr(client.connection_pool, "sentinel_manager", None), "sentinels", ()):
        sentinel.close()


def redis_for(settings: Settings) -> redis.Redis:
    """The broker's Redis (where heartbeats live), reached exactly as Celery reaches it."""
    url = settings.broker_url
    return make_redis(
        url,
        tls=tls_options(settings) if uses_tls(settings, url) else None,
        master_name=settings.redis_master_name if scheme(url) == "sentinel" else None,
    )


def redis_for_app(conf: Any) -> redis.Redis:
    """The broker's Redis from a configured app (what the client has): the same options Celery was given."""
    url = str(conf.broker_url)
    transport = conf.broker_transport_options or {}
    return make_redis(url, tls=conf.broker_use_ssl or None, master_name=transport.get("master_name"))
