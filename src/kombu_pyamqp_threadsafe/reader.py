"""The reader: one thread per connection that owns every read from its socket.

It splits the byte stream into frames, lets py-amqp's frame handler assemble methods with
their content, and hands each method to the connection's router (which puts it in the owning
thread's inbox). Between reads it ticks heartbeats, so publish-only connections send and check
them too. No lock is held while it waits on the socket.
"""

from __future__ import annotations

import select
import threading
from ssl import SSLWantReadError
from time import monotonic
from typing import Any

from amqp.exceptions import ConnectionForced

from .frames import FrameBuffer, FrameWriter
from .greenlets import threads_are_greenlets

#: How often the reader wakes without traffic when heartbeats are off (to notice a stop).
IDLE_TICK = 1.0


def _poller() -> Any:
    """A poll object for the reader's socket: select.poll(), or under gevent one whose wait
    yields to the other greenlets (select.poll() would stop them all)."""
    if threads_are_greenlets():
        return _GreenletPoll()
    return select.poll()


class _Quiet(Exception):
    """The reader's wait under gevent timed out (the next heartbeat tick is due)."""


class _GreenletPoll:
    """The reader's one use of select.poll() under gevent: wait until its socket is readable
    or ``timeout`` ms. One gevent IO watcher for the reader's life (gevent's own poll makes
    and drops one, two epoll_ctl calls, per call)."""

    def __init__(self) -> None:
        self._watcher: Any = None
        self._wait: Any = None

    def register(self, fd: int, eventmask: int) -> None:
        from gevent import get_hub  # only in a process that gevent has patched
        from gevent.socket import wait

        self._watcher = get_hub().loop.io(fd, 1)  # 1: readable
        self._wait = wait

    def poll(self, timeout: float) -> bool:
        try:
            self._wait(self._watcher, timeout / 1000, _Quiet)
        except _Quiet:
            return False
        return True


class Reader:
    """Reads frames from ``sock`` until the connection fails or :meth:`stop` is called."""

    def __init__(
        self,
        connection: Any,
        sock: Any,
        initial: bytes,
        heartbeat: float,
        writer: FrameWriter,
        name: str,
    ) -> None:
        self._connection = connection
        self._sock = sock
        self._frames = FrameBuffer(initial)
        self._heartbeat = heartbeat
        self._writer = writer
        self._tick = min(heartbeat / 4, IDLE_TICK) if heartbeat else IDLE_TICK
        self._last_read = monotonic()
        self.stopping = False
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        """Ask the loop to end; the caller wakes it by shutting the socket down."""
        self.stopping = True

    def _run(self) -> None:
        try:
            self._loop()
        except BaseException as exc:  # noqa: BLE001 - every way out of the loop is reported
            if not self.stopping:
                self._connection._on_reader_failure(exc)

    def _loop(self) -> None:
        sock = self._sock
        recv_into = sock.recv_into
        connection = self._connection
        on_frame = connection.on_inbound_frame
        ring = connection._ring_doorbells
        frames = self._frames
        frames.parse(on_frame)
        ring()
        poller = _poller()
        poller.register(sock.fileno(), select.POLLIN | select.POLLPRI)
        ssl_pending = getattr(sock, "pending", None)
        next_tick = monotonic() + self._tick
        while not self.stopping:
            if not (ssl_pending and ssl_pending()):
                wait_ms = max(0.0, next_tick - monotonic()) * 1000
                if not poller.poll(wait_ms):
                    next_tick = self._heartbeat_tick()
                    continue
            try:
                received = frames.receive(recv_into)
            except SSLWantReadError:  # TLS: part of a record has arrived; poll for the rest
                continue
            if not received:
                if self.stopping:
                    return
                raise OSError("Server unexpectedly closed connection")
            self._last_read = now = monotonic()
            frames.parse(on_frame)
            ring()
            if now >= next_tick:
                next_tick = self._heartbeat_tick()

    def _heartbeat_tick(self) -> float:
        """Send a heartbeat when we have been quiet, fail when the server has been; write what
        an interrupted thread left queued. Never blocks (see FrameWriter.write_nowait)."""
        now = monotonic()
        heartbeat = self._heartbeat
        writer = self._writer
        writer.write_nowait(bool(heartbeat) and now - writer.last_write >= heartbeat / 2)
        if heartbeat and now - self._last_read > 2 * heartbeat:
            raise ConnectionForced("Too many heartbeats missed")
        return now + self._tick
