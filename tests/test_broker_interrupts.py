"""A dramatiq TimeLimit (an asynchronous exception) landing in a KombuBroker send.

dramatiq raises TimeLimitExceeded inside the worker thread with PyThreadState_SetAsyncExc; it
fires at the thread's next "eval breaker" check, which in CPython includes the end of every call
into C, e.g. right after ``lock.acquire()`` returned or after a ``with lock:`` block released the
lock. These tests make that happen deterministically: they hold a lock the sending thread needs,
wait until the thread is blocked on it (its innermost frame), raise the time limit exactly as
dramatiq's TimeLimit middleware does, and release the lock. The interrupted send may fail; the
shared producer connection and its channel pool must stay usable by every other thread.

The random version of the same (actors publishing in a loop under short time limits) is
``test_broker_connections.py::test_send_interrupted_by_time_limit_leaves_producer_connection_healthy``.
"""

from __future__ import annotations

import sys
import threading
import traceback
from contextlib import suppress

import amqp
import dramatiq
from amqp import spec
from dramatiq.middleware import Middleware
from dramatiq.middleware.threading import raise_thread_exception
from dramatiq.middleware.time_limit import TimeLimitExceeded

from broker_helpers import (
    Recorder,
    lock_held,
    pool_in_use,
    run_bounded,
    unique,
    wait_until,
)
from kombu_pyamqp_threadsafe import frames
from kombu_pyamqp_threadsafe.inbox import Mailbox


def _blocked_in(thread: threading.Thread, function: str | None, filename: str) -> bool:
    """True once ``thread``'s innermost Python frame is ``function`` (None: any function) in
    ``filename`` (it is then blocked in a C call made from there, e.g. a lock acquire)."""

    def check() -> bool:
        frame = sys._current_frames().get(thread.ident)
        return (frame is not None and function in (None, frame.f_code.co_name)
                and frame.f_code.co_filename.endswith(filename))

    return wait_until(check, timeout=10, interval=0.005)


def _stack_of(thread: threading.Thread) -> str:
    frame = sys._current_frames().get(thread.ident)
    return "".join(traceback.format_stack(frame)[-6:]) if frame is not None else "(ended)"


def _pending(channel) -> object:
    """Diagnostic only: method signatures still waiting in the channel's mailbox."""
    try:
        return [method[0] for method in channel._mailbox._pending]
    except Exception as exc:  # noqa: BLE001
        return repr(exc)


def _sender(task, outcome: Recorder, arg: int) -> threading.Thread:
    def run() -> None:
        try:
            task.send(arg)
            outcome.add("sent")
        except TimeLimitExceeded:
            outcome.add("interrupted")
        except BaseException as exc:  # noqa: BLE001 - the test reports it
            outcome.add(repr(exc))

    return threading.Thread(target=run, daemon=True, name=f"sender-{arg}")


def _interrupt_while_blocked_on(lock, sender: threading.Thread, function: str,
                                filename: str) -> None:
    """Hold ``lock``, start ``sender``, wait until it blocks on the lock in ``function`` of
    ``filename``, raise its time limit as dramatiq does, let the lock go, wait for it."""
    lock.acquire()
    try:
        sender.start()
        assert _blocked_in(sender, function, filename)
        raise_thread_exception(sender.ident, TimeLimitExceeded)
    finally:
        lock.release()
    sender.join(5)


def _setup(env):
    broker = env.broker()
    queue = unique()

    @dramatiq.actor(broker=broker, queue_name=queue)
    def task(i):
        pass

    # Connected and the queues declared, from a thread that has ended since: no lease held.
    run_bounded(lambda: task.send(0), 10, "the first send")
    return broker, queue, task


def test_time_limit_while_waiting_to_write_leaves_the_connection_usable(env, monkeypatch):
    """frames.py FrameWriter: ``if not self.lock.acquire(...)`` before ``try:`` would let an
    interrupt raised as acquire() returns leave the write lock held forever: every later write
    on the connection (sends, acks' channel opens, heartbeats, close) would hang. A send waits
    for the lock only when the queue of messages for the writing thread is full; a limit of 0
    makes every send wait."""
    monkeypatch.setattr(frames, "MAX_QUEUED", 0)
    broker, queue, task = _setup(env)
    writer = broker.producer_connection.connection.frame_writer
    outcome = Recorder()
    sender = _sender(task, outcome, 1)
    # Another thread is writing a large message.
    _interrupt_while_blocked_on(writer.lock, sender, "_write_waiting", "frames.py")
    try:
        leaked = lock_held(writer.lock)
        # With the lock leaked the sender hangs itself: discarding its channel sends a
        # Channel.Close, which waits for the lock it holds.
        assert not sender.is_alive(), (
            f"the interrupted send never returned (write lock left held: {leaked})")
        assert outcome.snapshot() == ["interrupted"]
        assert not leaked, "the interrupted send left the write lock held"
        run_bounded(lambda: task.send(2), 10, "a send from another thread after the interrupt")
        assert broker.get_queue_message_counts(queue)[0] == 2
    finally:
        if lock_held(writer.lock):  # rescue (a plain Lock), so that teardown can close
            with suppress(RuntimeError):
                writer.lock.release()
        sender.join(5)


def test_time_limit_while_waiting_for_the_channel_pool_leaks_no_lease(env):
    """pool.py ChannelPool.acquire: ``self._in_use += 1`` is the last statement of the
    ``with self._lock:`` block and ``try:`` only starts after it; an interrupt raised as the
    block releases the lock leaves the count up with no channel out. ``limit`` such interrupts
    exhaust the pool for good (ChannelPoolLimitError on every send)."""
    broker, queue, task = _setup(env)
    pool = broker.producer_connection.default_channel_pool
    held = pool.acquire(timeout=5)
    outcome = Recorder()
    sender = _sender(task, outcome, 1)
    # Another thread is in the pool.
    _interrupt_while_blocked_on(pool._lock, sender, "acquire", "pool.py")
    held.release()
    assert outcome.snapshot() == ["interrupted"]
    run_bounded(lambda: task.send(2), 10, "a send after the interrupt")
    leaked = pool_in_use(pool)
    assert leaked == 0, f"{leaked} pool lease(s) leaked with no channel out"


def test_time_limit_while_giving_a_channel_back_leaks_no_lease(env, monkeypatch):
    """The interrupt lands while a thread, its message confirmed, waits for the pool's lock to
    give its channel back (the end of every ``with pool.acquire()``; the broker gives a lease
    back after an error): the lease must not stay counted as out."""
    monkeypatch.setattr(frames, "MAX_QUEUED", 0)  # the sender waits for the write lock
    broker, queue, task = _setup(env)
    pool = broker.producer_connection.default_channel_pool
    writer = broker.producer_connection.connection.frame_writer
    outcome = Recorder()

    def lease_and_publish() -> None:
        try:
            with pool.acquire(timeout=5) as channel:
                channel.basic_publish(amqp.Message(b"1"), exchange="", routing_key=queue)
            outcome.add("returned")
        except TimeLimitExceeded:
            outcome.add("interrupted")

    sender = threading.Thread(target=lease_and_publish, daemon=True, name="sender-1")
    # Hold the sender in its publish (inside the lease), then take the pool lock and let the
    # publish go on: the sender then blocks giving the channel back.
    writer.lock.acquire()
    try:
        sender.start()
        assert _blocked_in(sender, "_write_waiting", "frames.py")
        pool._lock.acquire()
    finally:
        writer.lock.release()
    try:
        assert _blocked_in(sender, None, "pool.py")
        raise_thread_exception(sender.ident, TimeLimitExceeded)
    finally:
        pool._lock.release()
    sender.join(5)
    # The message itself was published and confirmed; only the give-back was interrupted.
    assert outcome.snapshot() == ["interrupted"]
    run_bounded(lambda: task.send(2), 10, "a send after the interrupt")
    leaked = pool_in_use(pool)
    assert leaked == 0, f"{leaked} pool lease(s) leaked with no channel out"
    assert broker.get_queue_message_counts(queue)[0] == 3


class _PauseBeforePublish(Middleware):
    """Holds the thread called ``thread_name`` in before_enqueue (inside its channel lease,
    before the publish) until ``go`` is set."""

    def __init__(self, thread_name: str) -> None:
        self.thread_name = thread_name
        self.ready = threading.Event()
        self.go = threading.Event()

    def before_enqueue(self, broker, message, delay):
        if threading.current_thread().name == self.thread_name:
            self.ready.set()
            self.go.wait(10)


def test_time_limit_while_waiting_for_the_confirm_leaves_the_channel_closable(env, monkeypatch):
    """The most likely place for a TimeLimit to land in a send: the thread sleeps in
    ``drain_events`` waiting for its publisher confirm, and the exception fires as soon as the
    confirm's doorbell wakes it, i.e. after ``inbox.get()`` consumed the doorbell and before
    ``mailbox.take()`` took the method. The method then stays in the channel's mailbox with no
    doorbell; the pool discards the channel, and ``Channel.close()`` waits for a Close-Ok whose
    doorbell dispatches the stale confirm instead: it waits forever (no timeout), and so does
    the worker thread. The reader is held back (before it posts the confirm to the channel's
    mailbox) so that the interrupt is set while the sender waits, exactly as with a slow
    confirm."""
    broker, queue, task = _setup(env)
    pool = broker.producer_connection.default_channel_pool
    pause = _PauseBeforePublish("sender-1")
    broker.add_middleware(pause)
    outcome = Recorder()
    sender = _sender(task, outcome, 1)
    sender.start()
    assert pause.ready.wait(10)
    [lease] = list(pool._leases)  # the sender's, held while it pauses before its publish
    channel = lease.channel
    confirm_arrived = threading.Event()
    reader_may_post = threading.Event()
    real_post = Mailbox.post

    def post(mailbox, method):
        if mailbox is channel._mailbox and method[0] == spec.Basic.Ack:
            confirm_arrived.set()
            reader_may_post.wait(10)  # the reader cannot hand the confirm over yet
        return real_post(mailbox, method)

    monkeypatch.setattr(Mailbox, "post", post)
    try:
        pause.go.set()
        assert confirm_arrived.wait(10)
        assert _blocked_in(sender, "wait", "inbox.py")
        raise_thread_exception(sender.ident, TimeLimitExceeded)
    finally:
        reader_may_post.set()
    sender.join(5)
    assert not sender.is_alive(), (
        "the interrupted sender never returned; it is at:\n" + _stack_of(sender)
        + f"\nundispatched methods of its channel: {_pending(channel)}")
    assert outcome.snapshot() == ["interrupted"]
    run_bounded(lambda: task.send(2), 10, "a send after the interrupt")
    assert pool_in_use(pool) == 0
    # The interrupted message itself was published (and confirmed) before the interrupt.
    assert broker.get_queue_message_counts(queue)[0] == 3
