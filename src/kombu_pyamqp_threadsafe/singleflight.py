"""Run one call at a time for many threads that all want the same result."""

from __future__ import annotations

import threading
from collections.abc import Callable
from time import monotonic
from typing import TypeVar

T = TypeVar("T")

#: How often a waiter looks whether its leader gave up without waking it.
STALE_CHECK = 1.0


class _Flight:
    __slots__ = ("done",)

    def __init__(self) -> None:
        self.done = threading.Event()


class SingleFlight:
    """The first caller runs ``fn``; callers arriving meanwhile wait for it to finish.

    No lock is held while ``fn`` runs (it does network I/O): waiters block on an event that
    the running caller always sets, then look at the outcome themselves.
    """

    def __init__(self) -> None:
        # Guards _flight, the call in progress.
        self._lock = threading.Lock()
        self._flight: _Flight | None = None

    def run(self, fn: Callable[[], T], done: Callable[[], T | None],
            timeout: float | None = None) -> T:
        """Return ``done()`` if it is not None, else the result of ``fn`` run by one thread.

        A waiter whose leader failed runs ``fn`` itself (with its own retry policy) rather than
        re-raising somebody else's exception. So does a waiter that has waited ``timeout``
        seconds (its own connect timeout) for a leader still trying: it is not held to the
        leader's policy (which may be to retry for ever), and fails as its own ``fn`` does.
        """
        deadline = None if timeout is None else monotonic() + timeout
        while True:
            result = done()
            if result is not None:
                return result
            with self._lock:
                flight = self._flight
                # A flight that is done but still recorded lost its leader to an interrupt
                # between the two steps of its finally: it is over.
                leader = flight is None or flight.done.is_set()
                if flight is None or leader:
                    flight = self._flight = _Flight()
            if leader:
                try:
                    return fn()
                finally:
                    # Waiters are woken first: a second interrupt (dramatiq's TimeLimit) landing
                    # in here can then only leave a finished flight recorded, which the next
                    # caller replaces, never waiters waiting on a flight nobody finishes.
                    try:
                        flight.done.set()
                    finally:
                        with self._lock:
                            if self._flight is flight:
                                self._flight = None
            while not flight.done.wait(STALE_CHECK if deadline is None
                                       else max(0.0, min(STALE_CHECK, deadline - monotonic()))):
                if self._flight is not flight:  # its leader was interrupted before waking us
                    break
                if deadline is not None and monotonic() >= deadline:
                    result = done()
                    return result if result is not None else fn()

    def reset(self) -> None:
        """Forget a flight whose thread did not survive fork()."""
        self._lock = threading.Lock()
        self._flight = None
