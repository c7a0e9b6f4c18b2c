"""Failures of the shared connection against the real RabbitMQ: heartbeats, a silent peer,
server-side close and reconnect, application close, leaks, fork."""

from __future__ import annotations

import logging
import os
import select
import sys
import threading
import time
from collections import Counter
from contextlib import suppress

import kombu
import pytest

import kombu_pyamqp_threadsafe as ts
from kombu_pyamqp_threadsafe import channel as ts_channel
from kombu_pyamqp_threadsafe import connection as ts_connection
from kombu_pyamqp_threadsafe import frames
from stress import rabbit_admin
from stress.bounded import run_bounded
from transport_helpers import (
    Proxy,
    Worker,
    assert_cycles_leak_nothing,
    join_all,
    kombu_connection,
    provoke_server_close,
    reap_child,
    settled,
    start_all,
    url_for,
    wait_message_count,
)
from transport_helpers import poll as poll_until


def publish(channel, body, routing_key):
    channel.basic_publish(channel.prepare_message(body), exchange="", routing_key=routing_key)


def warnings_in(caplog):
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


def blocked_drainer(conn, ready):
    """Consume from an exclusive queue, then block in drain_events(timeout=None) until the
    connection fails under it.

    It drains the py-amqp level connection it consumes on (what ``conn.drain_events()`` does)
    because kombu's ``conn.drain_events()`` would first reconnect silently if the connection
    was already dead when it is called, and then wait on the new one forever.
    """
    channel = conn.channel()
    amqp_connection = channel.connection
    queue_name = channel.queue_declare("", exclusive=True).queue
    channel.basic_consume(queue_name, callback=lambda m: None, no_ack=True)
    ready.wait(10)
    while True:
        amqp_connection.drain_events(timeout=None)


# ----------------------------------------------------------------------------- heartbeats


def test_idle_publish_only_connection_outlives_heartbeats(connect, connection_name, queue_name,
                                                          server_connections, caplog):
    conn = connect(heartbeat=2)
    assert conn.connection.heartbeat == 2
    channel = conn.default_channel
    channel.queue_declare(queue_name, auto_delete=False)
    publish(channel, b"before", queue_name)
    # Nobody drains: only the reader thread can keep the heartbeats going.
    time.sleep(7)
    assert conn.connected
    assert server_connections(connection_name) == 1
    publish(channel, b"after", queue_name)
    assert wait_message_count(channel, queue_name, 2) == 2
    assert warnings_in(caplog) == []
    channel.queue_delete(queue_name)


@pytest.mark.parametrize("with_blocked_writer", [False, True],
                         ids=["heartbeats-only", "with-writer-blocked-in-sendall"])
def test_silent_peer_fails_every_waiting_thread(vhost, connection_name, server_connections,
                                                with_blocked_writer):
    """The proxy stops forwarding (sockets stay open). Without traffic only the heartbeats
    can tell: the threads fail after two missed intervals. With a writer blocked in sendall
    the kernel may fail the socket sooner (py-amqp sets TCP_USER_TIMEOUT=1 s): any
    recoverable error, in time, for every thread."""
    heartbeat = 2
    with Proxy() as proxy:
        conn = kombu_connection(url_for(vhost, proxy.port), connection_name,
                                heartbeat=heartbeat, transport_options={"confirm_publish": True})
        try:
            conn.ensure_connection(max_retries=3)
            amqp_connection = conn.connection
            assert amqp_connection.heartbeat == heartbeat
            ready = threading.Barrier(4 if with_blocked_writer else 3)
            go = threading.Event()

            def confirm_waiter():
                channel = conn.channel()
                queue_name = channel.queue_declare("", exclusive=True).queue
                publish(channel, b"confirmed", queue_name)  # confirm.select done
                ready.wait(10)
                go.wait(10)
                publish(channel, b"never confirmed", queue_name)

            def blocked_writer():
                channel = conn.channel()
                queue_name = channel.queue_declare("", exclusive=True).queue
                message = channel.prepare_message(b"x" * (1024 * 1024))
                ready.wait(10)
                go.wait(10)
                while True:  # no confirms: fills the socket buffers, then blocks in sendall
                    channel._basic_publish(message, exchange="", routing_key=queue_name)

            workers = [Worker(blocked_drainer, conn, ready, name="drainer"),
                       Worker(confirm_waiter, name="confirm-waiter")]
            if with_blocked_writer:
                workers.append(Worker(blocked_writer, name="blocked-writer"))
            start_all(workers)
            ready.wait(10)
            proxy.pause()
            paused_at = time.monotonic()
            go.set()
            # Nothing but the failure of the connection wakes them (no thread has a timeout of
            # its own): a check that never fired leaves them waiting for ever.
            assert join_all(workers, 30) == [], "threads still waiting"
            outcomes = [(w.name, w.error_at - paused_at, repr(w.error)) for w in workers]
            failure = amqp_connection._failure
            for worker in workers:
                assert isinstance(worker.error, conn.recoverable_connection_errors), outcomes
                if not with_blocked_writer:  # the heartbeat check failed them all
                    assert worker.error.__cause__ is failure.cause, outcomes
                    # Two missed intervals, not a premature failure.
                    assert worker.error_at - paused_at > heartbeat, outcomes
            if not with_blocked_writer:
                assert "heartbeats missed" in repr(failure.cause), repr(failure.cause)
            assert not conn.connected
        finally:
            conn.close()
    assert server_connections.wait(connection_name, 0) == 0


# ---------------------------------------------------------------------- server close


def test_server_close_wakes_threads_and_reconnect_is_single_flight(
        connect, vhost, connection_name, queue_name, server_connections):
    conn = connect()
    assert server_connections.wait(connection_name, 1) == 1
    old_default = conn.default_channel
    old_default.queue_declare(queue_name, auto_delete=False)
    pool = conn.default_channel_pool
    with pool.acquire() as pooled:
        old_pooled = pooled
    old_connection = conn.connection

    ready = threading.Barrier(5)
    drainers = start_all([Worker(blocked_drainer, conn, ready, name=f"drainer-{n}")
                          for n in range(4)])
    ready.wait(10)
    rabbit_admin.close_all_connections("test: server-side close", vhost=vhost)
    closed_at = time.monotonic()
    assert join_all(drainers, 5) == [], "drainers not woken by the server's close"
    for worker in drainers:
        assert isinstance(worker.error, conn.recoverable_connection_errors), repr(worker.error)
        assert worker.error_at - closed_at < 2.0
    assert not conn.connected

    barrier = threading.Barrier(16)

    def ensurer():
        barrier.wait(10)
        conn.ensure_connection(max_retries=3)
        return conn.connection

    ensurers = start_all([Worker(ensurer) for _ in range(16)])
    assert join_all(ensurers, 20) == []
    for worker in ensurers:
        assert worker.error is None, repr(worker.error)
    new_connection = ensurers[0].result
    assert new_connection is not old_connection
    assert all(worker.result is new_connection for worker in ensurers)
    assert server_connections.wait(connection_name, 1) == 1

    # Nothing of the dead connection is handed out again.
    new_default = conn.default_channel
    assert new_default is not old_default
    assert new_default.connection is new_connection and new_default.is_open
    assert not old_default.is_open and not old_pooled.is_open
    with pool.acquire() as channel:
        assert channel is not old_pooled
        assert channel.connection is new_connection and channel.is_open
    channel_of_thread = Worker(lambda: conn.default_channel)
    channel_of_thread.start()
    assert join_all([channel_of_thread], 10) == []
    assert channel_of_thread.result.connection is new_connection

    # kombu's ensure(): the publish fails on the dead connection and is retried on a new one.
    producer = kombu.Producer(conn.default_channel)
    errors = []
    ensured_publish = conn.ensure(producer, producer.publish, max_retries=3,
                                  errback=lambda exc, interval: errors.append(exc),
                                  interval_start=0, interval_step=0.2)
    ready = threading.Barrier(2)
    drainer = Worker(blocked_drainer, conn, ready, name="drainer")
    drainer.start()
    ready.wait(10)
    rabbit_admin.close_all_connections("test: server-side close 2", vhost=vhost)
    assert join_all([drainer], 5) == []
    assert isinstance(drainer.error, conn.recoverable_connection_errors)
    ensured_publish(b"retried", exchange="", routing_key=queue_name)
    assert len(errors) == 1 and isinstance(errors[0], conn.recoverable_connection_errors)
    assert producer.channel.connection is conn.connection is not new_connection
    assert wait_message_count(conn.default_channel, queue_name, 1) == 1
    assert server_connections.wait(connection_name, 1) == 1
    conn.default_channel.queue_delete(queue_name)


def test_concurrent_ensure_connection_opens_one_connection_per_failure(vhost, connection_name):
    """20 rounds: the server closes the connection, 16 threads reconnect at once, the proxy in
    front of the server counts the TCP connections opened: exactly one per round."""
    with Proxy() as proxy:
        conn = kombu_connection(url_for(vhost, proxy.port), connection_name)
        try:
            conn.ensure_connection(max_retries=3)
            assert proxy.accepted == 1
            for round_number in range(20):
                dead = conn.connection
                ready = threading.Barrier(2)
                drainer = Worker(blocked_drainer, conn, ready)
                drainer.start()
                ready.wait(10)
                provoke_server_close(conn)
                assert join_all([drainer], 5) == []
                assert isinstance(drainer.error, conn.recoverable_connection_errors), (
                    repr(drainer.error))
                barrier = threading.Barrier(16)

                def ensurer(barrier=barrier):
                    barrier.wait(10)
                    conn.ensure_connection(max_retries=3)
                    channel = conn.default_channel
                    assert channel.is_open
                    return conn.connection

                ensurers = start_all([Worker(ensurer) for _ in range(16)])
                assert join_all(ensurers, 20) == []
                for worker in ensurers:
                    assert worker.error is None, repr(worker.error)
                    assert worker.result is not dead
                    assert worker.result is ensurers[0].result
                assert proxy.accepted == round_number + 2
        finally:
            conn.close()


def _send_blocked(thread: threading.Thread, sock) -> bool:
    """``thread`` is in FrameWriter._flush, holding the write lock, and the socket's send
    buffer is full: its send is blocked."""
    frame = sys._current_frames().get(thread.ident or 0)
    in_flush = frame is not None and frame.f_code is frames.FrameWriter._flush.__code__
    return in_flush and not select.select([], [sock], [], 0)[1]


def _stuck_send_with_the_queue_full(proxy, publisher, channel, queue_name):
    """Pause ``proxy`` (the peer reads nothing more), start ``publisher`` (a message larger
    than every buffer on the way) until its send is blocked holding the write lock, then queue
    MAX_QUEUED messages behind it: the next write waits for the lock."""
    proxy.pause()
    start_all([publisher])
    amqp_connection = channel.connection
    sock = amqp_connection.transport.sock
    assert poll_until(lambda: _send_blocked(publisher, sock), bool, 20, 0.01)
    writer = amqp_connection.frame_writer
    while len(writer._queued) < frames.MAX_QUEUED:
        publish(channel, b"queued", queue_name)  # the lock is taken: only queued


def test_servers_close_fails_every_thread_while_a_send_is_stuck(vhost, connection_name,
                                                                 queue_name, monkeypatch):
    """The reader answers the server's Connection.Close with Close-Ok. When a publisher holds
    the write lock, blocked in its send on a peer that stopped reading, and MAX_QUEUED
    messages wait behind it, a Close-Ok written as a publisher writes waited for that lock:
    the reader slept there, so nothing failed the connection, and no thread waiting on it
    was woken (with heartbeats off, ever). The reader only queues its Close-Ok and fails the
    connection: every thread gets the error, the stuck send included."""
    arrived, release = threading.Event(), threading.Event()
    real_on_close = ts_connection.Connection._on_close

    def held_on_close(self, *args):  # the reader has read the server's Close
        arrived.set()
        release.wait(10)
        return real_on_close(self, *args)

    # Before connecting: py-amqp binds its handlers when the connection is made.
    monkeypatch.setattr(ts_connection.Connection, "_on_close", held_on_close)
    with Proxy() as proxy:
        conn = kombu_connection(url_for(vhost, proxy.port), connection_name)
        amqp_connection = conn.connection
        channel = conn.default_channel
        subscribed = threading.Event()

        def drain():
            own = conn.channel()
            name = own.queue_declare("", exclusive=True).queue
            own.basic_consume(name, callback=lambda message: None, no_ack=True)
            subscribed.set()
            while True:
                amqp_connection.drain_events(timeout=None)

        drainer = Worker(drain)
        publisher = Worker(publish, channel, b"x" * (12 << 20), queue_name)
        try:
            start_all([drainer])
            assert subscribed.wait(10)
            provoke_server_close(conn)
            assert arrived.wait(10)
            _stuck_send_with_the_queue_full(proxy, publisher, channel, queue_name)
            release.set()
            assert poll_until(lambda: amqp_connection._failure, bool, 10, 0.01), (
                "the reader is stuck answering the server's Close")
            assert join_all([drainer, publisher], 10) == []
            assert isinstance(drainer.error, ts.ConnectionLostError), repr(drainer.error)
            assert isinstance(publisher.error, ts.ConnectionLostError), repr(publisher.error)
        finally:
            release.set()
            proxy.kill()
            join_all([drainer, publisher], 10)
            conn.release()


# ------------------------------------------------------------------------ application close


def test_close_ends_a_connection_whose_send_is_stuck_with_the_queue_full(
        vhost, connection_name, queue_name, monkeypatch):
    """close() is how the application ends a connection stuck on a peer that stopped reading
    (with heartbeats off nothing else does). Its Close, written as a publisher writes, waited
    for the write lock behind the stuck send once MAX_QUEUED messages were queued: close()
    never returned. It queues its Close, waits CLOSE_TIMEOUT for the Close-Ok and fails the
    connection, which ends the stuck send."""
    monkeypatch.setattr(ts_connection, "CLOSE_TIMEOUT", 0.5)  # no Close-Ok comes through
    with Proxy() as proxy:
        conn = kombu_connection(url_for(vhost, proxy.port), connection_name)
        amqp_connection = conn.connection
        channel = conn.default_channel
        publisher = Worker(publish, channel, b"x" * (12 << 20), queue_name)
        closer = Worker(amqp_connection.close)
        try:
            _stuck_send_with_the_queue_full(proxy, publisher, channel, queue_name)
            start_all([closer])
            assert join_all([closer], 20) == [], "close() waits behind the stuck send"
            assert closer.error is None, repr(closer.error)
            assert join_all([publisher], 10) == []
            assert isinstance(publisher.error, ts.ConnectionClosedError), repr(publisher.error)
        finally:
            proxy.kill()
            join_all([closer, publisher], 10)
            conn.release()


def test_channel_close_is_bounded_while_a_send_is_stuck_with_the_queue_full(
        vhost, connection_name, queue_name, monkeypatch):
    """Channel.close() waits CLOSE_OK_TIMEOUT for its Close-Ok, but its Close, written as a
    publisher writes, waited for the write lock behind a send stuck on a peer that stopped
    reading once MAX_QUEUED messages were queued (dramatiq's worker closes its consumers
    this way on stopping): without heartbeats, forever. The same bound covers that wait;
    then the channel is abandoned."""
    monkeypatch.setattr(ts_channel, "CLOSE_OK_TIMEOUT", 0.5)
    with Proxy() as proxy:
        conn = kombu_connection(url_for(vhost, proxy.port), connection_name)
        channel = conn.default_channel
        closing = conn.channel()
        publisher = Worker(publish, channel, b"x" * (12 << 20), queue_name)
        closer = Worker(closing.close)
        try:
            _stuck_send_with_the_queue_full(proxy, publisher, channel, queue_name)
            start_all([closer])
            assert join_all([closer], 20) == [], "Channel.close() waits behind the stuck send"
            assert isinstance(closer.error, TimeoutError), repr(closer.error)
            assert not closing.is_open
        finally:
            proxy.kill()
            join_all([closer, publisher], 10)
            conn.release()


def _close_scenario(conn, monkeypatch):
    """A thread blocked in drain_events(None), a publisher mid-loop, 100 open channels;
    conn.close() from the main thread, which must return without waiting out a timeout (the
    Close-Ok waits are made far longer than its bound). Returns (drainer, publisher)."""
    monkeypatch.setattr(ts_connection, "CLOSE_TIMEOUT", 60.0)
    monkeypatch.setattr(ts_channel, "CLOSE_OK_TIMEOUT", 60.0)
    channels = [conn.channel() for _ in range(100)]
    ready = threading.Barrier(2)
    publishing = threading.Event()

    def publisher():
        channel = conn.channel()
        queue_name = channel.queue_declare("", exclusive=True).queue
        count = 0
        while True:
            publish(channel, b"p", queue_name)
            count += 1
            if count == 20:
                publishing.set()

    drainer = Worker(blocked_drainer, conn, ready, name="drainer")
    pub = Worker(publisher, name="publisher")
    start_all([drainer, pub])
    ready.wait(10)
    assert publishing.wait(10)
    run_bounded(conn.close, 30, "close() under a blocked drainer and a publisher")
    assert join_all([drainer, pub], 10) == [], "threads still blocked after close()"
    assert all(not channel.is_open for channel in channels)
    return drainer, pub


def _assert_closed_error(conn, error):
    assert isinstance(error, ts.ConnectionClosedError), repr(error)
    assert not isinstance(error, conn.recoverable_connection_errors)


def test_close_returns_promptly_and_wakes_threads_with_closed_error(
        connect, vhost, connection_name, server_connections, caplog, monkeypatch):
    conn = connect()
    [info] = rabbit_admin.find_connections(connection_name, vhost=vhost)
    drainer, publisher = _close_scenario(conn, monkeypatch)
    _assert_closed_error(conn, drainer.error)
    assert publisher.error is not None  # its type: see the publisher test below
    assert server_connections.wait(connection_name, 0) == 0
    channels = rabbit_admin.channel_details(vhost)
    assert [c for c in channels if c.get("connection") == info["pid"]] == []
    assert warnings_in(caplog) == []


def test_close_race_hammer(connect, caplog, monkeypatch):
    """The same, 25 times, without the (slow) server checks: every time the blocked thread
    gets the non-recoverable ConnectionClosedError and nothing logs a warning."""
    for _ in range(25):
        conn = connect()
        drainer, _ = _close_scenario(conn, monkeypatch)
        _assert_closed_error(conn, drainer.error)
    assert warnings_in(caplog) == []


def test_publisher_mid_loop_gets_closed_error_after_close(connect, monkeypatch):
    """A thread publishing while the application closes the connection must get the
    non-recoverable ConnectionClosedError too: a recoverable error (OSError, py-amqp's
    RecoverableConnectionError) tells kombu's ensure()/retry policies to reconnect."""
    seen = Counter()
    for _ in range(25):
        conn = connect()
        _, publisher = _close_scenario(conn, monkeypatch)
        seen[type(publisher.error).__name__] += 1
    assert seen == {"ConnectionClosedError": 25}


def test_ensure_publisher_does_not_reopen_a_closed_connection(connect, connection_name,
                                                              server_connections):
    """conn.ensure() around a publish loop; the application closes the connection: the
    publisher must stop with the non-recoverable error instead of reconnecting."""
    reopened, rounds = 0, 6
    for _ in range(rounds):
        conn = connect()
        publishing = threading.Event()
        stop = threading.Event()

        def publisher(conn=conn, publishing=publishing, stop=stop):
            channel = conn.default_channel
            queue_name = channel.queue_declare("", exclusive=True).queue
            producer = kombu.Producer(channel)
            ensured = conn.ensure(producer, producer.publish, max_retries=2, interval_start=0)
            count = 0
            while not stop.is_set():
                ensured(b"p", exchange="", routing_key=queue_name)
                count += 1
                if count == 20:
                    publishing.set()

        worker = Worker(publisher, name="ensure-publisher")
        worker.start()
        assert publishing.wait(10)
        conn.close()
        if join_all([worker], 1):  # still publishing: it reconnected
            reopened += 1
            stop.set()
            assert join_all([worker], 5) == []
            conn.close()
            continue
        assert not isinstance(worker.error, conn.recoverable_connection_errors), (
            repr(worker.error))
    assert reopened == 0, (
        f"ensure() reopened the closed connection in {reopened}/{rounds} cases")
    assert server_connections.wait(connection_name, 0) == 0


# ----------------------------------------------------------------------------------- leaks


def test_server_close_and_reconnect_cycles_leak_no_threads_or_fds(connect, connection_name,
                                                                  queue_name,
                                                                  server_connections):
    conn = connect()
    conn.default_channel.queue_declare(queue_name, auto_delete=False)

    def cycle():
        channel = conn.default_channel
        amqp_connection = channel.connection
        publish(channel, b"m", queue_name)
        provoke_server_close(conn)
        with pytest.raises(conn.recoverable_connection_errors):
            while True:  # the failure wakes this thread (it owns a channel)
                amqp_connection.drain_events(timeout=5)
        assert not conn.connected
        conn.ensure_connection(max_retries=3)

    threads_before = assert_cycles_leak_nothing(cycle)
    assert wait_message_count(conn.default_channel, queue_name, 101) == 101
    conn.default_channel.queue_delete(queue_name)
    conn.close()
    assert settled(threading.active_count, threads_before) <= threads_before
    assert server_connections.wait(connection_name, 0) == 0


def test_connect_close_cycles_leak_no_threads_or_fds(amqp_url, connection_name,
                                                     server_connections):
    def cycle():
        conn = kombu_connection(amqp_url, connection_name)
        try:
            conn.ensure_connection(max_retries=3)
            channel = conn.default_channel
            channel.queue_declare("", exclusive=True)
            with conn.default_channel_pool.acquire() as pooled:
                pooled.basic_qos(0, 1, False)
        finally:
            conn.close()

    assert_cycles_leak_nothing(cycle)
    assert server_connections.wait(connection_name, 0) == 0


def test_default_channels_of_exited_threads_are_not_leaked(connect):
    """default_channel is one channel per thread. Threads that used it and exited (a thread
    per request, short-lived executors) must not leave their channels open forever: they
    pile up on the connection until channel_max (2047 on RabbitMQ) is exhausted."""
    conn = connect()
    amqp_connection = conn.connection

    def use_default_channel():
        channel = conn.default_channel
        channel.basic_qos(0, 1, False)

    for _ in range(300):
        worker = Worker(use_default_channel)
        worker.start()
        assert join_all([worker], 10) == []
        assert worker.error is None, repr(worker.error)
    use_default_channel()  # a live thread may clean up after the dead ones
    open_channels = len(amqp_connection.channels) - 1
    assert open_channels <= 10, (
        f"{open_channels} channels of 300 exited threads are still open "
        f"(channel_max={amqp_connection.channel_max})")


# ------------------------------------------------------------------------------------ fork


def _read_line(fd, timeout):
    data = b""
    deadline = time.monotonic() + timeout
    while not data.endswith(b"\n"):
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
            raise AssertionError(f"child did not answer in {timeout} s (got {data!r})")
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        data += chunk
    return data.decode()


def test_fork_child_reconnects_and_parent_keeps_working(connect, connection_name, queue_name,
                                                        server_connections):
    conn = connect()
    main = conn.default_channel
    main.queue_declare(queue_name, auto_delete=False)
    sink = f"{queue_name}-sink"
    main.queue_declare(sink, auto_delete=False)
    publish(main, b"parent-before", queue_name)
    # A thread publishing during the forks (locks may be held at fork time).
    stop = threading.Event()

    def hammer():
        channel = conn.default_channel
        while not stop.is_set():
            publish(channel, b"h", sink)

    hammering = Worker(hammer, name="hammer")
    hammering.start()
    forks = 3
    try:
        for number in range(forks):
            to_parent_r, to_parent_w = os.pipe()
            to_child_r, to_child_w = os.pipe()
            pid = os.fork()
            if pid == 0:  # --------------------------------------------------- child
                code = 1
                try:
                    os.close(to_parent_r)
                    os.close(to_child_w)
                    try:  # the parent's channel must not write to the parent's socket
                        publish(main, b"child-old-channel", queue_name)
                        old = "published"
                    except Exception as exc:  # noqa: BLE001
                        old = type(exc).__name__
                    channel = conn.default_channel
                    publish(channel, b"from-child", queue_name)
                    count = wait_message_count(channel, queue_name, number + 2)
                    os.write(to_parent_w, f"{old} {count}\n".encode())
                    os.read(to_child_r, 1)  # the parent looked at the server
                    conn.close()
                    code = 0
                except BaseException as exc:  # noqa: BLE001
                    with suppress(Exception):
                        os.write(to_parent_w, f"ERROR {exc!r}\n".encode())
                finally:
                    os._exit(code)
            # ----------------------------------------------------------------- parent
            os.close(to_parent_w)
            os.close(to_child_r)
            try:
                line = _read_line(to_parent_r, 20)
                old, count = line.split()
                assert old in ("ConnectionLostError", "RecoverableConnectionError"), line
                assert int(count) == number + 2  # parent-before + one per child so far
                if number == 0:
                    assert server_connections(connection_name) == 2
            finally:
                code = reap_child(pid, to_child_w, to_parent_r)
            assert code == 0
    finally:
        stop.set()
        assert join_all([hammering], 10) == []
    assert hammering.error is None, repr(hammering.error)
    # The parent's connection is untouched: same connection, publish and consume work.
    assert conn.connected
    publish(main, b"parent-after", queue_name)
    bodies = []
    main.basic_consume(queue_name, callback=lambda m: bodies.append(m.body), no_ack=True)
    deadline = time.monotonic() + 10
    while len(bodies) < forks + 2 and time.monotonic() < deadline:
        conn.drain_events(timeout=5)
    assert sorted(bodies) == sorted([b"parent-before", b"parent-after"] + [b"from-child"] * forks)
    assert server_connections.wait(connection_name, 1) == 1
    main.queue_delete(sink)
