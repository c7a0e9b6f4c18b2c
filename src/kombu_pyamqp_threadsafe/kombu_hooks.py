"""kombu's default channel and process-wide pools, for connections on the shared transport.

Both install functions of transport.py call :func:`install`. The changes apply only to
connections on the thread-safe transport; every other connection keeps kombu's behaviour.
"""

from __future__ import annotations

import threading
from typing import Any

import kombu.connection
from kombu import pools
from kombu.connection import ConnectionPool, PooledConnection

from .thread_channel import ThreadChannel
from .transport import uses_shared_transport

_upstream_default_channel = kombu.connection.Connection.default_channel
_upstream_connections_create = pools.Connections.create
_upstream_producers_create = pools.Producers.create
#: Guards the one-time patching.
_install_lock = threading.Lock()
_installed = False


# Upstream: one channel per kombu.Connection, opened by the thread that first asks for it.
# Celery's producer pool hands a connection and its channel from thread to thread, and a
# channel's replies (publisher confirms) go to the thread that owns it. Here a stand-in that
# works on the calling thread's own channel (thread_channel.py).
def _default_channel(self: kombu.connection.Connection) -> Any:
    if not uses_shared_transport(self):
        return _upstream_default_channel.fget(self)  # type: ignore[attr-defined]
    failover: dict[str, Any] = self._extract_failover_opts()
    self._ensure_connection(**failover)
    channel = self.__dict__.get("_thread_channel")
    if channel is None:
        channel = self.__dict__["_thread_channel"] = ThreadChannel(self)
    return channel


class HandlePool(ConnectionPool):
    """kombu's connection pool, for connections that are handles on one shared connection.

    Upstream: at most ``limit`` connections (``broker_pool_limit``, 10, in Celery), and a
    thread finding them all in use waits. Here a handle costs no socket, so there is no limit:
    an idle handle is reused, else a new one made; ``acquire()`` never waits.
    """

    def __init__(self, connection: kombu.connection.Connection, limit: int | None = None,
                 **kwargs: Any) -> None:
        # Released handles, reused last-in first-out (list append/pop are atomic).
        self._idle: list[Any] = []
        super().__init__(connection, limit=0)

    def new(self) -> Any:
        info = dict(self.connection._info(resolve=False))
        info["transport"] = self.connection.get_transport_cls()
        return PooledConnection(self, **info)

    def acquire(self, block: bool = False, timeout: float | None = None) -> Any:
        if self._closed:
            raise RuntimeError("Acquire on closed pool")
        try:
            handle = self._idle.pop()
        except IndexError:
            handle = self.new()
        handle.release = lambda: self.release(handle)
        return handle

    def release(self, resource: Any) -> None:
        self._idle.append(resource)

    def resize(self, limit: int, force: bool = False, ignore_errors: bool = False,
               reset: bool = False) -> None:
        """Nothing to resize: the pool has no limit (kombu.pools.set_limit calls this)."""

    def force_close_all(self, close_pool: bool = True) -> None:
        self._closed = close_pool
        idle, self._idle = self._idle, []
        for handle in idle:
            self.collect_resource(handle)


class HandleProducerPool(pools.ProducerPool):
    """kombu's producer pool on a :class:`HandlePool`: no limit, ``acquire()`` never waits.

    Upstream: at most ``limit`` producers, a thread finding them all in use waits. Here an
    idle producer is reused, else a new one made. Celery sets the producer pool's limit to
    its connection pool's (0 here), and ``kombu.pools.set_limit()`` resizes every pool:
    neither bounds this one.
    """

    def __init__(self, connections: HandlePool, **kwargs: Any) -> None:
        # Released producers, reused last-in first-out (list append/pop are atomic).
        self._idle: list[Any] = []
        super().__init__(connections, limit=0, **kwargs)

    def acquire(self, block: bool = False, timeout: float | None = None) -> Any:
        if self._closed:
            raise RuntimeError("Acquire on closed pool")
        producer: Any
        try:
            producer = self.prepare(self._idle.pop())
        except IndexError:
            producer = self.prepare(self.new())
        producer.release = lambda: self.release(producer)
        return producer

    def release(self, resource: Any) -> None:
        if resource.__connection__:
            resource.__connection__.release()
        resource.channel = None
        self._idle.append(resource)

    def force_close_all(self, close_pool: bool = True) -> None:
        self._closed = close_pool
        self._idle = []

    def resize(self, limit: int, force: bool = False, ignore_errors: bool = False,
               reset: bool = False) -> None:
        """Nothing to resize: the pool has no limit."""


def _create_connections(self: pools.Connections, connection: kombu.connection.Connection,
                        limit: int | None) -> Any:
    if uses_shared_transport(connection):
        return HandlePool(connection)
    return _upstream_connections_create(self, connection, limit)


def _create_producers(self: pools.Producers, connection: kombu.connection.Connection,
                      limit: int | None) -> Any:
    if uses_shared_transport(connection):
        return HandleProducerPool(pools.connections[connection])
    return _upstream_producers_create(self, connection, limit)


def install() -> None:
    """Patch kombu once for this process (later calls do nothing)."""
    global _installed
    with _install_lock:
        if _installed:
            return
        kombu.connection.Connection.default_channel = property(  # type: ignore[assignment,method-assign]
            _default_channel, doc=_upstream_default_channel.__doc__)
        pools.Connections.create = _create_connections  # type: ignore[method-assign]
        pools.Producers.create = _create_producers  # type: ignore[method-assign]
        _installed = True
