"""A fixed one-way network delay for ``stress.tcp_proxy``: what comes in leaves ``delay`` s later.

:class:`DelayLine` is the logic (no sockets, no clock of its own, so it is tested with made-up
times); :class:`DelayedSender` drives one for one direction of a proxied connection, from a
thread of its own, so that the reader never waits, neither for the delay nor for a slow peer.
"""

from __future__ import annotations

import socket
import threading
import time
from collections import deque
from collections.abc import Callable

#: Seconds between looks at a paused proxy's flag by a sender that holds delayed bytes.
PAUSED_POLL = 0.05


class DelayLine:
    """Chunks of one byte stream, each due ``delay`` s after it was put, taken in the order they
    were put (a chunk never overtakes an earlier one, whatever the times say)."""

    def __init__(self, delay: float) -> None:
        if delay < 0:
            raise ValueError(f"delay must not be negative, not {delay}")
        self.delay = delay
        self._chunks: deque[tuple[float, bytes]] = deque()

    def __len__(self) -> int:
        return len(self._chunks)

    def put(self, data: bytes, now: float) -> None:
        self._chunks.append((now + self.delay, data))

    def take(self, now: float) -> bytes:
        """Every chunk at the front that is due by ``now``, joined (``b""`` if none is)."""
        out = []
        while self._chunks and self._chunks[0][0] <= now:
            out.append(self._chunks.popleft()[1])
        return b"".join(out)

    def next_due(self) -> float | None:
        """When the front chunk is due (None: nothing queued)."""
        return self._chunks[0][0] if self._chunks else None


class DelayedSender:
    """Writes what :meth:`send` is given to ``sock`` ``delay`` s later, in order.

    Nothing leaves while ``paused`` is set (the proxy's silent network). What is queued is not
    bounded: a peer that stops reading makes it grow, as a benchmark proxy may allow.
    ``on_error`` runs in the sender's thread when a write fails (the proxy then cuts the
    connection).
    """

    def __init__(self, sock: socket.socket, delay: float, *, paused: threading.Event,
                 on_error: Callable[[], None],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._sock = sock
        self._paused = paused
        self._on_error = on_error
        self._clock = clock
        # Guards _line, _draining and _stopped; never held across sendall().
        self._cond = threading.Condition()
        self._line = DelayLine(delay)
        self._draining = False
        self._stopped = False
        self.thread = threading.Thread(target=self._run, name="test-proxy-delay", daemon=True)
        self.thread.start()

    def send(self, data: bytes) -> None:
        with self._cond:
            self._line.put(data, self._clock())
            self._cond.notify()

    def drain(self) -> None:
        """Write what is queued when it is due, then end."""
        with self._cond:
            self._draining = True
            self._cond.notify()

    def stop(self) -> None:
        """End now, dropping what is queued."""
        with self._cond:
            self._stopped = True
            self._cond.notify()

    def _next(self) -> bytes | None:
        """The next due bytes, waiting for them; None when the sender is to end."""
        with self._cond:
            while not self._stopped:
                # Paused: look again every PAUSED_POLL s (the proxy's resume() wakes no sender).
                wait: float | None = PAUSED_POLL
                if not self._paused.is_set():
                    now = self._clock()
                    data = self._line.take(now)
                    if data:
                        return data
                    if self._draining and not self._line:
                        return None
                    due = self._line.next_due()
                    wait = None if due is None else max(due - now, 0.0)
                # Woken by send(), drain() or stop(); else at the front chunk's due time.
                self._cond.wait(wait)
            return None

    def _run(self) -> None:
        try:
            while (data := self._next()) is not None:
                self._sock.sendall(data)
        except (OSError, ValueError):
            self._on_error()
