"""A bounded pool of channels on one shared connection.

A channel taken from the pool belongs to the taking thread until it is given back. A channel
that comes back after an exception (possibly mid-publish, with a confirm still in flight) is
closed rather than reused, so the next user never sees a stale reply.
"""

from __future__ import annotations

import threading
from contextlib import suppress
from time import monotonic
from types import TracebackType
from typing import Any

from amqp.exceptions import AMQPError

from .channel import Channel
from .errors import ChannelPoolLimitError


class PooledChannel:
    """A lease on one pooled channel; ``with`` gives the channel and returns it at exit."""

    __slots__ = ("_pool", "channel", "_released")

    def __init__(self, pool: ChannelPool, channel: Channel) -> None:
        self._pool = pool
        self.channel = channel
        self._released = False

    def __enter__(self) -> Channel:
        return self.channel

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release(discard=exc_type is not None)

    def release(self, discard: bool = False) -> None:
        """Give the channel back (once; later calls do nothing). ``discard`` closes it."""
        if self._pool._mark_released(self):
            self._pool._give_back(self.channel, discard)


class ChannelPool:
    """Channels for many threads on one :class:`~.kombu_connection.KombuConnection`."""

    def __init__(self, connection: Any, limit: int | None = None) -> None:
        if limit is not None and limit < 1:
            raise ValueError(f"channel pool limit must be at least 1, got {limit!r}")
        self.connection = connection
        self.limit = limit
        # Guards _idle, _in_use and each lease's _released flag.
        self._lock = threading.Lock()
        self._returned = threading.Condition(self._lock)
        self._idle: list[Channel] = []
        self._in_use = 0

    def acquire(self, block: bool = True, timeout: float | None = None) -> PooledChannel:
        """Take a channel for the calling thread.

        Raises ChannelPoolLimitError when ``limit`` channels are out and none comes back
        (at once when ``block`` is false, else within ``timeout`` seconds).
        """
        deadline = None if timeout is None else monotonic() + timeout
        with self._lock:
            while not self._idle and self.limit is not None and self._in_use >= self.limit:
                remaining = None if deadline is None else deadline - monotonic()
                if not block or (remaining is not None and remaining <= 0):
                    raise ChannelPoolLimitError(
                        f"channel pool limit of {self.limit} reached: all channels are in use"
                    )
                self._returned.wait(remaining)
            channel = self._idle.pop() if self._idle else None
            self._in_use += 1
        try:
            if channel is None or not self._usable(channel):
                channel = self.connection.channel()
            channel.adopt()
        except BaseException:
            with self._lock:
                self._in_use -= 1
                self._returned.notify()
            raise
        return PooledChannel(self, channel)

    def _usable(self, channel: Channel) -> bool:
        connection = channel.connection
        return (channel.is_open and connection is not None
                and connection is self.connection._connection and connection.connected)

    def _mark_released(self, lease: PooledChannel) -> bool:
        with self._lock:
            if lease._released:
                return False
            lease._released = True
            return True

    def _give_back(self, channel: Channel, discard: bool) -> None:
        keep = not discard and self._usable(channel)
        with self._lock:
            self._in_use -= 1
            if keep:
                self._idle.append(channel)
            self._returned.notify()
        if not keep and channel.is_open:
            with suppress(AMQPError, OSError):
                channel.close()

    def close(self) -> None:
        """Close the idle channels; leased ones are closed when they come back."""
        with self._lock:
            idle, self._idle = self._idle, []
        for channel in idle:
            with suppress(AMQPError, OSError):
                channel.close()

    def _after_fork_in_child(self) -> None:
        self._lock = threading.Lock()
        self._returned = threading.Condition(self._lock)
        self._idle = []
        self._in_use = 0
