"""The shared connection's writer (frames.FrameWriter): combined writes from many threads.

A thread that finds another one writing queues its message for it. These tests show that no
message is ever left in the queue, and that an interrupt landing on the writing thread (as
dramatiq's TimeLimit does) neither drops another thread's message nor breaks the connection.
Everything runs against the real RabbitMQ; threads synchronise with Events.
"""

from __future__ import annotations

import select
import signal
import sys
import threading

import amqp
import pytest
from amqp import spec
from amqp.exceptions import NotFound
from amqp.serialization import dumps
from dramatiq.middleware.threading import raise_thread_exception

from kombu_pyamqp_threadsafe import frames
from test_transport_routing import publish, wait_message_count
from transport_helpers import Proxy, Worker, join_all, poll, start_all, url_for


def test_combined_writes_leave_no_message_behind(connect, queue_name):
    """Publishers that find another thread writing queue their message for it (frames.py). A
    message queued just as the writer lets the lock go must still be written: after every
    round the count is checked from another connection, with no later write on this one that
    could flush a message left behind."""
    conn = connect()
    observer = connect().default_channel
    conn.default_channel.queue_declare(queue_name, auto_delete=False)
    threads, per_thread = 32, 200
    for round_number in range(1, 6):
        barrier = threading.Barrier(threads)

        def publisher(barrier):
            channel = conn.default_channel
            barrier.wait(20)
            for _ in range(per_thread):
                publish(channel, b"m", queue_name)

        workers = [Worker(publisher, barrier) for _ in range(threads)]
        assert join_all(start_all(workers), 60) == []
        assert [w.error for w in workers if w.error is not None] == []
        expected = round_number * threads * per_thread
        assert wait_message_count(observer, queue_name, expected, timeout=10) == expected
    observer.queue_delete(queue_name)


class _LockWithHook:
    """The write lock, running ``before_release`` once, just before the lock is let go."""

    def __init__(self, lock, before_release):
        self._lock = lock
        self._before_release = before_release

    def acquire(self, *args, **kwargs):
        return self._lock.acquire(*args, **kwargs)

    def release(self):
        hook, self._before_release = self._before_release, None
        if hook is not None:
            hook()
        self._lock.release()

    def _is_owned(self):
        return self._lock._is_owned()


def test_message_queued_as_the_writer_lets_go_is_written(connect, queue_name):
    """The race the hammer above rarely hits, made to happen: another thread queues a message
    after the writer's last look at the queue and before it releases the lock (so it cannot
    take the lock itself). The writer must notice and write it."""
    conn = connect()
    observer = connect().default_channel
    channel = conn.default_channel
    channel.queue_declare(queue_name, auto_delete=False)
    ready, go, published = threading.Event(), threading.Event(), threading.Event()

    def late_publisher():
        late_channel = conn.default_channel  # opened now: Channel.Open needs a reply
        ready.set()
        assert go.wait(10)
        publish(late_channel, b"late", queue_name)
        published.set()

    late = start_all([Worker(late_publisher)])

    def let_the_late_publisher_in():
        go.set()
        assert published.wait(10)

    assert ready.wait(10)
    writer = conn.connection.frame_writer
    writer.lock = _LockWithHook(writer.lock, let_the_late_publisher_in)
    publish(channel, b"first", queue_name)
    assert join_all(late, 10) == []
    assert late[0].error is None, repr(late[0].error)
    assert wait_message_count(observer, queue_name, 2) == 2
    observer.queue_delete(queue_name)


class Interrupt(BaseException):
    """Stands for dramatiq's TimeLimitExceeded (also raised asynchronously)."""


def _interrupt_the_writer_before_its_send(conn, observer, queue_name):
    """A writer thread is inside its send (holding the lock) when another thread publishes and
    the writer is interrupted before its batch leaves the queue. Returns what it raised."""
    writer = conn.connection.frame_writer
    real_sendmsg = writer._sendmsg
    inside, go_on = threading.Event(), threading.Event()

    def gated_sendmsg(buffers):
        if not inside.is_set():  # only the writer thread's first batch waits
            inside.set()
            assert go_on.wait(10)
        return real_sendmsg(buffers)

    ready = threading.Event()

    def write():
        channel = conn.default_channel  # Channel.Open needs a reply: open before gating
        ready.set()
        assert inside_wanted.wait(10)
        publish(channel, b"writer", queue_name)

    inside_wanted = threading.Event()
    writer_thread = Worker(write)
    start_all([writer_thread])
    assert ready.wait(10)
    writer._sendmsg = gated_sendmsg
    inside_wanted.set()
    assert inside.wait(10)
    main = conn.default_channel
    publish(main, b"queued", queue_name)  # the lock is taken: this only queues
    raise_thread_exception(writer_thread.ident, Interrupt)
    go_on.set()
    assert join_all([writer_thread], 10) == []
    return writer_thread.error


def test_writer_interrupted_before_its_send_drops_nothing_and_keeps_the_connection(
        connect, queue_name):
    """Both messages are still queued: the interrupted writer writes them on its way out, and
    the connection is not failed."""
    conn = connect()
    observer = connect().default_channel
    conn.default_channel.queue_declare(queue_name, auto_delete=False)
    amqp_connection = conn.connection
    error = _interrupt_the_writer_before_its_send(conn, observer, queue_name)
    assert isinstance(error, Interrupt)
    assert wait_message_count(observer, queue_name, 2) == 2
    assert amqp_connection._failure is None and conn.connection is amqp_connection


#: Larger than every buffer between the client and a paused proxy: its send blocks.
BLOCKING_BODY = 12 << 20


def _inside_its_send(thread: threading.Thread, sock) -> bool:
    """``thread`` is in FrameWriter._flush and the socket's send buffer is full: its message
    (BLOCKING_BODY) is partly copied and the send is blocked."""
    frame = sys._current_frames().get(thread.ident or 0)
    in_flush = frame is not None and frame.f_code is frames.FrameWriter._flush.__code__
    return in_flush and not select.select([], [sock], [], 0)[1]


def test_writer_interrupted_as_its_send_returns_drops_nothing_and_keeps_the_connection(
        connect, vhost, queue_name):
    """The writer is blocked in its send (the peer stops reading) when another thread
    publishes (it only queues) and a TimeLimit is raised in the writer; the peer reads again,
    the send completes whole and the interrupt lands as ``sendmsg`` returns. The writer
    writes what is queued on its way out, and the connection is not failed."""
    with Proxy() as proxy:
        conn = connect(url_for(vhost, proxy.port))
        observer = connect().default_channel
        channel = conn.default_channel
        channel.queue_declare(queue_name, auto_delete=False)
        amqp_connection = conn.connection
        proxy.pause()
        publisher = Worker(publish, channel, b"x" * BLOCKING_BODY, queue_name)
        try:
            start_all([publisher])
            assert poll(lambda: _inside_its_send(publisher, amqp_connection.transport.sock),
                        bool, 20, 0.01)
            publish(channel, b"queued", queue_name)  # the lock is taken: this only queues
            raise_thread_exception(publisher.ident, Interrupt)  # pending until it runs again
            proxy.resume()
            assert join_all([publisher], 20) == []
        finally:
            proxy.resume()
        assert isinstance(publisher.error, Interrupt), repr(publisher.error)
        assert wait_message_count(observer, queue_name, 2) == 2
        assert amqp_connection._failure is None and conn.connection is amqp_connection


def test_message_queued_while_a_batch_leaves_the_queue_is_written_next(connect, queue_name):
    """Another thread can append while a batch is popped (a garbage collection inside the
    send may run finalizers and switch threads): the batch is unchanged and the new message
    goes out in the next one."""
    conn = connect()
    observer = connect().default_channel
    channel = conn.default_channel
    channel.queue_declare(queue_name, auto_delete=False)
    writer = conn.connection.frame_writer
    late = frames.encode_method(
        1, channel.channel_id, spec.Basic.Publish, dumps("Bssbb", (0, "", queue_name, False,
                                                                   False)),
        amqp.Message(b"late"), conn.connection.frame_max)
    real_sendmsg = writer._sendmsg
    appended = []

    def appending_sendmsg(buffers):
        def interleaved():
            for item in buffers:
                if not appended:
                    writer._queued.append(late)
                    appended.append(True)
                yield item
        return real_sendmsg(interleaved())

    writer._sendmsg = appending_sendmsg
    publish(channel, b"first", queue_name)
    assert appended
    assert wait_message_count(observer, queue_name, 2) == 2
    assert conn.connection._failure is None


class _HookAfterCloseOk:
    """Wraps the connection's frame writer: after the Close-Ok for ``channel_id`` is written
    (and before py-amqp reopens the channel), runs ``hook`` once."""

    def __init__(self, writer, channel_id, hook):
        self.writer = writer
        self._channel_id = channel_id
        self._hook = hook

    def __call__(self, frame_type, channel, method_sig, args, content):
        result = self.writer(frame_type, channel, method_sig, args, content)
        if channel == self._channel_id and method_sig == spec.Channel.CloseOk and self._hook:
            hook, self._hook = self._hook, None
            hook()
        return result


def test_ack_racing_the_servers_close_of_its_channel_keeps_the_connection(connect,
                                                                          queue_name):
    """A worker thread acks a delivery just as the server closes the consumer's channel: the
    ack would reach the server after the Close-Ok and before the channel is open again, which
    RabbitMQ answers by closing the whole connection (504 "expected 'channel.open'"). The
    writer drops it instead; the server requeues the delivery anyway."""
    conn = connect()
    channel = conn.default_channel
    channel.queue_declare(queue_name, auto_delete=False)
    publish(channel, b"m", queue_name)
    deliveries = []
    channel.basic_consume(queue_name, callback=deliveries.append)
    while not deliveries:
        conn.drain_events(timeout=5)
    tag = deliveries[0].delivery_tag
    acked = threading.Event()

    def ack_from_a_worker():
        worker = Worker(channel.basic_ack, tag)
        start_all([worker])
        assert join_all([worker], 10) == []
        assert worker.error is None, repr(worker.error)
        acked.set()

    amqp_connection = conn.connection
    amqp_connection.frame_writer = _HookAfterCloseOk(amqp_connection.frame_writer,
                                                     channel.channel_id, ack_from_a_worker)
    with pytest.raises(NotFound):
        channel.queue_declare(f"{queue_name}-missing", passive=True)
    assert acked.is_set()
    # The connection survived: this thread's channel was reopened and works.
    assert channel.queue_declare(queue_name, passive=True).message_count == 1
    assert amqp_connection._failure is None and conn.connection is amqp_connection


@pytest.mark.skipif(not hasattr(signal, "pthread_kill"), reason="needs pthread_kill")
def test_send_cut_short_by_a_signal_then_interrupted_fails_the_connection(connect, vhost,
                                                                          queue_name):
    """A signal that hits a worker thread blocked in its send ends ``sendmsg`` early with
    part of the batch sent (the handler runs in the main thread; the system call returns in
    the thread the signal hit), and a TimeLimit pending meanwhile lands as ``sendmsg``
    returns, before its count is stored. The writer took that for a whole batch and wrote
    nothing more: the server would read the next message as the rest of the cut frame. The
    connection must fail instead."""
    with Proxy() as proxy:
        conn = connect(url_for(vhost, proxy.port))
        amqp_connection = conn.connection
        channel = conn.default_channel
        sock = amqp_connection.transport.sock
        proxy.pause()  # a silent peer: the send blocks once the buffers on the way are full
        publisher = Worker(publish, channel, b"x" * BLOCKING_BODY, queue_name)
        previous = signal.signal(signal.SIGUSR1, lambda *_: None)
        try:
            start_all([publisher])
            assert poll(lambda: _inside_its_send(publisher, sock), bool, 20, 0.01)
            raise_thread_exception(publisher.ident, Interrupt)  # pending until it runs again
            signal.pthread_kill(publisher.ident or 0, signal.SIGUSR1)
            assert join_all([publisher], 10) == []
            assert isinstance(publisher.error, Interrupt), repr(publisher.error)
            assert amqp_connection._failure is not None, "a cut-short batch left unfinished"
        finally:
            signal.signal(signal.SIGUSR1, previous)
            proxy.kill()
            join_all([publisher], 10)
