"""The default channel of a kombu.Connection on the shared transport.

Upstream a kombu.Connection has one default channel, and objects made from the connection
keep it: ``Producer(conn)`` resolves it once and then publishes on it from whichever thread
calls. Celery's event dispatcher does that from the consuming thread and from its timer
thread, and its producer pool hands producers from thread to thread. Replies and publisher
confirms go to the thread that owns a channel, so here the default channel is a stand-in
that works, at every call, on the calling thread's own channel.
"""

from __future__ import annotations

from typing import Any

from .channel import Channel


class ThreadChannel:
    """Stands for the calling thread's default channel of one kombu.Connection.

    Attributes are those of the thread's channel (opened on first use, reconnecting as
    upstream's ``default_channel`` does). ``close()`` does nothing: the thread's channel
    belongs to the shared connection, which other kombu.Connections use too.
    """

    __slots__ = ("_client",)

    def __init__(self, client: Any) -> None:
        object.__setattr__(self, "_client", client)

    def current(self) -> Channel:
        """The calling thread's channel."""
        client = self._client
        connection = client._connection
        if client._closed or connection is None or not connection.connected:
            connection = client._ensure_connection(**client._extract_failover_opts())
        return client.transport.default_channel(connection)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.current(), name)

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
