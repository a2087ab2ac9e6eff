"""Per-process singletons of a worker: its settings, registry and Redis client, built on first use."""

from __future__ import annotations

import functools
import os

import redis

from worker.core.registry import RootfsRegistry
from worker.service.connection import redis_for
from worker.service.settings import Settings


@functools.cache
def settings() -> Settings:
    return Settings.from_env(os.environ)


@functools.cache
def registry() -> RootfsRegistry:
    return RootfsRegistry(settings().rootfs)


@functools.cache
def redis_client() -> redis.Redis:
    # The broker's Redis with the broker's TLS, ACL user and Sentinel settings (heartbeats live there).
    return redis_for(settings())
