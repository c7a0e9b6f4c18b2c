"""Routing of replies, errors and deliveries to the owning thread; writes from many threads.

Everything runs against the real RabbitMQ (session vhost). Threads are synchronised with
Events and Barriers; the only waits on time are bounded polls of the server's state.
"""

from __future__ import annotations

import hashlib
import logging
import os
import queue
import threading
import time
from contextlib import suppress

import pytest
from amqp import spec
from amqp.exceptions import NotFound

import kombu_pyamqp_threadsafe as ts
from kombu_pyamqp_threadsafe import channel as ts_channel
from kombu_pyamqp_threadsafe.inbox import Inbox
from stress import rabbit_admin
from transport_helpers import Worker, join_all, message_count, start_all, wait_message_count

MiB = 1024 * 1024


def publish(channel, body, routing_key, **kwargs):
    channel.basic_publish(channel.prepare_message(body, **kwargs), exchange="",
                          routing_key=routing_key)


def _start_drainer(conn, queue_name, name, timeout):
    """A thread that consumes ``queue_name`` on a channel of its own and drains ``conn``
    (``drain_events(timeout=timeout)``) until a message comes. Returns, once it consumes, the
    thread, the list of bodies it receives and its channel."""
    ready = threading.Event()
    received = []
    channels = []

    def consumer():
        channel = conn.channel()
        channel.queue_declare(queue_name, auto_delete=True)
        channel.basic_consume(queue_name, callback=lambda m: received.append(m.body),
                              no_ack=True)
        channels.append(channel)
        ready.set()
        while not received:
            conn.drain_events(timeout=timeout)

    drainer = Worker(consumer, name=name)
    drainer.start()
    assert ready.wait(10)
    return drainer, received, channels[0]


# ------------------------------------------------------------------------------- 1. routing


def test_channel_error_reaches_only_the_owning_thread(connect, queue_name):
    """Passive declares of missing queues fail in their own threads (each many times) while
    another thread drains the same connection: it sees nothing, its channel stays open and
    still receives a message published afterwards."""
    conn = connect()
    drainer, received, consumer_channel = _start_drainer(conn, queue_name, "drainer", 15)

    barrier = threading.Barrier(4)

    def failer(n):
        channel = conn.default_channel
        barrier.wait(10)
        outcomes = []
        for i in range(25):
            try:
                channel.queue_declare(f"missing-{n}-{i}-{queue_name}", passive=True)
            except NotFound as exc:
                outcomes.append(exc.reply_code)
            else:
                outcomes.append("declared")
        # The channel was reopened after each error and is usable by its owner.
        assert channel.is_open
        channel.queue_declare(queue_name, passive=True)
        return outcomes

    failers = start_all([Worker(failer, n, name=f"failer-{n}") for n in range(4)])
    assert join_all(failers, 30) == []
    for worker in failers:
        assert worker.error is None, repr(worker.error)
        assert worker.result == [404] * 25

    # The drainer is still blocked, untouched by the 100 errors of the other threads.
    assert drainer.is_alive(), repr(drainer.error)
    assert drainer.error is None
    assert received == []
    assert consumer_channel.is_open

    publish(conn.default_channel, b"after the errors", queue_name)
    assert join_all([drainer], 15) == []
    assert drainer.error is None, repr(drainer.error)
    assert received == [b"after the errors"]
    assert consumer_channel.is_open


# ---------------------------------------------------------------- 2. publishers vs reader


def test_publishers_never_wait_behind_a_thread_blocked_in_drain_events(connect, queue_name):
    conn = connect()
    sink = f"{queue_name}-sink"
    main = conn.default_channel
    main.queue_declare(sink, auto_delete=False)
    # No timeout: on the idle connection the drainer blocks until the wake-up.
    drainer, received, _ = _start_drainer(conn, queue_name, "blocked-drainer", None)

    barrier = threading.Barrier(4)

    def publisher():
        channel = conn.default_channel
        barrier.wait(10)
        for i in range(25):
            publish(channel, b"x%d" % i, sink)

    publishers = start_all([Worker(publisher) for _ in range(4)])
    # The drainer waits without a timeout and nothing wakes it until the publishers are done:
    # a publish that needed the drainer to let go would never finish.
    assert join_all(publishers, 30) == [], "publishers are stuck behind the blocked drainer"
    for worker in publishers:
        assert worker.error is None, repr(worker.error)
    assert drainer.is_alive() and received == []

    assert wait_message_count(main, sink, 100) == 100
    publish(main, b"wake up", queue_name)
    assert join_all([drainer], 10) == []
    assert drainer.error is None, repr(drainer.error)
    assert received == [b"wake up"]
    main.queue_delete(sink)


# --------------------------------------------------------------------- 3. no interleaving


def test_multi_frame_messages_from_50_threads_arrive_intact(connect, queue_name):
    conn = connect()
    frame_max = conn.connection.frame_max
    assert frame_max <= 131072  # so 1 MiB is at least 8 body frames
    main = conn.default_channel
    main.queue_declare(queue_name, auto_delete=False)
    threads = 50
    barrier = threading.Barrier(threads)

    def publisher(n):
        channel = conn.default_channel
        bodies = [os.urandom(MiB), os.urandom(100 + n), os.urandom(MiB - 1 - n)]
        digests = [hashlib.sha256(body).hexdigest() for body in bodies]
        barrier.wait(20)
        for body, digest in zip(bodies, digests, strict=True):
            publish(channel, body, queue_name, headers={"sha256": digest, "thread": n})
        return digests

    publishers = start_all([Worker(publisher, n) for n in range(threads)])
    assert join_all(publishers, 60) == []
    expected = set()
    for worker in publishers:
        assert worker.error is None, repr(worker.error)
        expected.update(worker.result)

    seen = []
    bad = []

    def on_message(message):
        digest = hashlib.sha256(message.body).hexdigest()
        if digest != message.properties["application_headers"]["sha256"]:
            bad.append(message.properties["application_headers"]["thread"])
        seen.append(digest)

    main.basic_qos(0, 20, False)
    main.basic_consume(queue_name, callback=on_message, no_ack=True)
    deadline = time.monotonic() + 60
    while len(seen) < 3 * threads and time.monotonic() < deadline:
        conn.drain_events(timeout=10)
    assert bad == []
    assert len(seen) == 3 * threads
    assert set(seen) == expected
    assert conn.connected
    main.queue_delete(queue_name)


# --------------------------------------------------------------------- 7. channel close


class _CountingWriter:
    """Wraps the connection's frame writer and records every method sent."""

    def __init__(self, writer):
        self.writer = writer
        self.sent = []

    def __call__(self, frame_type, channel, method_sig, args, content):
        if frame_type == 1:
            self.sent.append((channel, method_sig))
        return self.writer(frame_type, channel, method_sig, args, content)


def test_closing_200_channels_costs_one_round_trip_each(connect, caplog, monkeypatch):
    caplog.set_level(logging.DEBUG)
    conn = connect()
    channels = [conn.channel() for _ in range(200)]
    amqp_connection = conn.connection
    inbox = amqp_connection._current_inbox()
    next_mailbox = Inbox.next_mailbox
    rounds = []  # what each of this thread's waits was woken by

    def counting_next_mailbox(self, timeout, skip=()):
        mailbox = next_mailbox(self, timeout, skip)
        if self is inbox:
            rounds.append(mailbox)
        return mailbox

    monkeypatch.setattr(Inbox, "next_mailbox", counting_next_mailbox)
    counting = _CountingWriter(amqp_connection.frame_writer)
    amqp_connection.frame_writer = counting
    for channel in channels:
        channel.close()
    amqp_connection.frame_writer = counting.writer
    monkeypatch.undo()
    # One Close out and one wake-up, by its Close-Ok, per channel: no extra method, no wait
    # that ended on a timer or on an empty doorbell.
    assert [sig for _, sig in counting.sent] == [spec.Channel.Close] * 200
    assert len(rounds) == 200 and None not in rounds
    assert all(not channel.is_open for channel in channels)
    assert set(amqp_connection.channels) == {0}
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []


def _fill(conn, queue_name, count):
    channel = conn.default_channel
    channel.queue_declare(queue_name, auto_delete=False)
    for i in range(count):
        publish(channel, b"m%d" % i, queue_name)
    assert wait_message_count(channel, queue_name, count) == count
    return channel


def test_closing_a_channel_with_deliveries_in_flight_logs_no_warning(connect, queue_name,
                                                                       caplog, monkeypatch):
    """The owner closes a consuming channel whose deliveries it never drained."""
    caplog.set_level(logging.DEBUG)
    # Only a Close-Ok that never reaches the closer, not a slow one, ends its wait.
    monkeypatch.setattr(ts_channel, "CLOSE_OK_TIMEOUT", 30.0)
    conn = connect()
    main = _fill(conn, queue_name, 2000)
    for _ in range(5):
        channel = conn.channel()
        channel.basic_consume(queue_name, callback=lambda m: None, no_ack=False)
        # Wait until deliveries are really in flight (queued for this thread, undispatched).
        inbox = conn.connection._current_inbox()
        deadline = time.monotonic() + 5
        while inbox.qsize() < 10 and time.monotonic() < deadline:
            time.sleep(0.005)
        assert inbox.qsize() >= 10
        channel.close()  # raises TimeoutError if its Close-Ok got lost among the deliveries
        assert not channel._abandoned
    # Unacked deliveries went back to the queue: none was acked or lost.
    assert wait_message_count(main, queue_name, 2000) == 2000
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []
    main.queue_delete(queue_name)


def test_closing_a_consumer_channel_from_another_thread_logs_no_warning(connect, queue_name,
                                                                         caplog, monkeypatch):
    """dramatiq's pattern: the main thread closes a consumer's channel while the consumer
    thread is draining deliveries of that channel. Many iterations to hit the races."""
    caplog.set_level(logging.DEBUG)
    monkeypatch.setattr(ts_channel, "CLOSE_OK_TIMEOUT", 30.0)  # as above
    conn = connect()
    main = _fill(conn, queue_name, 3000)
    for iteration in range(20):
        ready = threading.Event()
        stop = threading.Event()
        holder = {}
        got = []

        def consumer(ready=ready, stop=stop, holder=holder, got=got):
            channel = conn.channel()
            channel.basic_qos(0, 50, False)
            channel.basic_consume(queue_name, callback=lambda m: got.append(1), no_ack=False)
            holder["channel"] = channel
            ready.set()
            while not stop.is_set():
                with suppress(TimeoutError):
                    conn.drain_events(timeout=0.05)

        worker = Worker(consumer, name=f"consumer-{iteration}")
        worker.start()
        assert ready.wait(10)
        channel = holder["channel"]
        channel.close()  # raises TimeoutError if its Close-Ok went to the consumer thread
        assert not channel.is_open and not channel._abandoned
        stop.set()
        assert join_all([worker], 10) == []
        assert worker.error is None, f"iteration {iteration}: {worker.error!r}"
    assert wait_message_count(main, queue_name, 3000) == 3000
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []
    main.queue_delete(queue_name)


# ------------------------------------------------------------------- 12. publisher confirms


def test_publisher_confirms_from_32_threads(connect, queue_name):
    conn = connect(transport_options={"confirm_publish": True})
    main = conn.default_channel
    main.queue_declare(queue_name, auto_delete=False)
    threads, per_thread = 32, 20
    barrier = threading.Barrier(threads)

    def publisher(n):
        channel = conn.default_channel
        barrier.wait(10)
        for i in range(per_thread):
            publish(channel, b"%d-%d" % (n, i), queue_name)
            # Returned only once this very message was confirmed.
            assert channel._unconfirmed == {}
        return channel._publish_seq

    publishers = start_all([Worker(publisher, n) for n in range(threads)])
    assert join_all(publishers, 30) == []
    for worker in publishers:
        assert worker.error is None, repr(worker.error)
        assert worker.result == per_thread
    # Every publish returned after its confirm: all messages are in the queue already.
    assert message_count(main, queue_name) == threads * per_thread
    main.queue_delete(queue_name)


def test_confirmed_publish_returns_only_after_its_own_confirm(connect, queue_name):
    """An unroutable mandatory publish gets basic.return then basic.ack; the next publish on
    the channel must still wait for its own confirm, so each message is in the queue when its
    publish returns (checked on the same channel, hence ordered at the server)."""
    conn = connect(transport_options={"confirm_publish": True})
    channel = conn.default_channel
    channel.queue_declare(queue_name, auto_delete=False)
    returned = []
    channel.events["basic_return"].add(lambda exc, *args: returned.append(exc.reply_code))
    for i in range(50):
        channel.basic_publish(channel.prepare_message(b"nowhere"), exchange="",
                              routing_key=f"{queue_name}-unroutable", mandatory=True)
        publish(channel, b"m%d" % i, queue_name)
        assert message_count(channel, queue_name) == i + 1
    assert returned == [312] * 50
    channel.queue_delete(queue_name)


# ---------------------------------------------------------------------------- ownership


def test_synchronous_method_from_a_non_owner_thread_raises(connect, queue_name):
    conn = connect()
    channel = conn.channel()

    def intruder():
        with pytest.raises(ts.ChannelOwnershipError) as info:
            channel.queue_declare(queue_name, auto_delete=False)
        return str(info.value)

    worker = Worker(intruder)
    worker.start()
    assert join_all([worker], 10) == []
    assert worker.error is None, repr(worker.error)
    assert "belongs to thread" in worker.result
    # The owner can still use its channel.
    channel.queue_declare(f"{queue_name}-owner", auto_delete=True)
    assert channel.is_open


def test_refused_synchronous_method_is_not_sent_to_the_server(connect, queue_name):
    """A method the non-owner is not allowed to wait for must not be executed either:
    otherwise the caller gets an error although the broker did the work (here: created a
    queue; a queue_delete would really delete), and the owner later receives a stray reply."""
    conn = connect()
    channel = conn.channel()

    def intruder():
        with pytest.raises(ts.ChannelOwnershipError):
            channel.queue_declare(queue_name, auto_delete=False)

    worker = Worker(intruder)
    worker.start()
    assert join_all([worker], 10) == []
    assert worker.error is None, repr(worker.error)
    # The owner's next declare must get its own reply, not the intruder's stray Declare-Ok.
    own = f"{queue_name}-owner"
    assert channel.queue_declare(own, auto_delete=True).queue == own
    checker = conn.channel()
    try:
        with pytest.raises(NotFound):
            checker.queue_declare(queue_name, passive=True)
    finally:
        with suppress(Exception):
            conn.channel().queue_delete(queue_name)


def test_basic_ack_from_another_thread(connect, queue_name, vhost):
    """Consumer thread receives, a worker thread acks, the message is gone from the queue."""
    conn = connect()
    main = _fill(conn, queue_name, 20)
    tags: queue.Queue = queue.Queue()
    ready = threading.Event()
    done = threading.Event()
    holder = {}

    def consumer():
        channel = conn.channel()
        channel.basic_qos(0, 5, False)
        channel.basic_consume(queue_name, callback=lambda m: tags.put(m.delivery_tag),
                              no_ack=False)
        holder["channel"] = channel
        ready.set()
        while not done.is_set():
            with suppress(TimeoutError):
                conn.drain_events(timeout=0.05)

    def acker():
        acked = 0
        while acked < 20:
            tag = tags.get(timeout=10)
            holder["channel"].basic_ack(tag)  # no reply: allowed from any thread
            acked += 1
        return acked

    consumer_worker = Worker(consumer, name="consumer")
    consumer_worker.start()
    assert ready.wait(10)
    ackers = start_all([Worker(acker, name="acker")])
    assert join_all(ackers, 20) == []
    assert ackers[0].error is None, repr(ackers[0].error)
    done.set()
    assert join_all([consumer_worker], 10) == []
    assert consumer_worker.error is None, repr(consumer_worker.error)
    # Closing the consumer channel would requeue anything unacked: nothing comes back.
    holder["channel"].close()
    assert rabbit_admin.list_queues(vhost)[queue_name][0] == 0  # ready + unacked
    main.queue_delete(queue_name)
