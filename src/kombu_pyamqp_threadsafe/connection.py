"""A py-amqp connection that many threads share.

After the handshake one :class:`~.reader.Reader` thread owns every read from the socket. It
routes each method to the inbox of the thread that owns the method's channel; that thread
dispatches it when it next waits (``drain_events``, a reply, a confirm). Writes go through
:class:`~.frames.FrameWriter`, whole messages, batched, under one lock. So a broker error on a
channel (a passive declare of a missing queue closes it) is raised in the thread that owns
the channel and nowhere else, and a publisher never waits behind a thread that is reading.
"""

from __future__ import annotations

import logging
import queue
import socket
import threading
import weakref
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from time import monotonic
from typing import Any, NoReturn

from amqp import spec
from amqp import transport as amqp_transport
from amqp.exceptions import AMQPError, ResourceError, error_for_code
from amqp.exceptions import ConnectionError as AMQPConnectionError
from amqp.serialization import dumps
from kombu.transport import pyamqp

from . import forksafe
from .channel import Channel
from .errors import ConnectionClosedError, ConnectionLostError, Failure
from .flow import FlowControl
from .frames import FrameWriter
from .greenlets import threads_are_greenlets
from .inbox import RETIRED, Deferred, Inbox
from .reader import Reader
from .stats import ChannelTotals
from .tls import TLSSocket

logger = logging.getLogger(__name__)

#: Methods a thread waiting for a reply or a confirm leaves for its next drain_events().
DELIVERIES = frozenset({spec.Basic.Deliver})
#: What ends the server's part of an abandoned channel.
_SETTLING = frozenset({spec.Channel.CloseOk, spec.Channel.Close})
#: How long close() waits for the server's Close-Ok before dropping the socket anyway.
CLOSE_TIMEOUT = 5.0
#: How long teardown waits for the reader thread to notice the socket is gone.
READER_JOIN_TIMEOUT = 5.0


class _SharedSocketMixin:
    """Transport whose socket timeout is not changed per call once threads share it.

    Upstream ``having_timeout`` sets the socket's timeout around one call (a publish with
    ``timeout=``). On a socket that other threads write to at the same moment that would
    time out their writes half-way through a message. Once shared, the requested timeout
    bounds how long a writer waits for its turn to write instead (see FrameWriter).
    """

    shared = False
    sock: socket.socket | None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.write_timeouts = threading.local()

    def _shutdown_transport(self) -> None:
        # Upstream unwraps TLS here (a close_notify exchange). Once shared, the socket was shut
        # down first to wake the reader and the writers, so there is nothing left to unwrap.
        if not self.shared:
            super()._shutdown_transport()  # type: ignore[misc]

    @contextmanager
    def having_timeout(self, timeout: float | None) -> Any:
        if not self.shared:
            with super().having_timeout(timeout) as sock:  # type: ignore[misc]
                yield sock
            return
        local = self.write_timeouts
        previous = getattr(local, "value", None)
        local.value = timeout
        try:
            yield self.sock
        finally:
            local.value = previous


class TCPTransport(_SharedSocketMixin, amqp_transport.TCPTransport):
    """Plain TCP transport for a shared connection."""


class SSLTransport(_SharedSocketMixin, amqp_transport.SSLTransport):
    """TLS transport for a shared connection: TLS in a :class:`~.tls.TLSSocket`, so that the
    reader thread and the writers never use the one SSL object at the same time."""

    sock: Any  # the raw socket, then the TLSSocket over it

    # Upstream: wraps the socket in an ``ssl.SSLSocket``, handshakes on it and reads and writes
    # through it. Here: upstream's own wrapping builds the context from the ``ssl`` options
    # (handshake deferred), then a TLSSocket takes its descriptor, handshakes through memory
    # BIOs within connect_timeout and does the socket I/O itself.
    def _setup_transport(self) -> None:
        options = {**self.sslopts, "do_handshake_on_connect": False}
        wrapped = self._wrap_socket(self.sock, **options)
        self.sock = sock = TLSSocket.over(wrapped, timeout=self.connect_timeout)
        sock.do_handshake(self.connect_timeout)
        self._quick_recv = sock.recv
        self._write = sock.sendall


class Connection(pyamqp.Connection):
    """kombu's pyamqp connection, safe to share between threads; each thread owns its channels."""

    Channel = Channel

    # Upstream: Connection.Blocked is read without its argument, so the server's reason is lost
    # (on_blocked gets "connection blocked, see broker logs"). Here its reason is read.
    _METHODS = {**pyamqp.Connection._METHODS,
                spec.Connection.Blocked: spec.method(spec.Connection.Blocked, "s")}

    def __init__(self, *args: Any, blocked_timeout: float | None = None, **kwargs: Any) -> None:
        kwargs.setdefault("frame_writer", FrameWriter)
        super().__init__(*args, **kwargs)
        #: Blocked by the server or not (set by the reader, waited on before each publish).
        self.flow = FlowControl(self.host, blocked_timeout)
        #: Methods received, by signature (counted by the reader; stats.py).
        self.received: dict[Any, int] = {}
        #: Confirms counted by channels already collected (stats.py).
        self.channel_totals = ChannelTotals()
        # Guards _inboxes and the first assignment of _failure (so every inbox that exists
        # when the connection fails is woken exactly once).
        self._inboxes_lock = threading.Lock()
        self._inboxes: weakref.WeakSet[Inbox] = weakref.WeakSet()
        # Guards channel id allocation (upstream's check-then-append on _used_channel_ids) and
        # the collection of abandoned channels (_settle_abandoned).
        self._channel_ids_lock = threading.Lock()
        self._last_channel_id = 0
        self._local = threading.local()
        self._failure: Failure | None = None
        self._reader: Reader | None = None
        # Owners to wake for methods the reader has routed in its current read (reader only).
        self._doorbells: list[tuple[Inbox, Any]] = []
        self._close_ok = threading.Event()
        forksafe.register(self)

    # -- the kombu.Connections using it ----------------------------------------------------

    #: The handles sharing this connection (registry.py sets it; None when not shared).
    handles: weakref.WeakSet[Any] | None = None
    _client: weakref.ref[Any] | None = None

    # Upstream (kombu's transport): ``client`` is the kombu.Connection that opened the
    # connection, a strong reference, and kombu reaches it from channels (maybe_declare's
    # cache, Producer.connection). Here the reader thread keeps the connection alive, so a
    # strong reference would keep its first handle alive too, and a handle dropped without
    # release() could never be collected and close the connection (registry.py). Here it is
    # weak: the handle that opened it while it lives, then any handle still sharing it.
    @property
    def client(self) -> Any:
        ref = self._client
        client = ref() if ref is not None else None
        if client is None and self.handles is not None:
            client = next(iter(self.handles), None)
        return client

    @client.setter
    def client(self, client: Any) -> None:
        self._client = weakref.ref(client) if client is not None else None

    # -- inboxes ---------------------------------------------------------------------------

    def _current_inbox(self) -> Inbox:
        """The calling thread's inbox on this connection, created on first use."""
        inbox = getattr(self._local, "inbox", None)
        if inbox is None:
            inbox = self._local.inbox = Inbox()
            with self._inboxes_lock:
                self._inboxes.add(inbox)
                if self._failure is not None:  # failed before: _fail() did not see this one
                    inbox.wake()
        return inbox

    def _thread_inbox(self) -> Inbox | None:
        return getattr(self._local, "inbox", None)

    # -- connect ---------------------------------------------------------------------------

    # Upstream: builds amqp.transport.Transport. Here the same transports, with per-call socket
    # timeouts disabled once the socket is shared.
    def Transport(self, host: str, connect_timeout: float | None, ssl: Any = False,  # noqa: N802
                  read_timeout: float | None = None, write_timeout: float | None = None,
                  socket_settings: Any = None, **kwargs: Any) -> Any:
        cls = SSLTransport if ssl else TCPTransport
        return cls(host, connect_timeout=connect_timeout, ssl=ssl, read_timeout=read_timeout,
                   write_timeout=write_timeout, socket_settings=socket_settings, **kwargs)

    # Upstream: the handshake, after which every thread reads the socket itself. Here the
    # handshake runs as upstream in the calling thread, then the reader thread takes over.
    def connect(self, callback: Any = None) -> Any:
        if self._failure is not None:
            raise self._failure.for_caller()
        if self.connected:
            return callback() if callback else None
        super().connect(callback)
        self._start_reader()
        return None

    def _start_reader(self) -> None:
        transport = self.transport
        sock = transport.sock
        sock.settimeout(None)
        initial = bytes(getattr(transport, "_read_buffer", b""))
        transport._read_buffer = b""
        transport.shared = True
        self._set_user_timeout(sock, transport)
        self._reader = Reader(
            self, sock, initial, float(self.heartbeat or 0), self.frame_writer,
            name=f"amqp-reader-{self.host}",
        )
        self._reader.start()

    # Upstream: TCP_USER_TIMEOUT is 1 s whatever the heartbeat, so a server that stops reading
    # for a second (a memory alarm: it blocks publishers by not reading) kills the connection.
    # Here, with heartbeats on, it is two heartbeat intervals, the horizon of the reader's
    # missed-heartbeat check, so a send stuck on a dead peer fails in about the same time; with
    # heartbeats off, the system's own retransmission limit (0), as nothing else bounds it then
    # either. A TCP_USER_TIMEOUT given in socket_settings is kept.
    def _set_user_timeout(self, sock: Any, transport: Any) -> None:
        option = getattr(socket, "TCP_USER_TIMEOUT", None)
        settings = getattr(transport, "socket_settings", None) or {}
        if option is None or option in settings:
            return
        with suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, option, int(2000 * float(self.heartbeat or 0)))

    # -- routing and waiting ---------------------------------------------------------------

    # Upstream: dispatches every method in the thread that read it. Here the reader dispatches
    # only connection-level methods (channel 0) and hands the rest to the owner's inbox.
    def on_inbound_method(self, channel_id: int, method_sig: Any, payload: Any,
                          content: Any) -> Any:
        received = self.received
        received[method_sig] = received.get(method_sig, 0) + 1
        if channel_id == 0 or self._reader is None:
            return super().on_inbound_method(channel_id, method_sig, payload, content)
        channels = self.channels
        channel = channels.get(channel_id) if channels is not None else None
        if channel is None:
            logger.debug("dropped %s for unknown channel %s", method_sig, channel_id)
            return None
        if channel._abandoned:
            self._settle_abandoned(channel, method_sig)
            return None
        mailbox = channel._mailbox
        inbox = mailbox.post((method_sig, payload, content))
        if inbox is RETIRED:  # collected or abandoned since the check (Mailbox.retire)
            if channel._abandoned:
                self._settle_abandoned(channel, method_sig)
            return None
        self._doorbells.append((inbox, mailbox))
        return None

    def _settle_abandoned(self, channel: Any, method_sig: Any) -> None:
        """Reader thread (or the abandoning one): an abandoned channel (Channel._abandon) is
        collected, freeing its id, once the server is done with it: on its Close-Ok, or on
        the server's own Close (answered), or at once (``method_sig`` None: it never heard of
        the channel). Anything else for it (an Open-Ok, a delivery in flight) is dropped."""
        if method_sig is not None and method_sig not in _SETTLING:
            return
        with self._channel_ids_lock:  # once, whoever of the two comes first
            channel_id = channel.channel_id
            if channel_id is None:
                return
            channel.connection = self  # upstream close() forgot it; collect() needs it
            channel.collect()
        if method_sig == spec.Channel.Close:
            self.frame_writer.queue_method(channel_id, spec.Channel.CloseOk)

    def _ring_doorbells(self) -> None:
        """Reader thread, after each read: wake the owners of what it brought.

        One ring lets the GIL go as it wakes its owner, who then finds it free. Several ring
        holding the GIL (inbox.py, _write_holding_gil): letting it go at each ring made the
        reader wait for it again after every one, behind the owners it had just woken.
        """
        doorbells = self._doorbells
        release_gil = len(doorbells) == 1
        for inbox, mailbox in doorbells:
            inbox.put(mailbox, release_gil)
        doorbells.clear()

    # Upstream: reads the socket until one method arrives. Here: dispatch the next method for a
    # channel the calling thread owns; socket.timeout when none arrives within ``timeout``.
    # Inside a wait for a reply or a confirm (waiting_for_reply), the owner of the channel is
    # checked first, the wait is bounded while the server blocks the connection (flow.py), and
    # consumer deliveries are left for the thread's next plain drain_events(): upstream runs
    # them nested in the wait, which on a connection shared by several kombu.Connections runs a
    # consumer's callback inside another's publish (Celery's worker: a task-received event
    # re-entering its dispatcher).
    def drain_events(self, timeout: float | None = None) -> None:
        failure = self._failure
        if failure is not None:
            raise failure.for_caller()
        if self._reader is None:
            return super().drain_events(timeout=timeout)
        inbox = self._current_inbox()
        local = self._local
        waiting_on = getattr(local, "waiting_on", None)
        wait = timeout
        if waiting_on is not None:
            waiting_on._check_still_owned(inbox)
            # A reply (a confirm, a declare-ok, a channel's open-ok) does not come while the
            # server blocks the connection: wait at most blocked_timeout from the start of the
            # block (flow.py).
            wait = self.flow.bound_confirm_wait(timeout)
        defer = getattr(local, "defer", None)
        deadline = None if wait is None else monotonic() + max(wait, 0.0)
        deferred: list[Any] = []  # doorbells left for later, in order
        scanned: dict[Any, int] = {}  # how many methods of a mailbox are known to be deferred
        try:
            while True:
                remaining = None if deadline is None else max(deadline - monotonic(), 0.0)
                try:
                    mailbox = inbox.next_mailbox(remaining, skip=scanned)
                except queue.Empty:
                    if wait != timeout:  # the block's bound ran out, not the caller's
                        self.flow.bound_confirm_wait(timeout)  # raises PublishBlockedError
                        return None  # unblocked meanwhile
                    raise TimeoutError("timed out") from None
                if mailbox is None:
                    failure = self._failure
                    if failure is not None:
                        raise failure.for_caller()
                    return None
                method = mailbox.take(inbox, defer, scanned.get(mailbox, 0))
                if isinstance(method, Deferred):
                    deferred.append(mailbox)
                    scanned[mailbox] = method.scanned
                    continue
                if method is None:
                    return None
                channel = mailbox.channel
                if channel is None or channel.connection is None:
                    mailbox.dispatching(*method)  # its channel is gone: nobody dispatches it
                    return None
                channel.dispatch_method(*method)
                return None
        finally:
            if deferred:
                inbox.put_back(deferred)

    @contextmanager
    def waiting_for_reply(self, channel: Any, defer: bool = True) -> Iterator[None]:
        """The calling thread waits for a reply on ``channel``: each drain_events() meanwhile
        checks that the channel is still the caller's (another thread may close it), is bounded
        while the server blocks the connection, and with ``defer`` leaves consumer deliveries
        for the thread's next plain drain_events()."""
        local = self._local
        previous = getattr(local, "waiting_on", None), getattr(local, "defer", None)
        try:
            local.waiting_on = channel
            if defer:
                local.defer = DELIVERIES
            yield
        finally:
            local.waiting_on, local.defer = previous

    # Upstream: refuses once teardown set channels to None. Here channels stays a dict (see
    # _teardown), so a connection that stopped says why before making a channel.
    def channel(self, channel_id: int | None = None, callback: Any = None) -> Any:
        failure = self._failure
        if failure is not None:
            raise failure.for_caller()
        return super().channel(channel_id, callback)

    # Upstream: ticks heartbeats when the application calls it. Here the reader thread ticks
    # them on every connection, so this is a no-op kept for kombu's heartbeat_check().
    def heartbeat_tick(self, rate: int = 2) -> None:
        return None

    # Upstream: hands out the lowest free id, so a closed channel's id is reused at once and a
    # frame the server sent on the old channel (a Close-Ok crossing our Close) can reach the new
    # one. Here ids go round-robin: an id comes back only after all channel_max others.
    def _get_free_channel_id(self) -> int:
        with self._channel_ids_lock:
            used = set(self._used_channel_ids)
            channel_max = self.channel_max
            for step in range(1, channel_max + 1):
                channel_id = (self._last_channel_id + step - 1) % channel_max + 1
                if channel_id not in used:
                    self._used_channel_ids.append(channel_id)
                    self._last_channel_id = channel_id
                    return channel_id
        raise ResourceError(
            f"No free channel ids, current={len(used)}, channel_max={channel_max}",
            spec.Channel.Open,
        )

    def _claim_channel_id(self, channel_id: int) -> int:
        with self._channel_ids_lock:
            return super()._claim_channel_id(channel_id)

    # -- connection-level methods (run on the reader thread) -------------------------------

    # Upstream: answers Close-Ok, collects the connection and raises in the reading thread.
    # Here the reader answers and raises; its failure handler wakes and fails every thread.
    # The Close-Ok is only queued and written if the socket takes it now: written as a
    # publisher writes, it could wait for the write lock behind a send stuck on a peer that
    # stopped reading (with the queue full), and nothing would fail the connection then.
    def _on_close(self, reply_code: int, reply_text: str, class_id: int,
                  method_id: int) -> NoReturn:
        if self._reader is None:
            super()._on_close(reply_code, reply_text, class_id, method_id)
        writer = self.frame_writer
        with suppress(OSError, AMQPError):
            writer.queue_method(0, spec.Connection.CloseOk)
            writer.write_nowait(False)
        raise error_for_code(reply_code, reply_text, (class_id, method_id), AMQPConnectionError)

    # Upstream: calls on_blocked; kombu then notices the block only when it drains the connection
    # before its next publish. Here the reader records it, so publishers wait before they write
    # (see flow.py); threads waiting for a confirm are woken to bound that wait.
    def _on_blocked(self, reason: str = "") -> None:
        if self.flow.block(reason):
            with self._inboxes_lock:
                inboxes = list(self._inboxes)
            for inbox in inboxes:
                inbox.wake()
        if self.on_blocked:
            self.on_blocked(reason)

    def _on_unblocked(self) -> None:
        self.flow.unblock()
        super()._on_unblocked()

    # Upstream: Close-Ok collects the connection. Here it tells close() that the server is done.
    def _on_close_ok(self) -> None:
        reader = self._reader
        if reader is None:
            return super()._on_close_ok()
        reader.stop()  # the server closes the socket next; that EOF is not a failure
        self._close_ok.set()
        return None

    def _on_reader_failure(self, exc: BaseException) -> None:
        logger.warning("AMQP connection to %s lost: %s", self.host, exc)
        self._fail(Failure(ConnectionLostError, f"AMQP connection lost: {exc}", exc))
        self._teardown()

    def _on_write_failure(self, exc: BaseException) -> None:
        """A write broke off with other threads' messages in it: nobody can resend those, so
        the connection fails and every thread waiting on it gets a recoverable error."""
        self._fail(Failure(ConnectionLostError, f"AMQP connection lost: write failed: {exc!r}",
                           exc))

    # -- failure and teardown ----------------------------------------------------------------

    def _fail(self, failure: Failure) -> bool:
        """Record why the connection stopped and wake every thread; the first reason wins."""
        with self._inboxes_lock:
            if self._failure is not None:
                return False
            self._failure = failure
            inboxes = list(self._inboxes)
        self.flow.end()
        transport = self._transport
        if transport is not None:
            transport.connected = False
            sock = transport.sock
            if sock is not None:
                # Wakes the reader (EOF) and any writer blocked in a send (EPIPE).
                with suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
        for inbox in inboxes:
            inbox.wake()
        self._close_ok.set()  # a close() waiting for its Close-Ok waits no more
        return True

    def _teardown(self) -> None:
        """Stop the reader, close the socket, collect channels. Safe from any thread."""
        reader = self._reader
        if reader is not None:
            reader.stop()
            if reader.thread is not threading.current_thread():
                reader.thread.join(READER_JOIN_TIMEOUT)
        transport = self._transport
        if transport is not None:
            # Under the write lock, so no writer is inside a send on a descriptor being closed.
            writer = self._frame_writer
            locked = isinstance(writer, FrameWriter) and writer.lock.acquire(
                timeout=READER_JOIN_TIMEOUT)
            try:
                with suppress(OSError):
                    transport.close()
            finally:
                if locked:
                    writer.lock.release()
        channels = self.channels
        if channels:
            for channel in list(channels.values()):
                if channel is not self:
                    channel._failure = self._failure
                    channel.collect()
            # Upstream sets channels to None; other threads may be inside py-amqp code that
            # indexes it (a Channel being made), and would get TypeError, not a connection
            # error. Here it stays a dict, emptied (it holds this connection as channel 0):
            # what they do next reaches the writer, which raises the failure.
            channels.clear()
        self._transport = self.connection = None

    # Upstream: closes the socket and forgets the channels. Here the same, after stopping the
    # reader and failing every waiting thread with a clear error.
    def collect(self) -> None:
        self._fail(Failure(ConnectionClosedError, "AMQP connection was collected", None))
        self._teardown()

    # Upstream: sends Close and reads until Close-Ok. Here the reader receives the Close-Ok;
    # this thread waits for it (bounded), then tears the connection down. The Close is only
    # queued and written if the socket takes it now (else by the lock's holder or the
    # reader's next tick): close() is how the application ends a connection whose send is
    # stuck on a peer that stopped reading, so it must not wait for the write lock itself.
    def close(self, reply_code: int = 0, reply_text: str = "", method_sig: tuple[int, int] = (0, 0),
              argsig: str = "BsBB") -> None:
        if self._reader is None:
            if self._failure is None:
                return super().close(reply_code, reply_text, method_sig, argsig)
            return None
        try:
            if self._failure is None:
                self.is_closing = True
                try:
                    writer = self.frame_writer
                    writer.queue_method(0, spec.Connection.Close, dumps(
                        argsig, (reply_code, reply_text, method_sig[0], method_sig[1])))
                    writer.write_nowait(False)
                    self._close_ok.wait(CLOSE_TIMEOUT)
                except (OSError, AMQPError):
                    pass
                finally:
                    self.is_closing = False
        finally:
            # Also when interrupted in the wait: the reader stops at the Close-Ok, so nothing
            # else would fail the connection and wake the threads waiting on it.
            self._fail(Failure(ConnectionClosedError,
                               "AMQP connection closed by the application", None))
            self._teardown()
        return None

    # -- fork ------------------------------------------------------------------------------

    def _after_fork_in_child(self) -> None:
        """In a forked child: never touch the parent's socket; fail so kombu reconnects.

        Threads do not survive fork(), greenlets do (gevent's fork keeps them all): the
        reader's ends quietly at its next look at the socket, and those waiting on an inbox
        are woken to raise the failure instead of waiting for a reply that cannot come.
        """
        inherited = list(self._inboxes) if threads_are_greenlets() else []
        reader = self._reader
        if reader is not None:
            reader.stop()
        self._inboxes_lock = threading.Lock()
        self._channel_ids_lock = threading.Lock()
        self._inboxes = weakref.WeakSet()
        self._local = threading.local()
        self._reader = None
        # Locks a parent's thread may have held at fork(), which collecting the inherited
        # connection here takes: each channel's mailbox's and the totals'. close()'s Event
        # likewise (_fail() sets it); the flow state is reopened (it holds no lock).
        self.channel_totals._after_fork_in_child()
        self.flow._after_fork_in_child()
        self._close_ok = threading.Event()
        for channel in list((self.channels or {}).values()):
            mailbox = getattr(channel, "_mailbox", None)
            if mailbox is not None:
                mailbox._after_fork_in_child()
        self._failure = Failure(
            ConnectionLostError,
            "AMQP connection was inherited across fork(); this process opens its own", None,
        )
        writer = self._frame_writer
        if isinstance(writer, FrameWriter):
            writer.reset_after_fork()
        transport = self._transport
        if transport is not None:
            sock, transport.sock = transport.sock, None
            transport.connected = False
            if sock is not None:
                # close() only drops this process's descriptor; shutdown() would end the
                # parent's connection too.
                with suppress(OSError):
                    sock.close()
        for inbox in inherited:
            inbox.wake()
