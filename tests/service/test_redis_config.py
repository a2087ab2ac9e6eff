"""Production Redis settings: refused when they would silently not protect, and turned into the right Celery options."""

from __future__ import annotations

import re
import ssl
from pathlib import Path

import pytest
from redis.sentinel import SentinelConnectionPool

from worker.celery import celery_config
from worker.dev.processes import free_port
from worker.service.connection import make_redis, redis_for
from worker.service.preflight import diagnose
from worker.service.settings import Settings

SENTINELS = "sentinel://u:p%40ss@10.0.0.1:26379/2;sentinel://10.0.0.2:26380;sentinel://10.0.0.3"


def _settings(**env: str) -> Settings:
    return Settings.from_env({"ROOTFS_HOST": "hv-1", **env})


@pytest.mark.parametrize(
    ("env", "says"),
    [
        ({"CELERY_BROKER_URL": "rediss://r:6379/0"}, "ROOTFS_REDIS_CA is unset"),
        ({"ROOTFS_REDIS_CA": "/ca.pem"}, "redis:// (clear text)"),
        (
            {"CELERY_BROKER_URL": "rediss://r/0", "CELERY_RESULT_BACKEND": "rediss://r/0", "ROOTFS_REDIS_CA": "/c",
             "ROOTFS_REDIS_CERT": "/cert.pem"},
            "ROOTFS_REDIS_CERT and ROOTFS_REDIS_KEY go together",
        ),
        ({"CELERY_BROKER_URL": SENTINELS}, "ROOTFS_REDIS_MASTER_NAME is unset"),
        ({"ROOTFS_REDIS_MASTER_NAME": "m"}, "neither URL is sentinel://"),
        ({"ROOTFS_SIGNING_KEY": "/k.pem"}, "ROOTFS_SIGNING_CERT and ROOTFS_SIGNING_TRUSTED together"),
    ],
)  # fmt: skip
def test_settings_that_would_not_protect_are_refused(env: dict[str, str], says: str) -> None:
    """rediss:// without a CA (kombu would not verify), a CA with redis://, half a client cert, half of Sentinel
    or of signing: each is refused at start with a sentence naming the variables."""
    with pytest.raises(ValueError, match=re.escape(says)):
        _settings(**env)


def test_tls_settings_reach_broker_and_result_backend_verifying_the_server() -> None:
    """rediss:// with a CA gives Celery CERT_REQUIRED, the CA and the client pair, for broker and backend."""
    s = _settings(
        CELERY_BROKER_URL="rediss://rootfs-worker:pw@redis:6380/0",
        CELERY_RESULT_BACKEND="rediss://rootfs-worker:pw@redis:6380/0",
        ROOTFS_REDIS_CA="/etc/rootfs/ca.pem",
        ROOTFS_REDIS_CERT="/etc/rootfs/c.pem",
        ROOTFS_REDIS_KEY="/etc/rootfs/c.key",
    )
    conf = celery_config(s)
    expected = {
        "ssl_cert_reqs": ssl.CERT_REQUIRED,
        "ssl_ca_certs": "/etc/rootfs/ca.pem",
        "ssl_certfile": "/etc/rootfs/c.pem",
        "ssl_keyfile": "/etc/rootfs/c.key",
    }
    assert conf["broker_use_ssl"] == expected and conf["redis_backend_use_ssl"] == expected
    assert "broker_use_ssl" not in celery_config(_settings())  # plain stays plain
    client = redis_for(s)
    kwargs = client.connection_pool.connection_kwargs
    assert kwargs["ssl_ca_certs"] == "/etc/rootfs/ca.pem" and kwargs["username"] == "rootfs-worker"


def test_sentinel_urls_select_the_sentinel_transport_and_name_the_master_everywhere() -> None:
    """sentinel:// gives broker and backend the master name, and our own client asks the same three sentinels."""
    s = _settings(CELERY_BROKER_URL=SENTINELS, CELERY_RESULT_BACKEND=SENTINELS, ROOTFS_REDIS_MASTER_NAME="rootfs")
    conf = celery_config(s)
    assert conf["broker_transport"] == "worker.service.transport:SentinelTransport"
    assert conf["broker_transport_options"]["master_name"] == "rootfs"
    assert conf["result_backend_transport_options"]["master_name"] == "rootfs"
    assert conf["broker_transport_options"]["visibility_timeout"] == s.visibility_timeout  # ours are kept
    assert celery_config(_settings())["broker_transport"] == "worker.service.transport:Transport"
    pool = redis_for(s).connection_pool
    assert isinstance(pool, SentinelConnectionPool) and pool.service_name == "rootfs"
    sentinels = [(c.connection_pool.connection_kwargs["host"], c.connection_pool.connection_kwargs["port"])
                 for c in pool.sentinel_manager.sentinels]  # fmt: skip
    assert sentinels == [("10.0.0.1", 26379), ("10.0.0.2", 26380), ("10.0.0.3", 26379)]
    assert pool.connection_kwargs["username"] == "u" and pool.connection_kwargs["password"] == "p@ss"
    assert pool.connection_kwargs["db"] == 2


def test_a_ca_with_sentinel_urls_puts_sentinels_and_masters_on_tls() -> None:
    """sentinel:// plus ROOTFS_REDIS_CA: broker, backend, sentinels and our own client all verify against the CA."""
    s = _settings(
        CELERY_BROKER_URL=SENTINELS,
        CELERY_RESULT_BACKEND=SENTINELS,
        ROOTFS_REDIS_MASTER_NAME="rootfs",
        ROOTFS_REDIS_CA="/ca.pem",
    )
    conf = celery_config(s)
    assert conf["broker_use_ssl"]["ssl_ca_certs"] == conf["redis_backend_use_ssl"]["ssl_ca_certs"] == "/ca.pem"
    for options in (conf["broker_transport_options"], conf["result_backend_transport_options"]):
        assert options["sentinel_kwargs"]["ssl"] is True
        assert options["sentinel_kwargs"]["ssl_cert_reqs"] == ssl.CERT_REQUIRED
    pool = redis_for(s).connection_pool
    assert isinstance(pool, SentinelConnectionPool) and pool.connection_kwargs["ssl_ca_certs"] == "/ca.pem"
    sentinels = pool.sentinel_manager.sentinels
    assert all(c.connection_pool.connection_kwargs["ssl_ca_certs"] == "/ca.pem" for c in sentinels)


def test_signing_settings_sign_jobs_and_results_and_accept_nothing_else(tmp_path: Path) -> None:
    """With signing on, jobs and results use the auth serializer and only auth content is accepted."""
    s = _settings(ROOTFS_SIGNING_KEY="/k", ROOTFS_SIGNING_CERT="/c", ROOTFS_SIGNING_TRUSTED="/t/*.pem")
    conf = celery_config(s)
    assert conf["task_serializer"] == conf["result_serializer"] == "auth"
    assert conf["accept_content"] == conf["result_accept_content"] == ["auth"]
    assert conf["security_cert_store"] == "/t/*.pem"
    assert celery_config(_settings())["accept_content"] == ["json"]


def test_an_unreachable_redis_is_not_a_misconfiguration() -> None:
    """Nothing listening: the start-up check says nothing (Celery keeps trying), unlike a refused password."""
    assert diagnose(f"redis://127.0.0.1:{free_port()}/0", tls=None, master_name=None) is None


def test_a_sentinel_url_without_master_name_cannot_make_a_client() -> None:
    """make_redis refuses a sentinel:// URL without the master name instead of guessing one."""
    with pytest.raises(ValueError, match="master name"):
        make_redis(SENTINELS)
