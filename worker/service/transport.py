"""kombu's Redis transport with one defect mended: a lost connection must not kill the worker.

kombu 5.7: when Redis goes away while a late-acknowledged job is running, prefetched or waiting for its retry
ETA, the consumer closes its channel after the connection's client is already gone; the channel then tries
to requeue its unacknowledged messages, builds connection parameters from `None`, and the AttributeError
ends the worker ("Unrecoverable error"). Raising a connection error there instead lets kombu's own handling
take over: the close is skipped, the worker reconnects, and the messages, still in Redis' unacked set, come
back through the visibility sweep. Selected with `broker_transport`; the broker URL stays `redis://`.
"""

from __future__ import annotations

from typing import Any

import redis
from kombu.transport import redis as kombu_redis


class Channel(kombu_redis.Channel):  # type: ignore[misc]
    def _connparams(self, asynchronous: bool = False) -> Any:
        if self.connection is None or self.connection.client is None:
            raise redis.ConnectionError("broker connection already closed")
        return super()._connparams(asynchronous=asynchronous)


class Transport(kombu_redis.Transport):  # type: ignore[misc]
    Channel = Channel


# Sentinel (issue 13): a `sentinel://` broker URL needs kombu's SentinelChannel, which finds the master through
# the sentinels. Ours is both: the mended Channel above first in the MRO, so every fix made to it applies to
# Sentinel too, then kombu's SentinelChannel for the pool. Selected in worker/celery.py by the URL's scheme.
class SentinelChannel(Channel, kombu_redis.SentinelChannel):  # type: ignore[misc]
    pass


class SentinelTransport(kombu_redis.SentinelTransport):  # type: ignore[misc]
    Channel = SentinelChannel
