"""KombuConnection: a kombu.Connection that many threads can use at once."""

from __future__ import annotations

import logging
import threading
from typing import Any, cast

import kombu.connection

from . import forksafe, kombu_hooks
from .channel import Channel
from .pool import ChannelPool
from .singleflight import SingleFlight
from .transport import SSLTransport, Transport

logger = logging.getLogger(__name__)

#: Default bound of :attr:`KombuConnection.default_channel_pool`.
DEFAULT_CHANNEL_POOL_LIMIT = 1000


class KombuConnection(kombu.connection.Connection):
    """Drop-in :class:`kombu.Connection` whose one AMQP connection is shared by all threads.

    - ``pyamqp://``, ``amqp://`` and ``amqps://`` URLs use the thread-safe transport.
    - ``ensure_connection()`` from many threads at once opens one connection.
    - ``default_channel`` is one channel per thread; ``default_channel_pool`` is a bounded pool
      whose channels belong to the thread that holds them.
    """

    def __init__(self, *args: Any, channel_pool_limit: int | None = DEFAULT_CHANNEL_POOL_LIMIT,
                 **kwargs: Any) -> None:
        kombu_hooks.install()
        args, kwargs = _with_thread_safe_transport(args, kwargs)
        if not kwargs.get("heartbeat"):
            # kombu's meaning of heartbeat 0, off, which the transport gives only when told
            # so in the transport options (it makes 0 mean DEFAULT_HEARTBEAT for plain
            # kombu.Connections, which Celery's worker opens with 0).
            options = dict(kwargs.get("transport_options") or {})
            options.setdefault("heartbeat", 0)
            kwargs["transport_options"] = options
        super().__init__(*args, **kwargs)
        self._channel_pool_limit = channel_pool_limit
        self._connecting = SingleFlight()
        # Guards the lazy creation of _channel_pool.
        self._pool_lock = threading.Lock()
        self._channel_pool: ChannelPool | None = None
        forksafe.register(self)

    @classmethod
    def from_kombu_connection(cls, connection: kombu.connection.Connection,
                              **kwargs: Any) -> KombuConnection:
        """A KombuConnection with the same parameters as an existing kombu.Connection."""
        info: dict[str, Any] = connection.info()
        info.pop("transport", None)
        info.update(kwargs)
        return cls(**info)

    # Upstream: every caller that finds the connection down connects on its own, so threads
    # racing here open one connection each. Here one thread connects and the rest wait for it.
    def _ensure_connection(self, *args: Any, **kwargs: Any) -> Any:
        return self._connecting.run(
            lambda: self._connect_in_turn(args, kwargs),
            lambda: self._connection if self.connected else None,
            timeout=kwargs.get("timeout"),
        )

    # Upstream: moves to the next failover URL only between the retries of one call, so a call
    # with max_retries=0 (or one whose retries ran out) leaves the URL that just failed for the
    # next call, and a lost connection is opened again on the node it was lost on. Here a
    # failed call and a lost connection both move on: every connect and reconnect goes node
    # after node. Runs in the single flight, so no other thread connects meanwhile.
    def _connect_in_turn(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if self._connection is not None and not self.connected:
            self.maybe_switch_next()
        try:
            return super()._ensure_connection(*args, **kwargs)
        except Exception:
            self.maybe_switch_next()
            raise

    # Upstream: takes the transport from the new URL's scheme, so failing over to an amqp://
    # URL fell back to kombu's own pyamqp transport (one socket reader per calling thread).
    # Here the URL is mapped to the thread-safe transport, as __init__ maps the first one.
    def switch(self, conn_str: str) -> None:
        super().switch(conn_str)
        _, kwargs = _with_thread_safe_transport((conn_str,), {"ssl": self.ssl})
        if "transport" in kwargs:
            self.transport_cls = kwargs["transport"]

    # Upstream: drops the connection unconditionally; kombu's ensure() calls it after every
    # connection error, so one thread's late error would drop the fresh connection another
    # thread just opened. Here a connection that is alive is kept.
    def collect(self, socket_timeout: float | None = None) -> None:
        if self.connected:
            logger.debug("collect(): the shared connection is alive; keeping it")
            return
        super().collect(socket_timeout)

    # Upstream: reports the transport as given; ours is a class, which would print as
    # "<class ...>://" in as_uri(). Here it is reported by its URL scheme, which clone() and
    # __init__ map back to the thread-safe transport.
    def _info(self, resolve: bool = True) -> Any:  # upstream: unannotated, a fixed-size tuple
        transport_cls = self.transport_cls
        if not (isinstance(transport_cls, type) and issubclass(transport_cls, Transport)):
            return super()._info(resolve)
        scheme = "amqps" if issubclass(transport_cls, SSLTransport) else "amqp"
        return tuple((key, scheme if key == "transport" else value)
                     for key, value in super()._info(resolve))

    # Upstream: the same, unannotated (kombu's inferred type is a logging wrapper's). Here typed:
    # the thread-safe transport makes this package's Channel.
    def channel(self) -> Channel:
        return cast(Channel, super().channel())

    # kombu annotates default_channel as its virtual transports' Channel, which no pyamqp
    # channel (upstream's either) is: the one override of a wrong upstream annotation.
    @property
    def default_channel(self) -> Channel:  # type: ignore[override]  # pyright: ignore[reportIncompatibleMethodOverride]
        """The calling thread's own channel on the shared connection (upstream: one channel
        for every thread). Channels of ended threads are closed as new ones open."""
        connection = self._ensure_connection(**self._extract_failover_opts())
        return self.transport.default_channel(connection)

    @property
    def default_channel_pool(self) -> ChannelPool:
        """A bounded pool of channels shared by all threads of this connection."""
        pool = self._channel_pool
        if pool is not None:
            return pool
        with self._pool_lock:
            if self._channel_pool is None:
                self._channel_pool = ChannelPool(self, self._channel_pool_limit)
            return self._channel_pool

    def _do_close_self(self) -> None:
        pool = self._channel_pool
        if pool is not None:
            pool.close()
        super()._do_close_self()

    def _after_fork_in_child(self) -> None:
        self._connecting.reset()
        self._pool_lock = threading.Lock()
        if self._channel_pool is not None:
            self._channel_pool._after_fork_in_child()


_SHARED = "shared+"
_AMQP_ALIASES = (None, "amqp", "pyamqp", "amqps")


def _with_thread_safe_transport(args: tuple[Any, ...], kwargs: dict[str, Any],
                                ) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Point an AMQP URL or alias (also in its ``shared+`` form) at the thread-safe transport.

    Other transports (``memory://``, ``redis://``...) are left as they are.
    """
    url = args[0] if args else kwargs.get("hostname")
    first = url[0] if isinstance(url, (list, tuple)) and url else url
    if isinstance(first, str) and first.startswith(_SHARED):
        url = ([u.removeprefix(_SHARED) for u in url] if isinstance(url, (list, tuple))
               else first[len(_SHARED):])
        first = url[0] if isinstance(url, list) else url
        if args:
            args = (url, *args[1:])
        else:
            kwargs["hostname"] = url
    transport = kwargs.get("transport")
    if isinstance(transport, str):
        transport = transport.removeprefix(_SHARED)
    scheme = first.partition("://")[0] if isinstance(first, str) and "://" in first else None
    if transport in _AMQP_ALIASES and scheme in (None, *_AMQP_ALIASES[1:]):
        tls = bool(kwargs.get("ssl")) or "amqps" in (transport, scheme)
        kwargs["transport"] = SSLTransport if tls else Transport
    return args, kwargs
