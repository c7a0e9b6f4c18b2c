"""The default channel of a kombu.Connection on the shared transport.

Upstream a kombu.Connection has one default channel, and objects made from the connection
keep it: ``Producer(conn)`` resolves it once and then publishes on it from whichever thread
calls. Celery's event dispatcher does that from the consuming thread and from its timer
thread, and its producer pool hands producers from thread to thread. Replies and publisher
confirms go to the thread that owns a channel, so here the default channel is a stand-in
that works, at every call, on the calling thread's own channel.
"""

from __future__ import annotations

import threading
from typing import Any

from .channel import Channel


class ThreadChannel:
    """Stands for the calling thread's default channel of one kombu.Connection.

    Attributes are those of the thread's channel (opened on first use, reconnecting as
    upstream's ``default_channel`` does). ``close()`` does nothing: the thread's channel
    belongs to the shared connection, which other kombu.Connections use too.
    """

    __slots__ = ("_client", "_last")

    def __init__(self, client: Any) -> None:
        object.__setattr__(self, "_client", client)
        # Each thread's channel as current() returned it last: kombu's Producer resolves the
        # default channel several times per publish, and the registry's look-up is the slow
        # path (registry.py), taken again when that channel closed or the connection changed.
        object.__setattr__(self, "_last", threading.local())

    def current(self) -> Channel:
        """The calling thread's channel."""
        client = self._client
        connection = client._connection
        last = self._last
        if client._closed or connection is None or not connection.connected:
            connection = client._ensure_connection(**client._extract_failover_opts())
        else:
            cached: Channel | None = getattr(last, "channel", None)
            if cached is not None and cached.connection is connection and cached.is_open:
                return cached
        channel: Channel = client.transport.default_channel(connection)
        last.channel = channel
        return channel

    def __getattr__(self, name: str) -> Any:
        return getattr(self.current(), name)

    # What kombu's Producer.publish (and maybe_declare) reads on every publish: defined here so
    # that these reads do not go through a failed attribute look-up into __getattr__.
    @property
    def connection(self) -> Any:
        return self.current().connection

    def prepare_message(self, *args: Any, **kwargs: Any) -> Any:
        return self.current().prepare_message(*args, **kwargs)

    def basic_publish(self, *args: Any, **kwargs: Any) -> Any:
        return self.current().basic_publish(*args, **kwargs)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self.current(), name, value)

    def close(self) -> None:
        """Nothing to close: see the class docstring."""

    def __enter__(self) -> ThreadChannel:
        return self

    def __exit__(self, *exc_info: object) -> None:
        return None

    def __repr__(self) -> str:
        return f"<ThreadChannel of {self._client!r}>"
