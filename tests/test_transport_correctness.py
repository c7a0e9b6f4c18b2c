"""Interrupts, closes and the reader's own writes on a shared connection (issue 12, items 2-6).

Every test runs against the real RabbitMQ (session vhost) and forces its interleaving with
events and hooks on the transport's own seams; the only waits on time are the bounds under
test. ``Interrupt`` stands for dramatiq's TimeLimit, raised where an asynchronous exception can
land.
"""

from __future__ import annotations

import gc
import select
import socket
import threading
import time

import pytest
from amqp import spec
from amqp.exceptions import MessageNacked

import kombu_pyamqp_threadsafe as ts
from kombu_pyamqp_threadsafe import channel as ts_channel
from kombu_pyamqp_threadsafe import connection as ts_connection
from kombu_pyamqp_threadsafe import errors as ts_errors
from kombu_pyamqp_threadsafe import frames, reader
from kombu_pyamqp_threadsafe.errors import ChannelTakenOverError, ConfirmsOutOfStepError
from kombu_pyamqp_threadsafe.inbox import RETIRED, Mailbox
from kombu_pyamqp_threadsafe.singleflight import SingleFlight
from kombu_pyamqp_threadsafe.thread_channel import ThreadChannel
from stress.bounded import run_bounded
from test_transport_routing import publish, wait_message_count
from transport_helpers import Proxy, Worker, join_all, kombu_connection, start_all, url_for


class Interrupt(BaseException):
    """Stands for dramatiq's TimeLimitExceeded (also raised asynchronously)."""


def _once(obj, name, replacement):
    """Replace the instance attribute ``obj.name`` by ``replacement(real)`` for one call."""
    real = getattr(obj, name)

    def hooked(*args, **kwargs):
        setattr(obj, name, real)
        return replacement(real, *args, **kwargs)

    setattr(obj, name, hooked)


# --------------------------------------------------------- 2. confirms after an interrupt


def test_publish_after_an_interrupted_confirmed_publish_is_not_confirmed_early(connect,
                                                                              queue_name):
    """An interrupt lands in the writer just after its send: the server counted the message,
    the channel did not. The queue takes one message and nacks the rest (reject-publish), so
    the next publish must not return normally: before the fix it took the first message's
    ack as its own and returned as if the broker had it."""
    conn = connect(transport_options={"confirm_publish": True})

    def run():
        channel = conn.default_channel
        channel.queue_declare(queue_name, auto_delete=False, arguments={
            "x-max-length": 1, "x-overflow": "reject-publish"})
        channel.basic_publish(channel.prepare_message(b"warm-up"), routing_key="nowhere")
        writer = conn.connection.frame_writer

        def interrupted_after_send(real, buffers):
            real(buffers)
            raise Interrupt  # as TimeLimit landing right after sendmsg returned

        _once(writer, "_sendmsg", interrupted_after_send)
        with pytest.raises(Interrupt):
            publish(channel, b"interrupted", queue_name)
        with pytest.raises((MessageNacked, ConfirmsOutOfStepError)) as raised:
            publish(channel, b"over the limit", queue_name)
        return raised.value, channel

    worker = Worker(run)  # a worker thread, as under dramatiq
    start_all([worker])
    assert join_all([worker], 20) == []
    assert worker.error is None, repr(worker.error)
    error, channel = worker.result
    assert isinstance(error, ConfirmsOutOfStepError)
    assert not channel.is_open
    fresh = conn.default_channel
    assert fresh is not channel
    assert fresh.queue_declare(queue_name, passive=True).message_count == 1
    with pytest.raises(MessageNacked):  # a fresh channel is in step: the nack is its own
        publish(fresh, b"over the limit", queue_name)
    fresh.queue_delete(queue_name)


# ------------------------------------------- 3. a waiter whose channel another thread closes


class _SignallingWakeup:
    """A thread's Wakeup that sets ``sleeping`` each time the thread goes to sleep."""

    def __init__(self, wakeup, sleeping):
        self._wakeup = wakeup
        self._sleeping = sleeping

    def set(self, release_gil=True):
        self._wakeup.set(release_gil)

    def wait(self, timeout):
        self._sleeping.set()
        self._wakeup.wait(timeout)


def test_waiter_gets_an_error_when_another_thread_closes_its_channel(connect):
    """Thread A waits for a reply on its channel; thread B closes the channel (the closer
    adopts it to receive the Close-Ok). A must wake with a clear error. Before the fix A woke
    once, found nothing and slept in drain_events(None) for good."""
    conn = connect()
    amqp_connection = conn.connection
    opened, sleeping = threading.Event(), threading.Event()
    holder = {}

    def waiter():
        channel = holder["channel"] = conn.channel()
        inbox = amqp_connection._current_inbox()
        inbox._wakeup = _SignallingWakeup(inbox._wakeup, sleeping)
        opened.set()
        channel.wait(spec.Basic.QosOk)  # a reply that is not coming

    a = Worker(waiter, name="waiter-A")
    start_all([a])
    assert opened.wait(10)
    assert sleeping.wait(10)
    holder["channel"].close()
    assert join_all([a], 5) == [], "the waiter still sleeps on a channel it no longer owns"
    assert isinstance(a.error, ChannelTakenOverError), repr(a.error)
    assert "waiter-A" in str(a.error)
    assert amqp_connection._failure is None


# ----------------------------------------------------- 4. the reader never blocks in a send


def _fill_send_buffer(amqp_connection):
    """Under the write lock (so no message is split), fill the socket's send buffer with
    heartbeat frames until the kernel takes no more and the buffer stays full; return with
    the lock free and the buffer full. Then single frames until the last segment is full too:
    Linux appends a small write to the last queued segment even when the buffer is full, so
    only then does the next send of any size block."""
    sock = amqp_connection.transport.sock
    writer = amqp_connection.frame_writer
    frame = frames.encode_method(8, 0, None, None, None, 0)
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLOUT)
    with writer.lock:
        for chunk in (frame * 8192, frame):
            while True:
                try:
                    while True:
                        sock.send(chunk, socket.MSG_DONTWAIT)
                except BlockingIOError:
                    pass
                if not poller.poll(300):  # stayed full: the peer takes no more
                    break


def test_silent_peer_with_a_full_send_buffer_is_detected_in_two_heartbeats(vhost,
                                                                          connection_name):
    """The proxy stops reading and the send buffer is full while no thread writes. The reader
    must not sleep in the send of its own heartbeat: it is the one thread that checks for
    missed ones. TCP_USER_TIMEOUT is switched off so the kernel cannot rescue it. Before the
    fix the reader blocked in sendmsg and the waiting thread slept until close()."""
    heartbeat = 2
    with Proxy() as proxy:
        conn = kombu_connection(
            url_for(vhost, proxy.port), connection_name, heartbeat=heartbeat,
            transport_options={"socket_settings": {socket.TCP_USER_TIMEOUT: 0}})
        try:
            conn.ensure_connection(max_retries=3)
            amqp_connection = conn.connection
            assert amqp_connection.heartbeat == heartbeat
            ready = threading.Event()

            def drainer():
                amqp_connection._current_inbox()
                ready.set()
                amqp_connection.drain_events(timeout=6 * heartbeat)

            workers = start_all([Worker(drainer, name="drainer")])
            assert ready.wait(10)
            proxy.pause()
            paused_at = time.monotonic()
            _fill_send_buffer(amqp_connection)
            assert join_all(workers, 4 * heartbeat) == [], "the silent peer went unnoticed"
            error = workers[0].error
            assert isinstance(error, conn.recoverable_connection_errors), repr(error)
            assert "heartbeats missed" in str(error.__cause__), repr(error.__cause__)
            assert workers[0].error_at - paused_at < 2 * heartbeat + 2
            reader_thread = amqp_connection._reader.thread
            reader_thread.join(5)
            assert not reader_thread.is_alive(), "the reader is stuck"
        finally:
            conn.close()


def test_tcp_user_timeout_follows_the_heartbeat(connect):
    """A stuck send fails in about two heartbeat intervals, as a silent peer does (upstream
    sets 1 s whatever the heartbeat); an explicit socket setting wins."""
    option = getattr(socket, "TCP_USER_TIMEOUT", None)
    if option is None:
        pytest.skip("no TCP_USER_TIMEOUT on this platform")

    def user_timeout(conn):
        return conn.connection.transport.sock.getsockopt(socket.IPPROTO_TCP, option)

    assert user_timeout(connect(heartbeat=5)) == 10_000
    # Heartbeats off: not upstream's 1 s, which fails a connection whose peer stops reading
    # for a second (a slow TLS endpoint, a server in a memory alarm).
    assert user_timeout(connect(heartbeat=0)) == 0
    assert user_timeout(connect(heartbeat=5, transport_options={
        "socket_settings": {option: 3000}})) == 3000


# -------------------------------------------------- 5. nothing queued is left without a writer


def test_message_an_interrupt_leaves_queued_is_written_without_another_publish(connect,
                                                                              queue_name):
    """The interrupt lands after the message was queued and before its thread drains. No
    other thread publishes. Before the fix the message stayed queued (and the reader, seeing
    a queue, stopped sending heartbeats, so the server dropped the idle connection); now the
    reader's next tick writes it."""
    conn = connect()
    observer = connect().default_channel
    channel = conn.default_channel
    channel.queue_declare(queue_name, auto_delete=False)
    writer = conn.connection.frame_writer

    def interrupted_drain(real):
        raise Interrupt  # as TimeLimit landing before the drain's first bytecode

    _once(writer, "_drain_queued", interrupted_drain)
    with pytest.raises(Interrupt):
        publish(channel, b"stranded", queue_name)
    assert len(writer._queued) == 1, "the hook did not strand the message"
    assert wait_message_count(observer, queue_name, 1, timeout=3 * reader.IDLE_TICK) == 1
    assert conn.connection._failure is None
    observer.queue_delete(queue_name)


# ----------------------------------------- 6. every waiter bounded or woken; connection errors


def test_close_that_crosses_a_connection_failure_returns_at_once(connect, monkeypatch):
    """The connection fails (the socket is shut under the reader) just after close() sent
    Connection.Close. Before the fix close() waited its full 5 s for a Close-Ok that could not
    come."""
    # Far longer than the bound below: a close that waited for the Close-Ok would hang.
    monkeypatch.setattr(ts_connection, "CLOSE_TIMEOUT", 60.0)
    conn = connect()
    amqp_connection = conn.connection
    writer = amqp_connection.frame_writer

    def fail_after_close(real, frame_type, channel, method_sig, args, content):
        real(frame_type, channel, method_sig, args, content)
        amqp_connection.transport.sock.shutdown(socket.SHUT_RDWR)
        amqp_connection._reader.thread.join(5)  # the reader saw EOF and failed the connection

    amqp_connection.frame_writer = _WriterHook(writer, spec.Connection.Close, fail_after_close)
    run_bounded(amqp_connection.close, 30, "close() across a connection failure")
    assert amqp_connection._failure is not None


class _WriterHook:
    """The connection's frame writer, running ``hook(real, ...)`` for the first ``sig``."""

    def __init__(self, writer, sig, hook):
        self._writer = writer
        self._sig = sig
        self._hook = hook

    def __getattr__(self, name):
        return getattr(self._writer, name)

    def __call__(self, frame_type, channel, method_sig, args, content):
        hook = self._hook
        if method_sig == self._sig and hook is not None:
            self._hook = None
            return hook(self._writer, frame_type, channel, method_sig, args, content)
        return self._writer(frame_type, channel, method_sig, args, content)


def test_inbox_made_after_the_failure_is_woken(connect):
    """A thread's first wait on the connection makes its inbox; the connection fails between
    drain_events' look at the failure and that inbox. Before the fix nothing ever rang it."""
    conn = connect()
    amqp_connection = conn.connection
    real = amqp_connection._current_inbox

    def fail_first():
        del amqp_connection._current_inbox
        closer = start_all([Worker(amqp_connection.collect)])
        assert join_all(closer, 10) == []
        return real()

    def first_wait():
        amqp_connection._current_inbox = fail_first
        amqp_connection.drain_events(timeout=None)

    waiter = start_all([Worker(first_wait)])
    assert join_all(waiter, 5) == [], "the late inbox was never woken"
    assert isinstance(waiter[0].error, ts_errors.ConnectionClosedError), repr(waiter[0].error)


def test_channel_made_while_the_reader_tears_down_raises_a_connection_error(connect):
    """The reader thread tears the connection down while another thread is making a channel
    (between the id and its entry in connection.channels). Before the fix that thread got
    TypeError ('NoneType' object does not support item assignment), which no retry catches."""
    conn = connect()
    amqp_connection = conn.connection
    real = amqp_connection._get_free_channel_id

    def torn_down_meanwhile():
        del amqp_connection._get_free_channel_id
        channel_id = real()
        amqp_connection.transport.sock.shutdown(socket.SHUT_RDWR)
        amqp_connection._reader.thread.join(5)  # the reader saw EOF and tore down
        return channel_id

    amqp_connection._get_free_channel_id = torn_down_meanwhile
    with pytest.raises(conn.recoverable_connection_errors):
        amqp_connection.channel()
    with pytest.raises(conn.recoverable_connection_errors):
        amqp_connection.channel()


def test_publish_with_a_timeout_while_the_reader_tears_down_raises_a_connection_error(connect):
    """The reader tears the connection down just after a publish with a timeout checked that
    its channel was alive. Before the fix: AttributeError ('NoneType' object has no attribute
    'having_timeout'), which no retry catches."""
    conn = connect()
    channel = conn.default_channel
    amqp_connection = conn.connection
    real_class = type(amqp_connection)

    class TornDownOnNextLook(real_class):
        """The connection, torn down by its reader at the next look at its transport."""

        @property
        def transport(self):
            self.__class__ = real_class
            self._transport.sock.shutdown(socket.SHUT_RDWR)
            self._reader.thread.join(5)  # the reader saw EOF and tore down
            return self._transport

    amqp_connection.__class__ = TornDownOnNextLook
    with pytest.raises(conn.recoverable_connection_errors):
        channel.basic_publish(channel.prepare_message(b"m"), routing_key="nowhere", timeout=5)


def test_channel_whose_init_fails_leaves_no_mailbox_behind(connect):
    """A channel whose __init__ raises (here: its id is taken) must not stay in the thread's
    inbox, which would keep it alive and scan it on every empty wait."""
    conn = connect()
    amqp_connection = conn.connection
    taken = conn.default_channel.channel_id
    inbox = amqp_connection._current_inbox()
    before = set(inbox.owned)
    with pytest.raises(Exception, match="already open"):
        ts.Channel(amqp_connection, taken)
    assert set(inbox.owned) == before


def test_pool_channel_given_back_by_an_interrupted_release_is_closed(connect):
    """An interrupt lands in release() before the channel is back in the pool. Before the fix
    the finalizer was already detached: the channel stayed open, neither idle nor leased,
    until the connection closed."""
    conn = connect()
    pool = conn.default_channel_pool
    lease = pool.acquire()
    channel = lease.channel

    def interrupted(real, *args):
        raise Interrupt

    _once(pool, "_give_back", interrupted)
    with pytest.raises(Interrupt):
        lease.release()
    del lease
    gc.collect()
    with pool.acquire() as fresh:
        assert fresh is not channel
    assert not channel.is_open, "the channel of the interrupted release leaked"
    assert pool.in_use == 0


def test_channel_close_without_a_close_ok_is_bounded(connect, monkeypatch):
    """Channel.close() waited for Close-Ok without a timeout (also inside the broker's error
    path). The Close-Ok is kept from the channel here (the reader drops it); close() must give
    up within its bound, and the channel's id must not be handed out again while the server
    may still have the channel (its Close-Ok never came)."""
    monkeypatch.setattr(ts_channel, "CLOSE_OK_TIMEOUT", 0.5, raising=False)
    conn = connect()
    amqp_connection = conn.connection
    channel = conn.channel()
    channel_id = channel.channel_id
    channel._mailbox.__class__ = _DropsCloseOk
    closer = start_all([Worker(channel.close)])
    assert join_all(closer, 5) == [], "close() still waits for its Close-Ok"
    assert isinstance(closer[0].error, OSError), repr(closer[0].error)
    assert channel_id in amqp_connection._used_channel_ids  # reserved: not handed out again
    assert conn.default_channel.queue_declare("", exclusive=True).queue


class _DropsCloseOk(Mailbox):
    """A channel's mailbox that loses the server's Close-Ok (the reader posts, nobody gets it)."""

    __slots__ = ()

    def post(self, method):
        if method[0] == spec.Channel.CloseOk:
            return RETIRED
        return super().post(method)


def test_single_flight_waiter_survives_an_interrupt_in_the_leaders_finally():
    """Pure logic (no server). The leader fails, and a second interrupt lands in its finally.
    Before the fix the waiters waited on an event nobody would set, forever."""
    flight = SingleFlight()
    waiting, armed = threading.Event(), threading.Event()
    leader_ident = []

    class _InterruptingLock:
        """The flight's lock; the leader's second use of it raises as it lets go."""

        def __init__(self, lock):
            self._lock = lock
            self._leader_uses = 0

        def __enter__(self):
            return self._lock.__enter__()

        def __exit__(self, *exc_info):
            self._lock.__exit__(*exc_info)
            if threading.get_ident() in leader_ident:
                self._leader_uses += 1
                if self._leader_uses == 2:
                    raise Interrupt

    flight._lock = _InterruptingLock(flight._lock)

    def leader_fn():
        current = flight._flight
        current.done = _SignallingEvent(waiting)
        armed.set()
        assert waiting.wait(10)
        raise ConnectionError("the leader's attempt failed")

    def lead():
        leader_ident.append(threading.get_ident())
        flight.run(leader_fn, lambda: None)

    leader = start_all([Worker(lead)])
    assert armed.wait(10)
    waiter = start_all([Worker(flight.run, lambda: "connected by the waiter", lambda: None)])
    assert join_all(leader, 10) == []
    assert isinstance(leader[0].error, Interrupt), repr(leader[0].error)
    assert join_all(waiter, 3) == [], "the waiter was stranded"
    assert waiter[0].result == "connected by the waiter"


class _SignallingEvent(threading.Event):
    def __init__(self, waiting):
        super().__init__()
        self._waiting = waiting

    def wait(self, timeout=None):
        self._waiting.set()
        return super().wait(timeout)


class _InterruptedTake(Mailbox):
    """A channel's mailbox whose next take() is interrupted just after it returns."""

    __slots__ = ()

    def take(self, inbox, *args):
        method = super().take(inbox, *args)
        if method is not None:
            self.__class__ = Mailbox
            raise Interrupt  # as TimeLimit landing before the dispatch begins
        return method


def test_delivery_taken_and_lost_to_an_interrupt_is_dispatched_by_the_next_wait(connect,
                                                                               queue_name):
    """An interrupt lands between taking a delivery from the mailbox and dispatching it.
    Before the fix the delivery was gone: never handed to the consumer, never acked, its
    prefetch slot held until the channel closed."""
    conn = connect()
    channel = conn.channel()
    channel.queue_declare(queue_name, auto_delete=False)
    publish(channel, b"m", queue_name)
    received = []
    channel.basic_qos(0, 1, False)
    channel.basic_consume(queue_name, callback=received.append)
    channel._mailbox.__class__ = _InterruptedTake
    with pytest.raises(Interrupt):
        while True:
            conn.drain_events(timeout=5)
    conn.drain_events(timeout=2)
    assert [m.body for m in received] == [b"m"]
    channel.basic_ack(received[0].delivery_tag)
    channel.queue_delete(queue_name)


def test_single_flight_waiter_keeps_to_its_own_timeout():
    """Pure logic (no server). The leader keeps trying (its policy: retry for ever); a waiter
    with a timeout of its own stops waiting after it and makes its own attempt, whose outcome
    is its own. Before the fix it waited as long as the leader tried."""
    flight = SingleFlight()
    leader_in, release_leader = threading.Event(), threading.Event()

    def leader_fn():
        leader_in.set()
        assert release_leader.wait(20)
        return "leader"

    def waiter_fn():
        raise ConnectionError("the waiter's own attempt failed")

    leader = start_all([Worker(flight.run, leader_fn, lambda: None)])
    assert leader_in.wait(10)
    waiter = start_all([Worker(flight.run, waiter_fn, lambda: None, 0.3)])
    try:
        assert join_all(waiter, 3) == [], "the waiter waited past its own timeout"
        assert isinstance(waiter[0].error, ConnectionError), repr(waiter[0].error)
    finally:
        release_leader.set()
    assert join_all(leader, 10) == []
    assert leader[0].result == "leader"


class _SignallingLock:
    """The write lock; sets ``waiting`` when a thread blocks to acquire it."""

    def __init__(self, lock, waiting):
        self._lock = lock
        self._waiting = waiting

    def acquire(self, blocking=True, timeout=-1):
        if blocking and not self._lock.acquire(blocking=False):
            self._waiting.set()
            return self._lock.acquire(blocking, timeout)
        return True if blocking else self._lock.acquire(blocking=False)

    def release(self):
        self._lock.release()

    def _is_owned(self):
        return self._lock._is_owned()

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc_info):
        self.release()


def test_back_pressure_wait_without_timeout_ends_with_the_failure(connect):
    """A publisher waits for the write lock (1,024 messages queued, no publish timeout) while
    the holder is stuck; the connection fails. The wait ends when the holder lets go, and the
    publish raises the failure. Before the fix it returned as if its message were written."""
    conn = connect()
    channel = conn.default_channel
    amqp_connection = conn.connection
    writer = amqp_connection.frame_writer
    waiting = threading.Event()
    writer.lock = _SignallingLock(writer.lock, waiting)
    inbox = amqp_connection._current_inbox()
    message = channel.prepare_message(b"m")

    def publisher():
        for _ in range(frames.MAX_QUEUED + 1):
            channel.basic_publish(message, routing_key="nowhere")

    writer.lock.acquire()  # the holder, stuck in a send
    try:
        worker = start_all([Worker(publisher)])
        assert waiting.wait(10), "the publisher never had to wait for the lock"
        amqp_connection.transport.sock.shutdown(socket.SHUT_RDWR)  # the reader sees EOF
        assert inbox.next_mailbox(timeout=10) is None  # the failure woke this thread
    finally:
        writer.lock.release()
    assert join_all(worker, 10) == [], "the back-pressured publisher was never woken"
    assert isinstance(worker[0].error, conn.recoverable_connection_errors), repr(worker[0].error)



def test_thread_channel_stand_in_replaces_a_closed_channel(connect):
    """The default-channel stand-in keeps each thread's channel between calls; once that
    channel is closed, the next call must open another, not hand the closed one out again."""
    stand_in = ThreadChannel(connect())
    first = stand_in.current()
    assert stand_in.current() is first
    first.close()
    second = stand_in.current()
    assert second is not first and second.is_open
    assert stand_in.queue_declare("", exclusive=True).queue
