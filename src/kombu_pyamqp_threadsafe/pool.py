"""A bounded pool of channels on one shared connection.

A channel taken from the pool belongs to the taking thread until it is given back. A channel
that comes back after an exception (possibly mid-publish, with a confirm still in flight) is
closed rather than reused, so the next user never sees a stale reply.
"""

from __future__ import annotations

import threading
import weakref
from collections import deque
from contextlib import suppress
from time import monotonic
from types import TracebackType
from typing import Any

from amqp.exceptions import AMQPError

from .channel import Channel
from .errors import ChannelPoolLimitError

#: Longest a blocked acquire() sleeps before it looks for channels of dropped leases.
ORPHAN_CHECK = 1.0


class PooledChannel:
    """A lease on one pooled channel; ``with`` gives the channel and returns it at exit.

    A lease dropped without release (an asynchronous exception such as dramatiq's TimeLimit
    can land between ``acquire()`` and the ``with`` block) hands its channel back through a
    finalizer, to be closed by the next ``acquire()``: the pool never loses capacity.
    """

    __slots__ = ("channel", "_pool", "_finalizer", "__weakref__")

    def __init__(self, pool: ChannelPool, channel: Channel) -> None:
        self._pool = pool
        self.channel = channel
        self._finalizer = weakref.finalize(self, pool._orphans.append, channel)

    def __enter__(self) -> Channel:
        return self.channel

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release(discard=exc_type is not None)

    def release(self, discard: bool = False) -> None:
        """Give the channel back (once; later calls do nothing). ``discard`` closes it."""
        if self._finalizer.detach() is not None:
            self._pool._give_back(self.channel, discard)


class ChannelPool:
    """Channels for many threads on one :class:`~.kombu_connection.KombuConnection`."""

    def __init__(self, connection: Any, limit: int | None = None) -> None:
        if limit is not None and limit < 1:
            raise ValueError(f"channel pool limit must be at least 1, got {limit!r}")
        self.connection = connection
        self.limit = limit
        # Guards _idle and _in_use.
        self._lock = threading.Lock()
        self._returned = threading.Condition(self._lock)
        self._idle: list[Channel] = []
        self._in_use = 0
        # Channels of leases dropped unreleased (appended by finalizers, from any thread).
        self._orphans: deque[Channel] = deque()

    def acquire(self, block: bool = True, timeout: float | None = None) -> PooledChannel:
        """Take a channel for the calling thread.

        Raises ChannelPoolLimitError when ``limit`` channels are out and none comes back
        (at once when ``block`` is false, else within ``timeout`` seconds).
        """
        deadline = None if timeout is None else monotonic() + timeout
        orphans = []
        with self._lock:
            while True:
                while self._orphans:
                    orphans.append(self._orphans.popleft())
                    self._in_use -= 1
                if self._idle or self.limit is None or self._in_use < self.limit:
                    break
                remaining = None if deadline is None else deadline - monotonic()
                if not block or (remaining is not None and remaining <= 0):
                    raise ChannelPoolLimitError(
                        f"channel pool limit of {self.limit} reached: all channels are in use"
                    )
                # Releases notify; orphans (found by the garbage collector) cannot, so look again
                # at least every ORPHAN_CHECK seconds.
                self._returned.wait(ORPHAN_CHECK if remaining is None
                                    else min(remaining, ORPHAN_CHECK))
            channel = self._idle.pop() if self._idle else None
            self._in_use += 1
        for orphan in orphans:
            self._close(orphan)
        try:
            if channel is None or not self._usable(channel):
                channel = self.connection.channel()
            channel.adopt()
            return PooledChannel(self, channel)
        except BaseException:
            with self._lock:
                self._in_use -= 1
                self._returned.notify()
            raise

    def _usable(self, channel: Channel) -> bool:
        connection = channel.connection
        return (channel.is_open and connection is not None
                and connection is self.connection._connection and connection.connected)

    def _give_back(self, channel: Channel, discard: bool) -> None:
        keep = not discard and self._usable(channel)
        with self._lock:
            self._in_use -= 1
            if keep:
                self._idle.append(channel)
            self._returned.notify()
        if not keep:
            self._close(channel)

    @staticmethod
    def _close(channel: Channel) -> None:
        if channel.is_open:
            with suppress(AMQPError, OSError):
                channel.close()

    def close(self) -> None:
        """Close the idle channels; leased ones are closed when they come back."""
        with self._lock:
            idle, self._idle = self._idle, []
        for channel in idle:
            self._close(channel)

    def _after_fork_in_child(self) -> None:
        self._lock = threading.Lock()
        self._returned = threading.Condition(self._lock)
        self._idle = []
        self._in_use = 0
        self._orphans = deque()
