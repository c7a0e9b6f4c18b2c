"""One AMQP connection per set of connection parameters in a process.

kombu builds connections from connections all the time: ``clone()``, ``Connection(**info())``,
the pools of ``kombu.pools`` (Celery's ``app.pool`` holds ``broker_pool_limit`` clones). On
kombu's own transport each opens a socket. On the thread-safe transport every kombu.Connection
is a *handle*: handles with the same parameters share one connection, which stays open while
any handle holds it and closes when the last one is released. Each thread has one default
channel per shared connection, whichever handle it reaches it through.
"""

from __future__ import annotations

import logging
import queue
import threading
import weakref
from collections.abc import Callable, Hashable
from contextlib import suppress
from typing import Any

from amqp.exceptions import AMQPError

from . import forksafe
from .channel import Channel
from .greenlets import thread_ended
from .singleflight import SingleFlight

logger = logging.getLogger(__name__)


class SharedConnection:
    """One AMQP connection and the kombu connections (handles) that use it."""

    __slots__ = ("key", "connection", "handles", "connecting", "thread_channels")

    def __init__(self, key: Hashable) -> None:
        self.key = key
        self.connection: Any = None
        # A handle dropped without release() leaves this set by itself.
        self.handles: weakref.WeakSet[Any] = weakref.WeakSet()
        self.connecting = SingleFlight()
        self.thread_channels: dict[threading.Thread, Channel] = {}

    def live_connection(self) -> Any:
        connection = self.connection
        return connection if connection is not None and connection.connected else None


class Registry:
    """The process's shared connections, by connection parameters."""

    def __init__(self) -> None:
        # Guards _entries, _closer and each entry's connection, handles and thread_channels
        # (never held while connecting, closing or opening a channel).
        self._lock = threading.Lock()
        self._entries: dict[Hashable, SharedConnection] = {}
        # Entries whose handle was garbage-collected. A weakref callback may run inside any
        # code, this registry's locked sections included, so it only puts the entry here
        # (SimpleQueue.put is safe there); the closer thread does the rest. Both are made at
        # the first connect, not at import: under gevent's monkey-patching (applied after
        # this module was imported) the queue must be gevent's, or the closer greenlet's
        # get() would block the one OS thread every greenlet runs in.
        self._dropped: queue.SimpleQueue[SharedConnection] | None = None
        self._closer: threading.Thread | None = None
        forksafe.register(self)

    def connect(self, handle: Any, key: Hashable, open_connection: Callable[[], Any]
                ) -> tuple[SharedConnection, Any]:
        """Register ``handle`` and return the live connection for ``key``, opened if needed.

        One thread opens it (``open_connection``); handles arriving meanwhile wait for it.
        """
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                entry = self._entries[key] = SharedConnection(key)
            first = handle not in entry.handles
            entry.handles.add(handle)
            dropped = self._dropped
            if dropped is None:
                dropped = self._dropped = queue.SimpleQueue()
                self._closer = threading.Thread(target=self._close_dropped, args=(dropped,),
                                                daemon=True, name="amqp-shared-connection-closer")
                self._closer.start()
        if first:
            # Upstream: a kombu.Connection dropped without release() has its socket closed by
            # the collector. Here the socket is the reader thread's, so the last handle's
            # collection closes it.
            weakref.finalize(handle, dropped.put, entry).atexit = False

        def attempt() -> Any:
            connection = open_connection()
            connection.handles = entry.handles
            with self._lock:
                entry.connection = connection
            return connection

        return entry, entry.connecting.run(attempt, entry.live_connection)

    def release(self, entry: SharedConnection, handle: Any) -> Any:
        """Forget ``handle``; return the connection to close if it was the last one, else None."""
        with self._lock:
            entry.handles.discard(handle)
            if len(entry.handles):
                return None
            return self._forget(entry)

    def _forget(self, entry: SharedConnection) -> Any:
        """Under the lock, with no handle left: drop ``entry`` and return its connection."""
        if self._entries.get(entry.key) is entry:
            del self._entries[entry.key]
        connection, entry.connection = entry.connection, None
        entry.thread_channels.clear()
        return connection

    def _close_dropped(self, dropped: queue.SimpleQueue[SharedConnection]) -> None:
        """The closer thread: close the connection of an entry whose handles were all dropped
        without release() (the last release() closes it otherwise). Sleeps until woken."""
        while True:
            entry = dropped.get()
            with self._lock:
                if any(True for _ in entry.handles) or self._entries.get(entry.key) is not entry:
                    continue
                connection = self._forget(entry)
            if connection is not None:
                logger.debug("closing the shared connection %r: its handles were dropped "
                             "without release()", entry.key)
                with suppress(OSError, AMQPError):
                    connection.close()

    def thread_channel(self, entry: SharedConnection, connection: Any) -> Channel:
        """The calling thread's default channel on ``connection``, opened on first use.

        Channels of threads that have ended are closed when a new one is opened, so short-lived
        threads (greenlets too) do not use up the server's channel_max.
        """
        thread = threading.current_thread()
        channel = entry.thread_channels.get(thread)
        if channel is not None and channel.connection is connection and channel.is_open:
            return channel
        channel = connection.channel()
        with self._lock:
            entry.thread_channels[thread] = channel
            ended = [t for t in entry.thread_channels if thread_ended(t)]
            orphans = [entry.thread_channels.pop(t) for t in ended]
        for orphan in orphans:
            if orphan.connection is not None:
                with suppress(OSError, AMQPError):
                    orphan.close()
        return channel

    def connections(self) -> int:
        """How many shared connections this process holds (for tests and diagnostics)."""
        with self._lock:
            return sum(1 for entry in self._entries.values() if entry.live_connection())

    def _after_fork_in_child(self) -> None:
        # The inherited connections fail themselves in the child (connection.py); handles
        # reconnect through fresh entries.
        self._lock = threading.Lock()
        self._entries = {}
        self._dropped = None
        self._closer = None


registry = Registry()
