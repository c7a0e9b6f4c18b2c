"""Defects found by the adversarial concurrency review, each shown by a test that fails on the
code it was written against (marked ``xfail(strict=True)`` until fixed, so the branch stays
green and a fix turns the mark into a failure that says to remove it).

Every test talks to the real server. A server block (RabbitMQ's connection.blocked, sent
during a memory or disk alarm) is simulated by handing the connection the notification the
reader would have read (``_on_blocked``): a real alarm would block every session on the shared
node. Asynchronous exceptions are raised exactly as dramatiq's TimeLimit raises them, at a
point the test holds the thread at.
"""

from __future__ import annotations

import gc
import os
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from typing import Any

import amqp
import dramatiq
import kombu
import pytest
from amqp import spec
from amqp.exceptions import AMQPError
from dramatiq.errors import ConnectionClosed
from dramatiq.middleware.threading import raise_thread_exception
from dramatiq.middleware.time_limit import TimeLimitExceeded
from kombu import transport as kombu_transports

import kombu_pyamqp_threadsafe as ts
from broker_helpers import run_bounded, unique, wait_until
from kombu_pyamqp_threadsafe.flow import PublishBlockedError
from kombu_pyamqp_threadsafe.inbox import Mailbox
from kombu_pyamqp_threadsafe.registry import registry
from transport_helpers import kombu_connection

BLOCKED_TIMEOUT = 0.2


@contextmanager
def server_block(amqp_connection: Any) -> Iterator[None]:
    """The server's Connection.Blocked as the reader hands it over, Unblocked at exit."""
    amqp_connection._on_blocked("review: simulated alarm")
    try:
        yield
    finally:
        amqp_connection._on_unblocked()


def _channel_ids(amqp_connection: Any) -> set[int]:
    return {channel_id for channel_id in amqp_connection.channels if channel_id}


# ------------------------------------------------------------------ server block (flow control)


def test_close_refused_while_blocked_leaves_the_channel_closable(connect) -> None:
    """channel.py Channel.send_method refuses Channel.Close at once while blocked
    (wait_before_write(0.0) raises PublishBlockedError); upstream close()'s ``finally`` then
    sets ``connection = None`` without collect(). The channel stays in ``connection.channels``
    and ``_used_channel_ids``, ``is_open`` stays True, and every later close() returns at once
    (connection is None): the id and the server's channel are held until the connection ends."""
    conn = connect(transport_options={"blocked_timeout": BLOCKED_TIMEOUT})
    amqp_connection = conn.connection
    channel = conn.channel()
    channel_id = channel.channel_id
    with server_block(amqp_connection), suppress(PublishBlockedError):
        channel.close()
    channel.close()  # unblocked now: a close must be possible, or must have happened
    # Collected when the server's Close-Ok comes (the close did not wait for it).
    assert wait_until(lambda: channel_id not in _channel_ids(amqp_connection), 5), (
        f"channel {channel_id} is still registered after close(): is_open={channel.is_open}, "
        f"connection={channel.connection}")


def test_open_refused_while_blocked_leaves_no_channel_registered(connect) -> None:
    """amqp Connection.channel(): the Channel registers itself in ``channels`` (and takes an
    id) in __init__, then open() waits before writing Channel.Open and raises
    PublishBlockedError; nobody holds the channel and nobody collects it."""
    conn = connect(transport_options={"blocked_timeout": BLOCKED_TIMEOUT})
    amqp_connection = conn.connection
    conn.default_channel.basic_qos(0, 1, False)  # some channel exists; baseline after it
    before = _channel_ids(amqp_connection)
    with server_block(amqp_connection), pytest.raises(PublishBlockedError):
        conn.channel()
    assert _channel_ids(amqp_connection) == before


def test_publish_refused_while_blocked_keeps_the_channel_usable(connect, queue_name) -> None:
    """channel.py basic_publish_confirm sets ``_publishing`` before _basic_publish, whose
    flow.wait_before_write raises PublishBlockedError before anything is written; the flag
    stays set, so the next publish (the block is over) takes it for an interrupted write,
    closes the channel and raises ConfirmsOutOfStepError. KombuBroker keeps the channel after
    PublishBlockedError precisely so that it stays usable (broker.py _with_producer_channel)."""
    conn = connect(transport_options={"blocked_timeout": BLOCKED_TIMEOUT,
                                      "confirm_publish": True})
    channel = conn.channel()
    channel.queue_declare(queue_name, auto_delete=True)
    channel.basic_publish(amqp.Message(b"before"), exchange="", routing_key=queue_name)
    with server_block(conn.connection), pytest.raises(PublishBlockedError):
        channel.basic_publish(amqp.Message(b"refused"), exchange="", routing_key=queue_name)
    channel.basic_publish(amqp.Message(b"after"), exchange="", routing_key=queue_name)
    assert channel.queue_declare(queue_name, passive=True).message_count == 2


def test_sends_during_a_long_block_do_not_use_up_the_channel_ids(env) -> None:
    """The defects above, through KombuBroker: a send during a block that outlasts
    blocked_timeout from a thread without a channel yet (a new thread; one whose channel was
    discarded after an error, or closed as out of step after an earlier refused publish) has
    its channel open refused, and leaves that channel registered. A disk alarm of an hour with
    threads coming and going is thousands of sends: past channel_max (2047) every channel open
    fails with "No free channel ids" on a connection that is alive, so it is never replaced,
    and the broker cannot send again after the alarm clears. Here channel_max is lowered on
    the live connection to stand for that many sends."""
    broker = env.broker(blocked_timeout=BLOCKED_TIMEOUT)

    @dramatiq.actor(broker=broker, queue_name=unique())
    def task() -> None:
        pass

    task.send()
    amqp_connection = broker.producer_connection.connection
    channels_before = len(_channel_ids(amqp_connection))
    amqp_connection.channel_max = channels_before + 8
    refused: list[BaseException] = []

    def send() -> None:
        try:
            task.send()
        except ConnectionClosed as exc:  # blocked past blocked_timeout, as expected
            refused.append(exc)

    with server_block(amqp_connection):
        for number in range(8):
            sender = threading.Thread(target=send, name=f"sender-{number}", daemon=True)
            sender.start()
            sender.join(10)
            assert not sender.is_alive()
    assert len(refused) == 8
    leaked = len(_channel_ids(amqp_connection)) - channels_before
    assert leaked <= 1, f"{leaked} channels left registered by 8 sends during the block"
    run_bounded(task.send, 10, "a send after the block")  # else: "No free channel ids"


# ------------------------------------------------------------------ asynchronous exceptions


def _blocked_in(thread: threading.Thread, function: str, filename: str) -> bool:
    def check() -> bool:
        frame = sys._current_frames().get(thread.ident or 0)
        return (frame is not None and frame.f_code.co_name == function
                and frame.f_code.co_filename.endswith(filename))

    return bool(wait_until(check, timeout=10, interval=0.005))


@contextmanager
def reader_held_before(monkeypatch: pytest.MonkeyPatch, method_sig: Any) -> Iterator[
        tuple[threading.Event, threading.Event]]:
    """Hold the reader thread before it posts the first ``method_sig`` to a mailbox: yields
    (arrived, release)."""
    arrived, release = threading.Event(), threading.Event()
    real_post = Mailbox.post

    def post(mailbox: Mailbox, method: Any) -> Any:
        if method[0] == method_sig and not arrived.is_set():
            arrived.set()
            release.wait(10)
        return real_post(mailbox, method)

    monkeypatch.setattr(Mailbox, "post", post)
    try:
        yield arrived, release
    finally:
        release.set()


def _interrupt_while_waiting(target: Any, monkeypatch: pytest.MonkeyPatch, reply: Any,
                             ) -> list[BaseException]:
    """Run ``target`` in a thread; while it sleeps for ``reply`` (held at the reader), raise a
    TimeLimit in it as dramatiq does, then let the reply through. Returns what it raised."""
    raised: list[BaseException] = []

    def run() -> None:
        try:
            target()
        except BaseException as exc:  # noqa: BLE001 - the test inspects it
            raised.append(exc)

    thread = threading.Thread(target=run, daemon=True, name="interrupted")
    with reader_held_before(monkeypatch, reply) as (arrived, release):
        thread.start()
        assert arrived.wait(10), f"{reply} never arrived"
        assert _blocked_in(thread, "wait", "inbox.py")
        raise_thread_exception(thread.ident, TimeLimitExceeded)
        release.set()
        thread.join(10)
    assert not thread.is_alive()
    return raised


def test_open_interrupted_waiting_for_open_ok_leaves_no_channel(connect, monkeypatch) -> None:
    """amqp Connection.channel(): the Channel is in ``channels`` from __init__ on; a TimeLimit
    while open() waits for Open-Ok (a round trip, in pool.acquire() of every first send of a
    dramatiq worker thread and after every error) raises out of channel() with the channel
    registered: its Open-Ok is dispatched by a later wait, and the channel stays open on the
    server and holds its id until the connection ends. Each such interrupt leaks one."""
    conn = connect()
    amqp_connection = conn.connection
    conn.default_channel.basic_qos(0, 1, False)
    before = _channel_ids(amqp_connection)
    raised = _interrupt_while_waiting(conn.channel, monkeypatch, spec.Channel.OpenOk)
    assert [type(exc) for exc in raised] == [TimeLimitExceeded]
    # Closed on the wire by the interrupted open, collected when the Close-Ok comes.
    assert wait_until(lambda: not _channel_ids(amqp_connection) - before, 5), (
        f"channel(s) {_channel_ids(amqp_connection) - before} left registered by the "
        "interrupted open")


def test_close_interrupted_waiting_for_close_ok_collects_the_channel(connect,
                                                                     monkeypatch) -> None:
    """Upstream Channel.close()'s ``finally`` sets ``connection = None``; collect(), which
    drops the channel from ``connection.channels`` and frees its id, runs only from the
    Close-Ok's dispatch inside close(). Interrupted in that wait (the pool closes a discarded
    channel in the thread whose send failed, often a TimeLimit's own), the Close-Ok comes
    later, and collect() then finds no connection to drop the channel from: it stays
    registered for good."""
    conn = connect()
    amqp_connection = conn.connection
    conn.default_channel.basic_qos(0, 1, False)
    before = _channel_ids(amqp_connection)
    opened: list[Any] = []

    def open_then_close() -> None:
        channel = conn.channel()
        opened.append(channel)
        channel.close()

    raised = _interrupt_while_waiting(open_then_close, monkeypatch, spec.Channel.CloseOk)
    assert [type(exc) for exc in raised] == [TimeLimitExceeded]
    # The Close-Ok has arrived meanwhile; a later wait of anybody's dispatches what is left.
    conn.default_channel.basic_qos(0, 1, False)
    assert wait_until(lambda: not _channel_ids(amqp_connection) - before, 5), (
        f"channel(s) {_channel_ids(amqp_connection) - before} left registered by the "
        "interrupted close")


# ------------------------------------------------------------------ registry


def test_last_handle_dropped_without_release_closes_the_connection(
        amqp_url, connection_name, server_connections) -> None:
    """registry.py SharedConnection.handles is a WeakSet: a kombu.Connection dropped without
    release() (``Connection(url).default_channel...`` in a function, an exception before the
    ``with``) leaves it silently. Nothing then closes the AMQP connection: its reader thread
    holds it, so it stays open, with its thread and socket, for the process's life. On kombu's
    own transport the collector closes the dropped connection's socket. Every distinct set of
    parameters (a connection_name per job, say) leaks one more."""
    conn = kombu_connection(amqp_url, connection_name)
    conn.ensure_connection(max_retries=3)
    conn.default_channel.basic_qos(0, 1, False)
    assert server_connections(connection_name) == 1
    del conn
    gc.collect()
    try:
        assert server_connections.wait(connection_name, 0, timeout=5) == 0
    finally:  # the leak, closed so that it outlives neither the test nor its vhost
        for entry in list(registry._entries.values()):
            if connection_name in repr(entry.key) and entry.connection is not None:
                entry.connection.close()


# ------------------------------------------------------------------ deferred deliveries


def _post_lands_after_the_scan(monkeypatch: pytest.MonkeyPatch, mailbox: Mailbox,
                               method_sig: Any, waiter: str) -> threading.Event:
    """Hold the reader's post of ``method_sig`` to ``mailbox`` until thread ``waiter``'s
    take() has scanned the mailbox and found only deferred deliveries, and let take() return
    only once the post is in: the window between the scan and its count. Set the returned
    Event to let everything through."""
    may_post, posted = threading.Event(), threading.Event()
    real_post, real_take = Mailbox.post, Mailbox.take

    def post(box: Mailbox, method: Any) -> Any:
        if box is mailbox and method[0] == method_sig:
            may_post.wait(10)  # not before the owner's scan of the deliveries
            try:
                return real_post(box, method)
            finally:
                posted.set()
        return real_post(box, method)

    def take(box: Mailbox, *args: Any, **kwargs: Any) -> Any:
        method = real_take(box, *args, **kwargs)
        if (box is mailbox and threading.current_thread().name == waiter
                and not may_post.is_set() and method is not None
                and not (isinstance(method, tuple) and len(method) == 3)):  # deliveries only
            may_post.set()  # take() has scanned: now the reader gets the GIL
            posted.wait(10)
        return method

    monkeypatch.setattr(Mailbox, "post", post)
    monkeypatch.setattr(Mailbox, "take", take)
    return may_post


def test_confirm_arriving_during_the_scan_of_deferred_deliveries_is_found(
        connect, queue_name, monkeypatch) -> None:
    """connection.py drain_events: after Mailbox.take() found only deferred deliveries (its
    scan covers the methods present when it began), ``scanned[mailbox]`` is set from
    ``pending_count()``, read afterwards. The reader appends without the mailbox lock, so a
    confirm posted between the two (a GIL switch; the reader runs whenever the owner lets the
    GIL go) is counted as scanned: every later take() starts past it, the scan of owned
    mailboxes skips the mailbox, and the publish waits for a confirm it has, until its timeout
    (KombuBroker then publishes the message again: a duplicate). It takes a channel that both
    consumes and publishes with confirms, kombu's pattern on default_channel, which is one
    channel per thread here. The hooks below make the reader's post land in that window."""
    conn = connect(transport_options={"confirm_publish": True})
    channel = conn.channel()
    channel.queue_declare(queue_name, auto_delete=True)
    target = unique()
    channel.queue_declare(target, auto_delete=True)
    for _ in range(2):
        channel.basic_publish(amqp.Message(b"to consume"), exchange="", routing_key=queue_name)
    channel.basic_consume(queue_name, callback=lambda message: None)
    mailbox = channel._mailbox
    assert wait_until(lambda: mailbox.pending_count() >= 2, 5), "no deliveries arrived"

    ack_may_post = _post_lands_after_the_scan(monkeypatch, mailbox, spec.Basic.Ack,
                                              threading.main_thread().name)
    try:
        channel.basic_publish(amqp.Message(b"confirmed"), exchange="", routing_key=target,
                              confirm_timeout=3)
    finally:
        ack_may_post.set()


# ------------------------------------------------------------------ fork


def _exit_code_of_child(pid: int, timeout: float) -> int | None:
    """The child's exit code, or None (it is killed) if it has not ended within ``timeout``."""
    def reaped() -> int | None:
        done, status = os.waitpid(pid, os.WNOHANG)
        return os.waitstatus_to_exitcode(status) + 1 if done == pid else None

    code = wait_until(reaped, timeout)
    if code:
        return int(code) - 1
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    return None


def test_child_collects_an_inherited_connection_whatever_locks_were_held_at_fork(
        connect) -> None:
    """forksafe.py resets the connection's own locks in the child, but not each channel's
    ``Mailbox._lock`` (held by an owner inside take(), move_to() or retire(), i.e. by any
    thread that is waiting on a channel: a consumer, a publisher waiting for its confirm) nor
    ``ChannelTotals.lock`` (held while stats are read). Collecting the inherited connection in
    the child (kombu's after-fork cleanup of its pools collects every pooled connection: Celery's
    prefork children run it) tears it down, which retires every channel's mailbox under its
    lock: a lock the parent's thread held at fork() is held for ever in the child."""
    conn = connect()
    channel = conn.default_channel
    channel.basic_qos(0, 1, False)
    held, release = threading.Event(), threading.Event()

    def inside_take() -> None:  # a thread of the parent inside Mailbox.take() at fork()
        with channel._mailbox._lock:
            held.set()
            release.wait(30)

    holder = threading.Thread(target=inside_take, daemon=True)
    holder.start()
    assert held.wait(5)
    try:
        pid = os.fork()
        if pid == 0:  # ------------------------------------------------------ child
            code = 2
            try:
                worker = threading.Thread(target=conn.collect, daemon=True)
                worker.start()
                worker.join(5)
                code = 1 if worker.is_alive() else 0
            finally:
                os._exit(code)
        code = _exit_code_of_child(pid, 20)
    finally:
        release.set()
        holder.join(5)
    assert code == 0, "the child hung collecting the connection it inherited"


def test_reply_arriving_during_the_scan_of_deferred_deliveries_ends_the_wait(
        connect, queue_name, monkeypatch) -> None:
    """The same window as above, for a reply without a timeout: a queue declared on a channel
    that consumes (kombu's Consumer.add_queue() then consume(), on the thread's channel) while
    deliveries wait in its mailbox. The Declare-Ok is counted as scanned; each later delivery
    rings, is deferred and moves the count past itself, so the wait never ends while the
    connection lives."""
    conn = connect()
    channel = conn.channel()
    channel.queue_declare(queue_name, auto_delete=True)
    for _ in range(2):
        channel.basic_publish(amqp.Message(b"to consume"), exchange="", routing_key=queue_name)
    channel.basic_consume(queue_name, callback=lambda message: None)
    mailbox = channel._mailbox
    assert wait_until(lambda: mailbox.pending_count() >= 2, 5), "no deliveries arrived"

    reply_may_post = _post_lands_after_the_scan(monkeypatch, mailbox, spec.Queue.DeclareOk,
                                                "declaring")
    declared: list[Any] = []

    def declare() -> None:
        channel.adopt()  # this thread waits on the channel
        with suppress(AMQPError, OSError):  # the connection's collect() below, if it hangs
            declared.append(channel.queue_declare(unique(), auto_delete=True))

    waiter = threading.Thread(target=declare, daemon=True, name="declaring")
    try:
        waiter.start()
        waiter.join(5)
        assert declared, "queue_declare() still waits for the Declare-Ok it was sent"
    finally:
        reply_may_post.set()
        conn.connection.collect()  # wakes the waiter
        waiter.join(5)


# ------------------------------------------------------------------ close


class _GatedEvent(threading.Event):
    """An Event whose wait() first says it was entered, then waits for ``go``."""

    def __init__(self) -> None:
        super().__init__()
        self.entered, self.go = threading.Event(), threading.Event()

    def wait(self, timeout: float | None = None) -> bool:
        self.entered.set()
        self.go.wait(10)
        return super().wait(timeout)


def test_close_interrupted_waiting_for_close_ok_still_wakes_every_waiter(connect) -> None:
    """connection.py close(): Connection.Close is sent, then _close_ok.wait(); _fail() and
    _teardown() come after it, outside any finally. The reader's _on_close_ok() stops the
    reader, so the server's end of the socket is "not a failure" and the reader ends without
    failing the connection. Interrupted in that wait (a TimeLimit in an actor closing its
    connection; a second Ctrl-C at shutdown), close() raises and nothing ever marks the
    connection failed or rings an inbox: a thread waiting without a timeout (a consumer in
    drain_events()) sleeps for good, and the connection still says it is connected."""
    conn = connect()
    amqp_connection = conn.connection
    waiting = threading.Event()
    woken: list[BaseException] = []

    def consume() -> None:
        channel = conn.channel()
        channel.basic_qos(0, 1, False)
        waiting.set()
        try:
            amqp_connection.drain_events(timeout=None)
        except BaseException as exc:  # noqa: BLE001 - the test inspects it
            woken.append(exc)

    consumer = threading.Thread(target=consume, daemon=True, name="consumer")
    consumer.start()
    assert waiting.wait(10)
    gate = amqp_connection._close_ok = _GatedEvent()
    raised: list[BaseException] = []

    def close() -> None:
        try:
            amqp_connection.close()
        except BaseException as exc:  # noqa: BLE001 - the test inspects it
            raised.append(exc)

    closer = threading.Thread(target=close, daemon=True, name="closer")
    try:
        closer.start()
        assert gate.entered.wait(10)
        raise_thread_exception(closer.ident, TimeLimitExceeded)
        gate.go.set()
        closer.join(10)
        assert [type(exc) for exc in raised] == [TimeLimitExceeded]
        consumer.join(5)
        assert not consumer.is_alive(), (
            f"drain_events() still sleeps on a connection the server closed; "
            f"connected={amqp_connection.connected}, failure={amqp_connection._failure}")
    finally:
        gate.go.set()
        amqp_connection.collect()  # wakes the consumer
        consumer.join(5)


# ------------------------------------------------------------------ default channel


def test_default_channel_racing_another_threads_collect_raises_a_connection_error(
        amqp_url) -> None:
    """thread_channel.py ThreadChannel.current(): ``connection = client._ensure_connection()``
    then ``client.transport.default_channel(connection)``. kombu's ensure() calls collect()
    after a connection error (on a plain kombu.Connection on the shared transport: Celery's
    route), which drops the transport; if that lands between the two lines, ``client.transport``
    is a new Transport that never connected, and default_channel() raised RuntimeError
    ("default_channel before this transport opened a connection"): not a connection error,
    so kombu's ensure() and Celery's retries did not retry it."""
    aliases = dict(kombu_transports.TRANSPORT_ALIASES)
    ts.add_shared_amqp_transport()
    conn = kombu.Connection(amqp_url, transport="shared+amqp")
    try:
        channel = conn.default_channel
        channel.basic_qos(0, 1, False)
        conn.connection.collect()  # the connection failed (as after a network error)
        connected, collected = threading.Event(), threading.Event()
        real_ensure = conn._ensure_connection

        def ensure_then_let_the_other_thread_collect(*args: Any, **kwargs: Any) -> Any:
            result = real_ensure(*args, **kwargs)
            if threading.current_thread().name == "publisher":
                connected.set()
                collected.wait(10)
            return result

        conn._ensure_connection = ensure_then_let_the_other_thread_collect
        raised: list[BaseException] = []

        def publisher() -> None:
            try:
                channel.basic_qos(0, 1, False)
            except BaseException as exc:  # noqa: BLE001 - the test inspects it
                raised.append(exc)

        thread = threading.Thread(target=publisher, name="publisher", daemon=True)
        thread.start()
        assert connected.wait(10)
        conn.collect()  # another thread's ensure() after its connection error
        collected.set()
        thread.join(10)
        assert not [exc for exc in raised if not isinstance(exc, conn.connection_errors)], raised
    finally:
        with suppress(Exception):
            conn.release()
        kombu_transports.TRANSPORT_ALIASES.clear()
        kombu_transports.TRANSPORT_ALIASES.update(aliases)
        kombu_transports._transport_cache.clear()
