"""Flow control: whether the server lets this connection publish (RabbitMQ's connection.blocked).

When RabbitMQ raises a memory or disk alarm, the next publish it reads from a connection makes
it stop reading that connection and send Connection.Blocked with a reason (for example "low on
memory"); Connection.Unblocked follows when the alarm clears. That first publish is confirmed
only then. The
reader thread records both here. A publisher waits here *before* it writes, bounded by the
connection's ``blocked_timeout``: a publish written into a blocked connection would stay in
the socket, and everything written after it (a channel close, a declare) with it, so the server
would not even read the other threads' methods any more.

This module holds the state only (no I/O), so it is tested without a socket.
"""

from __future__ import annotations

import logging
import time
from time import monotonic

from amqp.exceptions import ConnectionError as AMQPConnectionError

logger = logging.getLogger(__name__)

#: How often a publisher waiting out a block looks at the flag again. It polls instead of
#: waiting on a threading.Event: Event.wait enters a Python-level Condition, and an async
#: exception (dramatiq's TimeLimit) landing just after its lock is acquired leaks that lock,
#: so the reader's next unblock() (Event.set) would hang and with it the whole connection.
#: A sleep holds no lock (and yields under gevent); this bounds how late a publisher sees
#: the unblock.
POLL = 0.05


class PublishBlockedError(AMQPConnectionError):
    """The server blocked publishing on this connection for longer than ``blocked_timeout``.

    A connection error, since the whole connection is blocked, but not a recoverable one:
    reconnecting cannot help (a new connection is blocked by the same alarm) and would only
    spin, so kombu's ``ensure()`` does not retry it. The connection itself stays usable.
    """

    def __init__(self, reason: str, waited: float) -> None:
        super().__init__(f"the AMQP server blocks publishing: {reason} "
                         f"(waited {waited:.1f} s, blocked_timeout)")
        self.reason = reason
        self.waited = waited


class FlowControl:
    """Blocked or not, set by the reader thread, polled by publishers.

    ``_open`` is True while publishing is allowed (or the connection has ended): a plain
    flag, written only by the reader (or fork), read without a lock, so no interrupted
    publisher can leave anything held that the reader needs.
    """

    def __init__(self, name: str, timeout: float | None = None) -> None:
        if timeout is not None and (isinstance(timeout, bool) or timeout < 0):
            raise ValueError(f"blocked_timeout must be a number of seconds >= 0 or None, "
                             f"got {timeout!r}")
        self.name = name
        #: Longest a publisher waits while blocked (None: until unblocked or the connection ends).
        self.timeout = timeout
        self._open = True
        #: The server's reason while blocked, else None.
        self.reason: str | None = None
        #: monotonic() when the current block began (0.0 when not blocked).
        self.since = 0.0
        #: How many times the server blocked this connection.
        self.blocks = 0

    @property
    def blocked(self) -> bool:
        return not self._open

    # -- the reader thread -----------------------------------------------------------------

    def block(self, reason: str) -> bool:
        """Connection.Blocked arrived; True when it starts a block (False: already blocked)."""
        if self.blocked:
            self.reason = reason or self.reason
            return False
        self.reason = reason or "connection blocked"
        self.since = monotonic()
        self.blocks += 1
        self._open = False
        logger.warning("AMQP server %s blocks publishing on this connection: %s; sends wait "
                       "up to %s", self.name, self.reason,
                       "unblocked" if self.timeout is None else f"{self.timeout} s")
        return True

    def unblock(self) -> None:
        """Connection.Unblocked arrived."""
        if not self.blocked:
            return
        logger.warning("AMQP server %s unblocked publishing after %.1f s (was: %s)", self.name,
                       monotonic() - self.since, self.reason)
        # Opened first: a publisher that read ``since`` of this block then sees it open.
        self._open = True
        self.reason = None
        self.since = 0.0

    def end(self) -> None:
        """The connection stopped: wake every waiting publisher (its write then fails)."""
        self._open = True

    def _after_fork_in_child(self) -> None:
        """Called by the inherited connection: the child's connection has failed, so it is
        open (its publishers' writes then fail). No lock to replace: publishers poll."""
        self._open = True

    # -- publishers ------------------------------------------------------------------------

    def wait_before_write(self, timeout: float | None = None) -> None:
        """Return once the server reads this connection again; raise PublishBlockedError after
        waiting ``blocked_timeout`` (or ``timeout``, a publish's own bound, when shorter).

        For publishes, and for methods that wait for a reply: the server sends
        Connection.Blocked as it stops reading, so a declare or a channel open written now
        would wait for its reply until the alarm clears.
        """
        if self._open:
            return
        limit = _shorter(self.timeout, timeout)
        started = monotonic()
        while not self._open:
            if limit is None:
                nap = POLL
            else:
                nap = started + limit - monotonic()
                if nap <= 0:
                    raise PublishBlockedError(self.reason or "connection blocked",
                                              monotonic() - started)
            # time.sleep looked up at each call: gevent's monkey-patching replaces it.
            time.sleep(min(POLL, nap))

    def bound_confirm_wait(self, remaining: float | None) -> float | None:
        """How long a wait for a confirm (or another reply) may block now: ``remaining``, or
        less while blocked.

        A method written just before the block (the publish that made the server block, whose
        confirm then comes only after the alarm; a declare or a channel open that crossed the
        notification) waits at most ``blocked_timeout`` from the start of the block, then
        raises PublishBlockedError (the server may still act on it: the outcome is unknown).
        """
        since = self.since  # read before the flag: see unblock()
        if not since or self._open or self.timeout is None:
            return remaining
        left = since + self.timeout - monotonic()
        if left <= 0:
            raise PublishBlockedError(self.reason or "connection blocked", monotonic() - since)
        return _shorter(remaining, left)


def _shorter(a: float | None, b: float | None) -> float | None:
    if a is None:
        return b
    if b is None:
        return a
    return min(a, b)
