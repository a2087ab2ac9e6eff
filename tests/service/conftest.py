"""Fixtures of the production-Redis tests (TLS, ACL, Sentinel, signing)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping

import pytest

from tests.prodredis import client_for
from worker.client import RootfsClient

MakeClient = Callable[[Mapping[str, str]], RootfsClient]


@pytest.fixture
def make_client() -> Iterator[MakeClient]:
    """Factory: `make_client(env)` gives a scheduler's client configured from env, shut at the end of the test."""
    with contextlib.ExitStack() as stack:
        yield lambda env: stack.enter_context(client_for(env))
