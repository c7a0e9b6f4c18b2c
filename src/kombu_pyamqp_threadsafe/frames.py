"""AMQP 0-9-1 frame encoding and decoding for a connection shared by many threads.

Writing: every frame of one method (method, content header, body frames) is encoded into a
single buffer and written, with whatever other threads queued meanwhile, in one system call
under the connection's write lock. One C call per batch means an asynchronous exception
(dramatiq's TimeLimit, shutdown) can never land between two frames of a message and leave the
shared stream half-written; py-amqp's own writer issues one ``write`` per body frame from a
Python loop.

Reading: :class:`FrameBuffer` receives into one reusable buffer and splits whatever arrived
into whole frames, so the reader does one system call for many frames instead of three per
frame, and allocates nothing per read.
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
from collections import deque
from collections.abc import Callable
from itertools import repeat, starmap, tee
from struct import Struct
from time import monotonic
from typing import Any, Protocol, cast

from amqp import spec
from amqp.exceptions import UnexpectedFrame

from .greenlets import threads_are_greenlets, yield_to_ready
from .tls import TLSSocket

_HEADER = Struct(">BHI")
_METHOD_SIG = Struct(">HH")
_CONTENT_HEADER = Struct(">HHQ")
FRAME_END = b"\xce"
#: Messages that may wait for the writing thread before a new writer waits for the lock
#: itself (a socket the server stops reading then pushes back instead of queueing forever).
MAX_QUEUED = 1024
#: Messages per ``sendmsg`` (each is one buffer; Linux takes at most 1024).
MAX_BATCH = 512
#: The least free space a read is offered (less, and the buffer is compacted or grown first).
MIN_READ = 16 * 1024
_CHANNEL_LIFECYCLE = frozenset({spec.Channel.Open, spec.Channel.Close, spec.Channel.CloseOk})

logger = logging.getLogger(__name__)


class _OwnedLock(Protocol):
    """CPython's RLock, whose ``_is_owned()`` typeshed leaves out."""

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool: ...
    def release(self) -> None: ...
    def _is_owned(self) -> bool: ...


def _owned_lock() -> _OwnedLock:
    return cast("_OwnedLock", threading.RLock())


def encode_method(
    frame_type: int,
    channel: int,
    method_sig: tuple[int, int] | None,
    args: bytes | str | None,
    content: Any,
    frame_max: int,
) -> bytes:
    """Encode one method (and its content, if any) as the bytes of all its frames."""
    if frame_type == 8:
        # A new object each time: the writer tells whether a batch left its queue by the
        # identity of the first message queued.
        return _HEADER.pack(8, 0, 0) + FRAME_END
    if method_sig is None:
        raise ValueError(f"a frame of type {frame_type} needs a method_sig")
    if isinstance(args, str):
        args = args.encode("utf-8")
    payload = _METHOD_SIG.pack(*method_sig) + (args or b"")
    parts: list[bytes | memoryview] = [_HEADER.pack(frame_type, channel, len(payload)), payload,
                                       FRAME_END]
    if content is not None:
        body = content.body
        if isinstance(body, str):
            encoding = content.properties.setdefault("content_encoding", "utf-8")
            body = body.encode(encoding)
        header = _CONTENT_HEADER.pack(method_sig[0], 0, len(body)) + content._serialize_properties()
        parts += (_HEADER.pack(2, channel, len(header)), header, FRAME_END)
        chunk = frame_max - 8
        view = memoryview(body)
        for start in range(0, len(body), chunk):
            piece = view[start : start + chunk]
            parts += (_HEADER.pack(3, channel, len(piece)), piece, FRAME_END)
    return b"".join(parts)


class FrameWriter:
    """The only path to the socket's outbound byte stream after the handshake.

    On plain TCP, writes combine: a thread that finds another one writing queues its encoded
    message and goes on (to wait for its confirm, say); the writing thread sends everything
    queued before it lets the lock go. With many publishers this replaces a convoy on the lock
    (each waiter woken in turn, each needing the GIL back while it holds the lock) with one
    system call per batch, which raises the throughput of many threads publishing with
    confirms on one connection (figures in docs/architecture.md).

    Messages leave the queue inside the ``sendmsg`` call that sends them, so an asynchronous
    exception (dramatiq's TimeLimit), which CPython raises only between bytecodes, finds a
    batch either still queued (the interrupted thread writes it on its way out) or handed to
    the kernel; no other thread's message is ever dropped. Over TLS the socket is a
    :class:`~.tls.TLSSocket`, whose ``sendmsg`` encrypts the batch and sends it the same way.
    """

    def __init__(self, connection: Any, transport: Any) -> None:
        self._connection = connection
        self._transport = transport
        sock = transport.sock
        # An ssl.SSLSocket (not made by this package) has no sendmsg: one write per message.
        self._sendmsg = None if isinstance(sock, ssl.SSLSocket) else sock.sendmsg
        # The reader's writes: never block (it is the one thread that checks heartbeats). Only
        # where the writer sends its bytes on the socket as they are; a writer that transforms
        # them first (TLS) leaves the reader to drain as a publisher does.
        sendmsg = self._sendmsg
        self._send_nowait = (_nonblocking(sock) if sendmsg is not None and sendmsg == sock.sendmsg
                             else None)
        # Guards the socket's outbound byte stream: its holder writes every queued message,
        # each whole. Held across a blocking write, never across a read. An RLock because it
        # knows its owner, which lets a write release it exactly when it holds it.
        self.lock = _owned_lock()
        # Encoded messages waiting for the lock's holder to write them (appended by any
        # thread, taken only under the lock; deque appends and pops are atomic).
        self._queued: deque[bytes] = deque()
        # Guards _closing together with the order of appends to _queued, which is the order
        # on the wire.
        self._order_lock = threading.Lock()
        # Ids of channels whose Close or Close-Ok is queued and that are not open again.
        self._closing: set[int] = set()
        # Ids of channels whose Open is queued and whose Close or Close-Ok is not.
        self._open: set[int] = set()
        #: Methods queued to be written, by signature (counted under _order_lock; stats.py).
        self.sent: dict[Any, int] = {}
        self.last_write = monotonic()
        # How a publisher writes after queueing: at once on threads; under gevent after one
        # yield with the lock held, so the other ready greenlets queue theirs behind it.
        self._drain_queued: Callable[[], None] = self._drain
        if threads_are_greenlets():
            self._ready_first = yield_to_ready()
            self._drain_queued = self._gather_then_drain

    def __call__(
        self,
        frame_type: int,
        channel: int,
        method_sig: tuple[int, int] | None,
        args: bytes | str | None,
        content: Any,
    ) -> None:
        connection = self._connection
        failure = connection._failure
        if failure is not None:
            raise failure.for_caller()
        data = encode_method(frame_type, channel, method_sig, args, content, connection.frame_max)
        if self._sendmsg is not None and len(self._queued) < MAX_QUEUED:
            # An interrupt landing after the append still drains on its way out; one landing
            # even before that leaves the message to the next writer or the reader's next tick
            # (write_nowait), never to nobody.
            try:
                self._enqueue(data, channel, method_sig)
            finally:
                self._drain_queued()
        else:
            timeouts = getattr(self._transport, "write_timeouts", None)
            self._write_waiting(data, channel, method_sig, getattr(timeouts, "value", None))

    def _enqueue(self, data: bytes, channel: int, method_sig: Any) -> bool:
        """Queue ``data`` unless it is a method for a channel closed on the wire before it.

        Once a channel's Close or Close-Ok is queued, RabbitMQ takes any other method on that
        channel, before a new Channel.Open, as a connection error (504 "expected
        'channel.open'") and closes the connection for every thread. Only methods without a
        reply come from threads other than the owner (an ack from a worker thread racing the
        server's close of its consumer's channel); they are dropped, as the server would have
        dropped them: it requeues the closed channel's unacknowledged deliveries.
        """
        with self._order_lock:
            closing = self._closing
            if channel and method_sig in _CHANNEL_LIFECYCLE:
                if method_sig == spec.Channel.Open:
                    closing.discard(channel)
                    self._open.add(channel)
                else:
                    closing.add(channel)
                    self._open.discard(channel)
            elif channel in closing:
                logger.debug("channel %s is closed: dropped %s", channel, method_sig)
                return False
            sent = self.sent
            sent[method_sig] = sent.get(method_sig, 0) + 1
            self._queued.append(data)
        return True

    def wire_state(self, channel: int) -> str | None:
        """What the server has been sent of ``channel``: "open" once its Open is queued,
        "closing" once its Close or Close-Ok is, None before its Open (the server never heard
        of it). Queued methods reach the server unless the connection fails."""
        with self._order_lock:
            if channel in self._open:
                return "open"
            return "closing" if channel in self._closing else None

    def queue_method(self, channel: int, method_sig: Any, args: bytes = b"") -> None:
        """Queue a method without writing it, for the reader thread, which must not block in a
        send: its next tick (write_nowait) or the next writer sends it."""
        connection = self._connection
        data = encode_method(1, channel, method_sig, args, None, connection.frame_max)
        self._enqueue(data, channel, method_sig)

    def write_nowait(self, heartbeat: bool) -> None:
        """The reader thread, on each tick: write what is queued, with a heartbeat first if
        ``heartbeat`` and nothing is queued (queued bytes count as one), without ever blocking.

        The reader is the one thread that notices missed heartbeats, so it must never sleep in
        a send (a peer that stops reading fills the send buffer). What the socket does not
        take now stays queued, in order, for the next writer or the next tick. It is also the
        writer of last resort: a message an interrupt left queued after its thread's last look
        (between the append and the drain) goes out within one tick, not with the next
        publish, which on an idle connection never comes (and heartbeats would stop with it).
        Over TLS (no non-blocking batch write) it queues its heartbeat and drains as a
        publisher does.
        """
        queued = self._queued
        send = self._send_nowait
        if send is None:
            if heartbeat and not queued:
                queued.append(encode_method(8, 0, None, None, None, 0))
            self._drain()
            return
        lock = self.lock
        while heartbeat or queued:
            if not lock.acquire(blocking=False):
                return  # the holder writes what is queued before it lets go
            try:
                if heartbeat and not queued:
                    queued.append(encode_method(8, 0, None, None, None, 0))
                heartbeat = False
                complete = self._flush(send)
            finally:
                lock.release()
            if not complete:
                return

    def reset_after_fork(self) -> None:
        """In a forked child: a new lock, and nothing of the parent's left to write."""
        self.lock = _owned_lock()
        self._order_lock = threading.Lock()
        self._queued = deque()
        self._closing = set()
        self._open = set()
        self.sent = {}

    def _write_waiting(self, data: bytes, channel: int, method_sig: Any,
                       timeout: float | None) -> None:
        """Wait up to ``timeout`` seconds for the lock, then write ``data`` and what is queued
        (the queue is full, so a socket the server stops reading pushes back on publishers;
        or the socket is TLS). Without a timeout the wait ends when the holder lets go: its
        send ends when the peer reads, by TCP_USER_TIMEOUT, or when a failure shuts the socket
        down, and then this publish raises the failure instead of returning as if written."""
        lock = self.lock
        try:
            # Acquired inside the try: an asynchronous exception (dramatiq's TimeLimit) raised
            # as acquire() returns must still release the lock, or every thread would hang.
            if not lock.acquire(timeout=-1 if timeout is None else timeout):
                raise TimeoutError("timed out waiting to write to the shared connection")
            failure = self._connection._failure
            if failure is not None:
                raise failure.for_caller()
            if self._enqueue(data, channel, method_sig):
                self._flush()
        finally:
            if lock._is_owned():
                lock.release()
            self._drain()

    def _drain(self) -> None:
        """Write what is queued unless another thread holds the lock (it writes it then).

        The lock is let go only with the queue seen empty, and a thread that queued a message
        looks again after failing to take the lock, so a message queued just as the writer
        lets go is written by one of the two. An exception (an interrupt) does not stop the
        loop: the queue may hold other threads' messages; it is raised once they are out.
        """
        lock = self.lock
        queued = self._queued
        error: BaseException | None = None
        while queued:
            try:
                if not lock.acquire(blocking=False):
                    break
                self._flush()
            except BaseException as exc:  # noqa: BLE001 - raised below, after the others
                if error is not None:  # failing again: give up on the connection, not loop
                    self._connection._on_write_failure(exc)
                error = exc
            finally:
                if lock._is_owned():
                    lock.release()
        if error is not None:
            raise error

    def _gather_then_drain(self) -> None:
        """Greenlets: take the lock, yield once, then write what is queued.

        One greenlet runs at a time, so a publisher would always find the lock free and send
        its message alone. Holding the lock through one yield lets the greenlets ready to run
        queue their messages behind it and go on (to wait for their confirms), and the batch
        leaves in one sendmsg. Order is the queue's, fixed when each message was appended. An
        exception thrown in at the yield (gevent's Timeout, dramatiq's time limit) lets go of
        the lock and still writes everything queued, once, before it goes on; the yield is
        never taken twice.
        """
        lock = self.lock
        try:
            if lock.acquire(blocking=False) and self._queued:
                self._ready_first()
        finally:
            if lock._is_owned():
                lock.release()
            self._drain()

    def _flush(self, send_nowait: Callable[[Any], int] | None = None) -> bool:
        """Under the lock: write everything queued, up to MAX_BATCH messages per call.

        With ``send_nowait`` (the reader) nothing blocks: what the socket does not take goes
        back to the front of the queue, and the result is False.
        """
        queued = self._queued
        connection = self._connection
        while queued:
            if connection._failure is not None:
                # Gone with the connection, like bytes in a dead socket's buffer: a sender that
                # waits for a reply or a confirm is woken by the failure.
                queued.clear()
                return True
            first = queued[0]
            kept = None
            sent: list[int] = []
            try:
                if self._sendmsg is None:
                    self._transport.write(queued.popleft())
                else:
                    # Never iterate the queue itself: a garbage collection during the
                    # iteration can run finalizers, switch threads and let one append.
                    batch = starmap(queued.popleft, repeat((), min(len(queued), MAX_BATCH)))
                    kept, counted, feed = tee(batch, 3)
                    if send_nowait is not None:
                        if not self._sent_nowait(send_nowait, feed, kept, counted):
                            return False
                        continue
                    # Pops the batch as it sends it. The count is stored by the same C call
                    # (list.extend of a map): an interrupt landing as sendmsg returns would
                    # find a count held only on the stack lost.
                    sent.extend(map(self._sendmsg, (feed,)))
                    if sent[0] < sum(map(len, counted)):  # a signal interrupted the send
                        self._transport.write(b"".join(kept)[sent[0]:])
            except BaseException as exc:
                # Interrupted before the batch left the queue, it is still there for _drain.
                if not queued or queued[0] is not first:
                    self._batch_interrupted(exc, sent[0] if sent else None, kept)
                failure = connection._failure
                if isinstance(exc, OSError) and failure is not None:
                    # The socket was shut because the connection stopped: say why.
                    raise failure.for_caller() from exc
                raise
            self.last_write = monotonic()
        return True

    def _sent_nowait(self, send_nowait: Callable[[Any], int], feed: Any, kept: Any,
                     counted: Any) -> bool:
        """Reader thread, under the lock: send a batch without blocking; whatever the socket
        did not take goes back to the front of the queue (the holder of the lock is the only
        one that takes from it, so the order on the wire is kept). True if all of it left."""
        queued = self._queued
        try:
            sent = send_nowait(feed)
        except (BlockingIOError, InterruptedError):
            queued.extendleft(reversed(list(kept)))
            return False
        self.last_write = monotonic()
        if sent < sum(map(len, counted)):
            queued.appendleft(b"".join(kept)[sent:])
            return False
        return True

    def _batch_interrupted(self, exc: BaseException, sent: int | None, kept: Any) -> None:
        """An exception with a batch out of the queue: fail the connection unless the batch
        surely reached the kernel whole, for nobody can resend other threads' messages.

        ``sent`` is what ``sendmsg`` returned, None if it raised. A blocking send returns early
        for a signal in any thread (the handler runs in the main thread, the system call
        returns in the one the signal hit), so only the count tells a whole batch. A
        :class:`~.tls.TLSSocket` raising has decided itself: it breaks the stream when it
        cannot tell. On an ``ssl.SSLSocket`` (no ``kept``) the batch is the interrupted
        thread's own message, as before combining (see the README's Limits).
        """
        if isinstance(exc, OSError):
            whole = False
        elif kept is None:
            whole = True
        elif sent is not None:
            whole = sent == sum(map(len, kept))
        else:
            whole = isinstance(self._transport.sock, TLSSocket)
        if not whole:
            self._connection._on_write_failure(exc)


def _nonblocking(sock: Any) -> Callable[[Any], int]:
    """``sock.sendmsg`` that never blocks (MSG_DONTWAIT), whatever the socket's own mode."""
    sendmsg = sock.sendmsg

    def send_nowait(buffers: Any) -> int:
        return sendmsg(buffers, (), socket.MSG_DONTWAIT)

    return send_nowait


class FrameBuffer:
    """Receives into one reusable buffer and yields complete ``(type, channel, payload)`` frames.

    ``recv(n)`` allocates ``n`` bytes per read (above glibc's mmap threshold that is an mmap,
    an mremap and a munmap per read: system time on every confirmed publish);
    ``recv_into`` the free end of a buffer kept for the connection's life allocates nothing.
    """

    def __init__(self, initial: bytes = b"", size: int = 64 * 1024) -> None:
        self._buf = bytearray(max(size, 2 * len(initial)))
        self._buf[: len(initial)] = initial
        self._view = memoryview(self._buf)
        # Unparsed bytes are self._buf[self._start:self._end].
        self._start = 0
        self._end = len(initial)

    def receive(self, recv_into: Callable[[memoryview], int]) -> int:
        """Read once into the free end of the buffer; the byte count (0: the peer closed)."""
        if len(self._buf) - self._end < MIN_READ:
            self._make_room()
        received = recv_into(self._view[self._end :])
        self._end += received
        return received

    def _make_room(self) -> None:
        """Move the unparsed tail (a frame still arriving) to the front, growing the buffer
        when that frame would not fit (frames are at most frame_max bytes)."""
        pending = self._end - self._start
        if len(self._buf) - pending < MIN_READ:
            self._view.release()
            grown = bytearray(2 * len(self._buf))
            grown[:pending] = self._buf[self._start : self._end]
            self._buf = grown
            self._view = memoryview(grown)
        else:
            self._buf[:pending] = self._buf[self._start : self._end]
        self._start, self._end = 0, pending

    def parse(self, on_frame: Callable[[tuple[int, int, bytes]], Any]) -> None:
        """Hand every complete frame received so far to ``on_frame``, in order."""
        buf = self._buf
        view = self._view
        offset = self._start
        end = self._end
        while end - offset >= 7:
            frame_type, channel, size = _HEADER.unpack_from(buf, offset)
            frame_end = offset + 7 + size
            if frame_end >= end:
                break
            if buf[frame_end] != 0xCE:
                raise UnexpectedFrame(
                    f"Received frame_end {buf[frame_end]:#04x} while expecting 0xce"
                )
            on_frame((frame_type, channel, view[offset + 7 : frame_end].tobytes()))
            offset = frame_end + 1
        if offset == end:
            self._start = self._end = 0
        else:
            self._start = offset
