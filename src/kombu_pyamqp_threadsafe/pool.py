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


def _lock_and_condition() -> tuple[threading.RLock, threading.Condition]:
    """The pool's lock and the Condition that releases notify on it.

    An RLock, though never taken twice: a Condition asks its lock whether the caller holds it
    (notify() does, on every release), and a lock that cannot tell (Lock) is probed with a
    failed acquire(blocking=False), which under gevent's monkey-patching yields to the other
    greenlets. Each release then let them all run while it held the lock: after a connection
    failure every sending greenlet gives its channel back at once, they queued on the lock one
    hub iteration apiece, and their sends ended their whole retry budget later, on the old
    connection's failure (docs/gevent-findings.md, 3). An RLock answers from its owner.
    """
    lock = threading.RLock()
    return lock, threading.Condition(lock)


class _Slot:
    """The channel of one lease; outlives the lease so a dropped lease's channel is found."""

    __slots__ = ("channel",)

    def __init__(self, channel: Channel | None) -> None:
        self.channel = channel


class PooledChannel:
    """A lease on one pooled channel; ``with`` gives the channel and returns it at exit.

    An asynchronous exception (dramatiq's TimeLimit) can land anywhere, even between
    ``acquire()`` and the ``with`` block, dropping a lease unreleased. The pool counts leases
    that are alive (a weak set), so a dropped lease frees its place at once, and a finalizer
    hands its channel to the next ``acquire()`` to be closed: the pool never loses capacity and
    never reuses a channel in an unknown state.
    """

    __slots__ = ("_pool", "_slot", "_finalizer", "__weakref__")

    def __init__(self, pool: ChannelPool, slot: _Slot) -> None:
        self._pool = pool
        self._slot = slot
        self._finalizer = weakref.finalize(self, pool._orphans.append, slot)

    @property
    def channel(self) -> Channel:
        channel = self._slot.channel
        assert channel is not None, "lease used before acquire() returned it"
        return channel

    @property
    def usable(self) -> bool:
        """The channel is open on the pool's current connection (false once it failed)."""
        channel = self._slot.channel
        return channel is not None and self._pool._usable(channel)

    def __enter__(self) -> Channel:
        return self.channel

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release(discard=exc_type is not None)

    def release(self, discard: bool = False) -> None:
        """Give the channel back (once; later calls do nothing). ``discard`` closes it.

        The finalizer is detached only once the channel is back: an interrupt anywhere in
        between leaves it armed, and the next acquire() closes the channel unless it is idle
        or leased again by then (detaching first, an interrupt before _give_back leaked it).
        """
        if self._finalizer.alive:
            self._pool._give_back(self, discard)
            self._finalizer.detach()


class ChannelPool:
    """Channels for many threads on one :class:`~.kombu_connection.KombuConnection`."""

    def __init__(self, connection: Any, limit: int | None = None) -> None:
        if limit is not None and limit < 1:
            raise ValueError(f"channel pool limit must be at least 1, got {limit!r}")
        self.connection = connection
        self.limit = limit
        # Guards _idle and _leases.
        self._lock, self._returned = _lock_and_condition()
        # Idle channels, oldest first (a dict: the channel a thread used last is found at once).
        self._idle: dict[Channel, None] = {}
        # Each thread's last channel: handing it back to the same thread spares moving its
        # mailbox to another owner.
        self._local = threading.local()
        self._leases: weakref.WeakSet[PooledChannel] = weakref.WeakSet()
        # Slots of leases dropped unreleased (appended by finalizers, from any thread).
        self._orphans: deque[_Slot] = deque()

    @property
    def in_use(self) -> int:
        """Leases given out and not yet released (or dropped)."""
        return len(self._leases)

    def acquire(self, block: bool = True, timeout: float | None = None) -> PooledChannel:
        """Take a channel for the calling thread.

        Raises ChannelPoolLimitError when ``limit`` channels are out and none comes back
        (at once when ``block`` is false, else within ``timeout`` seconds).
        """
        deadline = None if timeout is None else monotonic() + timeout
        with self._lock:
            while not (self._idle or self.limit is None or len(self._leases) < self.limit):
                remaining = None if deadline is None else deadline - monotonic()
                if not block or (remaining is not None and remaining <= 0):
                    raise ChannelPoolLimitError(
                        f"channel pool limit of {self.limit} reached: all channels are in use"
                    )
                # Releases notify; dropped leases (seen by the garbage collector) cannot, so
                # look again at least every ORPHAN_CHECK seconds.
                self._returned.wait(ORPHAN_CHECK if remaining is None
                                    else min(remaining, ORPHAN_CHECK))
            lease = PooledChannel(self, _Slot(self._take_idle()))
            self._leases.add(lease)
        self._close_orphans()
        slot = lease._slot
        try:
            if slot.channel is None or not self._usable(slot.channel):
                slot.channel = self.connection.channel()
            slot.channel.adopt(wake_previous=False)
        except BaseException:
            lease.release(discard=True)
            raise
        return lease

    def _take_idle(self) -> Channel | None:
        """Under the lock: the calling thread's last channel if idle, else the newest idle."""
        idle = self._idle
        if not idle:
            return None
        last = getattr(self._local, "last", None)
        channel = last() if last is not None else None
        if channel is not None and idle.pop(channel, False) is None:
            return channel
        return idle.popitem()[0]

    def _usable(self, channel: Channel) -> bool:
        connection = channel.connection
        return (channel.is_open and connection is not None
                and connection is self.connection._connection and connection.connected)

    def _give_back(self, lease: PooledChannel, discard: bool) -> None:
        channel = lease._slot.channel
        keep = channel is not None and not discard and self._usable(channel)
        with self._lock:
            if lease not in self._leases:  # given back already (release() was interrupted)
                return
            self._leases.discard(lease)
            if keep and channel is not None:
                self._idle[channel] = None
            self._returned.notify()
        if keep:
            self._local.last = weakref.ref(channel)
        elif channel is not None:
            self._close(channel)

    def _close_orphans(self) -> None:
        """Close the channels of dropped leases without waiting for their Close-Ok: the
        caller of acquire() waits for none of them, within its timeout or past it."""
        while self._orphans:
            channel = self._orphans.popleft().channel
            if channel is not None and not self._idle_or_leased(channel):
                channel.close_nowait()

    def _idle_or_leased(self, channel: Channel) -> bool:
        """The channel of a dropped lease went back before the lease was dropped."""
        with self._lock:
            return channel in self._idle or any(
                lease._slot.channel is channel for lease in self._leases)

    @staticmethod
    def _close(channel: Channel) -> None:
        if channel.is_open:
            with suppress(AMQPError, OSError):
                channel.close()

    def close(self) -> None:
        """Close the idle channels; leased ones are closed when they come back."""
        with self._lock:
            idle, self._idle = self._idle, {}
        for channel in idle:
            self._close(channel)

    def _after_fork_in_child(self) -> None:
        self._lock, self._returned = _lock_and_condition()
        self._idle = {}
        self._local = threading.local()
        self._leases = weakref.WeakSet()
        self._orphans = deque()
