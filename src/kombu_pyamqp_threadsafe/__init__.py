"""Thread-safe kombu pyamqp transport: many threads, one AMQP connection, one channel each."""

from .channel import Channel
from .connection import Connection
from .deadline import replies_within
from .errors import (
    ChannelOwnershipError,
    ChannelPoolLimitError,
    ConnectionClosedError,
    ConnectionLostError,
)
from .flow import PublishBlockedError
from .kombu_connection import KombuConnection
from .pool import ChannelPool, PooledChannel
from .stats import ConnectionStats, connection_stats
from .transport import (
    SSLTransport,
    Transport,
    add_shared_amqp_transport,
    monkeypatch_pyamqp_transport,
)

__all__ = [
    "Channel",
    "ChannelOwnershipError",
    "ChannelPool",
    "ChannelPoolLimitError",
    "Connection",
    "ConnectionClosedError",
    "ConnectionLostError",
    "ConnectionStats",
    "KombuConnection",
    "PooledChannel",
    "PublishBlockedError",
    "SSLTransport",
    "Transport",
    "add_shared_amqp_transport",
    "connection_stats",
    "monkeypatch_pyamqp_transport",
    "replies_within",
]
